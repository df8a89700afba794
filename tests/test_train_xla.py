"""fit() on torch_xla with a CPU backend (PJRT_DEVICE=CPU): one compile per graph, few host reads, SPMD.

Each XLA run happens in its own process (tests/xla_worker.py): SPMD must be on before any XLA tensor, and a
CPU backward pass earlier in the pytest process would break XLA backward passes there.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch_xla", reason="torch_xla is not installed (pip install torch-xla==2.9.0)")

pytestmark = [pytest.mark.xla, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


def run_worker(*args, devices=1) -> dict:
    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": str(devices)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "xla_worker.py"), *map(str, args)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_xla_compiles_once_reads_rarely_and_warns_on_recompiles(tiny_model_dir, tmp_path):
    history = run_worker("guard", tiny_model_dir, tmp_path / "run")
    text = history["progress"]
    assert text.index("being compiled") < text.index("train 1/36")
    assert history["step"] == list(range(1, 37)) and np.isfinite(history["loss"]).all()
    log = {e["step"]: e for e in history["xla_log"]}
    assert [e["step"] for e in history["eval"]] == [10, 20, 30, 36]
    # from step 12 (after the first eval compiled its graph) to step 32: 20 steps with evals at 20 and 30, and not
    # one new graph
    assert log[32]["compiles"] == log[12]["compiles"], history["xla_log"]
    # host transfers: one read per log interval plus one per evaluation
    transfers = log[32]["transfers"] - log[12]["transfers"]
    assert transfers <= (32 - 12) / 4 + 2, history["xla_log"]
    # the new batch shape from step 33 compiles again: the guard says so once, with the likely cause
    assert log[36]["compiles"] > log[32]["compiles"]
    messages = [m for m in history["warnings"] if "new graph" in m]
    assert len(messages) == 1 and "shape" in messages[0] and history["recompile_warning"] == messages[0]


def test_xla_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir):
    result = run_worker("checkpointing", tiny_model_dir)
    plain, checkpointed = result["False"], result["True"]
    assert not plain["functions"]
    assert checkpointed["functions"] and set(checkpointed["functions"]) == {"torch_xla.utils.checkpoint"}
    assert plain["grads"].keys() == checkpointed["grads"].keys()
    for name, grad in plain["grads"].items():
        np.testing.assert_allclose(checkpointed["grads"][name], grad, rtol=1e-5, atol=1e-6, err_msg=name)


def test_spmd_on_4_devices_matches_one_device(tiny_model_dir, tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from xla_worker import fit_run

    spmd = run_worker("fit", tiny_model_dir, tmp_path / "spmd", devices=4)
    assert spmd["devices"] == 4 and "0,1,2,3}" in spmd["lora_sharding"], spmd["lora_sharding"]  # split 4 ways
    one = fit_run(tiny_model_dir, tmp_path / "one", "cpu")
    np.testing.assert_allclose(spmd["loss"], one["loss"], rtol=0, atol=1e-4)
    assert spmd["eval"][-1]["log_loss"] == pytest.approx(one["eval"][-1]["log_loss"], abs=1e-4)

"""fit() on torch_xla with a CPU backend (PJRT_DEVICE=CPU): one compile per graph, few host reads, SPMD."""

import dataclasses
import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torch_xla", reason="torch_xla is not installed (pip install torch-xla==2.9.0)")

from lmsys_utils.config import Config  # noqa: E402
from lmsys_utils.data import LABEL_COLUMNS, split_train_valid  # noqa: E402
from lmsys_utils.demo import make_demo_data  # noqa: E402

pytestmark = [pytest.mark.xla, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from lmsys_utils.model import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def xla_lora(model_dir, tokenizer):
    from lmsys_utils.model import add_lora, load_classifier

    model = load_classifier(model_dir, tokenizer, device_kind="xla")  # bf16, eager attention
    torch.manual_seed(0)
    return add_lora(model, r=4, alpha=8, dropout=0.05)


def test_xla_compiles_once_reads_rarely_and_warns_on_recompiles(tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    from lmsys_utils import device as dev
    from lmsys_utils.train import fit

    df = make_demo_data(160, seed=2)
    df["label"] = df[list(LABEL_COLUMNS)].to_numpy().argmax(axis=1)
    train_df, valid_df = split_train_valid(df, 0.2, seed=0)
    config = Config(train_path="unused", output_dir=str(tmp_path / "run"), max_length=64, batch_size=4, lr=3e-3,
                    warmup_steps=2, max_steps=36, log_every=4, eval_every=10, save_every=None, lora_r=4,
                    lora_alpha=8, seed=0)
    calls = {"n": 0}
    real_to_device = dev.to_device

    def shrink_late_batches(batch, kind):  # from step 33 on, a training batch shape the graph has not seen
        calls["n"] += "labels" in batch
        if calls["n"] > 32 and "labels" in batch:
            batch = {k: (v[:, :48] if k != "labels" else v) for k, v in batch.items()}
        return real_to_device(batch, kind)

    monkeypatch.setattr(dev, "to_device", shrink_late_batches)
    out = io.StringIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = fit(xla_lora(tiny_model_dir, tokenizer), tokenizer, train_df, valid_df, config,
                      device_kind="xla", progress_file=out)
    text = out.getvalue()
    assert text.index("being compiled") < text.index("train 1/36")
    assert history["step"] == list(range(1, 37)) and np.isfinite(history["loss"]).all()
    log = {e["step"]: e for e in history["xla_log"]}
    assert [e["step"] for e in history["eval"]] == [10, 20, 30, 36]
    # from step 12 (after the first eval compiled its graph) to step 32: 20 steps with evals at 20 and 30, and not
    # one new graph
    assert log[32]["compiles"] == log[12]["compiles"], history["xla_log"]
    # host transfers: one read per log interval plus one per evaluation
    transfers = log[32]["transfers"] - log[12]["transfers"]
    assert transfers <= (32 - 12) / config.log_every + 2, history["xla_log"]
    # the changed shape at step 33 compiles again: the guard says so once, with the likely cause
    assert log[36]["compiles"] > log[32]["compiles"]
    messages = [str(w.message) for w in caught if "new graph" in str(w.message)]
    assert len(messages) == 1 and "shape" in messages[0] and history["recompile_warning"] == messages[0]


def test_xla_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir, tokenizer):
    from lmsys_utils import device as dev
    from lmsys_utils.batching import pad_batch
    from lmsys_utils.model import add_lora, load_classifier

    device = dev.get_device("xla")
    batch = {k: v.to(device) for k, v in pad_batch([[1, 5, 9, 33, 40], [1, 7, 8]], 0, 8).items()}
    grads = []
    for checkpointing in (False, True):
        model = load_classifier(tiny_model_dir, tokenizer, dtype="fp32", device_kind="xla",
                                gradient_checkpointing=checkpointing)
        layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
        assert bool(layers) == checkpointing
        assert all(m._gradient_checkpointing_func.func.__module__ == "torch_xla.utils.checkpoint" for m in layers)
        torch.manual_seed(0)
        model = add_lora(model, r=4, alpha=8, dropout=0.0).to(device).train()
        model(**batch).logits.sum().backward()
        dev.sync("xla")  # one graph for forward + backward, then plain reads
        grads.append({n: p.grad.cpu() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_spmd_on_4_devices_matches_one_device(tiny_model_dir, tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from spmd_worker import run

    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "4"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "spmd_worker.py"), str(tiny_model_dir),
                           str(tmp_path / "spmd")], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    spmd = json.loads(proc.stdout.strip().splitlines()[-1])
    assert spmd["devices"] == 4 and "0,1,2,3}" in spmd["lora_sharding"], spmd["lora_sharding"]  # split 4 ways
    one = run(tiny_model_dir, tmp_path / "one", "cpu")
    np.testing.assert_allclose(spmd["loss"], one["loss"], rtol=0, atol=1e-4)
    assert spmd["eval"][-1]["log_loss"] == pytest.approx(one["eval"][-1]["log_loss"], abs=1e-4)

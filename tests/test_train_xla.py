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
    env.pop("XLA_PERSISTENT_CACHE_PATH", None)
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
    # every decoder layer's forward is wrapped by torch_xla's checkpoint_module (its weights join the barrier)
    assert plain["layers"] == 0
    assert checkpointed["checkpointed"] == ["LlamaDecoderLayer"] and checkpointed["layers"] == 2
    assert plain["grads"].keys() == checkpointed["grads"].keys()
    for name, grad in plain["grads"].items():
        np.testing.assert_allclose(checkpointed["grads"][name], grad, rtol=1e-5, atol=1e-6, err_msg=name)


def test_spmd_on_4_devices_matches_one_device(tiny_model_dir, tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from xla_worker import fit_run

    spmd = run_worker("fit", tiny_model_dir, tmp_path / "spmd", devices=4)
    assert spmd["devices"] == 4 and spmd["layer_classes"] == ["LlamaDecoderLayer"]
    # one FSDPv2 wrapper per decoder layer, hidden from the state dict (adapters load on a plain model)
    assert len(spmd["wrapped_layers"]) == 2 and all(".layers." in n for n in spmd["wrapped_layers"])
    assert spmd["adapter_keys"] and not any("_orig_module" in k for k in spmd["adapter_keys"])
    layer_weights = {n: s for n, s in spmd["sharding"].items() if ".layers." in n and "lora_" not in n
                     and not n.endswith("layernorm.weight")}
    assert len(layer_weights) == 2 * 7  # q, k, v, o, gate, up, down of each layer
    for name, spec in layer_weights.items():  # split 4 ways over the fsdp axis
        assert spec.startswith("{devices=[") and "0,1,2,3}" in spec, (name, spec)
    trainable = {n: spmd["sharding"][n] for n in spmd["trainable"]}  # LoRA A/B and the score head
    assert len(trainable) == 17 and set(trainable.values()) == {"{replicated}"}, trainable
    one = fit_run(tiny_model_dir, tmp_path / "one", "cpu")
    np.testing.assert_allclose(spmd["loss"], one["loss"], rtol=0, atol=1e-4)
    assert spmd["eval"][-1]["log_loss"] == pytest.approx(one["eval"][-1]["log_loss"], abs=1e-4)


def test_bucketed_training_compiles_at_most_twice_per_bucket_plus_evaluation(tiny_model_dir, tmp_path):
    history = run_worker("buckets", tiny_model_dir, tmp_path / "run")
    buckets = history["buckets"]
    assert buckets == [64, 128, 192, 256] and history["step"] == list(range(1, 41))
    assert not [m for m in history["warnings"] if "new graph" in m] and history["recompile_warning"] is None
    log = history["log"]
    # compiles per step: between the fetch of its first micro-batch and the next step's, minus evaluations there
    per_bucket, steps = {b: 0 for b in buckets}, [i for i, e in enumerate(log) if "train" in e][::2]
    for i, j in zip(steps, steps[1:] + [len(log) - 1]):
        width = log[i]["train"][1]
        assert log[i + 1]["train"][1] == width  # both micro-batches of a step come from one bucket
        evals = sum(e["compiles"] for e in log[i:j] if "eval" in e)
        per_bucket[width] += log[j]["compiles"] - log[i]["compiles"] - evals
    assert all(1 <= n <= 2 for n in per_bucket.values()), per_bucket
    assert sum(per_bucket.values()) <= len(buckets) + 1  # AdamW's first step is the one extra graph
    # evaluations: the 20-row subset every 10 steps compiles once (one graph per bucket width in it), the whole
    # split at the end once; repeats compile nothing
    evals = [(e["eval"], e["compiles"]) for e in log if "eval" in e]
    whole = history["eval"][-1]["rows"]  # the grouped split holds about a quarter of the 160 rows
    assert whole > 20 and [rows for rows, _ in evals] == [e["rows"] for e in history["eval"]] == [20, 20, 20, whole]
    assert [e["whole_split"] for e in history["eval"]] == [False, False, False, True]
    assert 1 <= evals[0][1] <= len(buckets) and evals[1][1] == evals[2][1] == 0 and evals[3][1] <= len(buckets)
    print("compiles per bucket", per_bucket, "per evaluation", evals)


def test_checkpoint_save_is_one_device_to_host_transfer_on_4_devices(tiny_model_dir, tmp_path):
    result = run_worker("checkpoint", tiny_model_dir, tmp_path / "run", devices=4)
    assert result["devices"] == 4 and result["trainable"] == 17  # LoRA A/B of q, k, v, o in 2 layers + score
    # adapter and optimizer state in one transfer (before: one per tensor, 51), no replication programs
    assert result["transfers"] <= result["trainable"] and result["transfers"] == 1, result
    assert result["compiles"] == 0, result


def test_compile_cache_is_written_and_looked_up_by_a_second_process(tiny_model_dir, tmp_path):
    first = run_worker("cache", tiny_model_dir, tmp_path / "run")
    second = run_worker("cache", tiny_model_dir, tmp_path / "run")
    compiled = first["counters"]["UncachedCompile"]
    assert compiled > 0 and first["cache_files"] >= first["counters"]["PersistentCacheMiss"] > 0
    found = second["counters"]["PersistentCacheHit"] + second["counters"]["PersistentCacheDeserializeFailure"]
    assert second["counters"]["PersistentCacheMiss"] == 0 and found == first["counters"]["PersistentCacheMiss"]
    print("first", first["counters"], "second", second["counters"])
    if second["counters"]["PersistentCacheDeserializeFailure"]:
        # torch_xla <= 2.9 writes executables it cannot read back (pytorch/xla#9094): the run says so
        assert any("pytorch/xla#9094" in m for m in second["warnings"]), second["warnings"]
        pytest.xfail("torch_xla cannot deserialize its cached executables here (pytorch/xla#9094)")
    assert second["counters"]["UncachedCompile"] < compiled

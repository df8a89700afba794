"""The CUDA paths on a real GPU, checked and measured in one run: fp16 training with loss scaling through
`train()`, prediction through `predict()` against the CPU's fp32, 8-bit and 4-bit bitsandbytes weights
(prediction and QLoRA training), and the memory plan against the CUDA allocator's peak.

Prints its figures and exits non-zero when a check fails. Usage: python bench/gpu_check.py
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lmsys_utils.config import Config
from lmsys_utils.data import LABEL_COLUMNS
from lmsys_utils.device import resolve
from lmsys_utils.memory import plan_memory
from lmsys_utils.model import add_lora, load_classifier, load_tokenizer
from lmsys_utils.predict import predict
from lmsys_utils.synthetic import build_tiny_model, write_demo_data
from lmsys_utils.train import train

FAILED = []


def check(ok: bool, what: str) -> None:
    print(f"  {'ok  ' if ok else 'FAIL'} {what}", flush=True)
    if not ok:
        FAILED.append(what)


def probs_of(path) -> np.ndarray:
    return pd.read_csv(path)[list(LABEL_COLUMNS)].to_numpy()


def measured_peak_gb(model_dir, batch_size: int, max_length: int) -> float:
    """Model bytes + the allocator's peak over two LoRA + AdamW steps in fp16 autocast (as fit runs them)."""
    tokenizer = load_tokenizer(model_dir)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    model = add_lora(load_classifier(model_dir, tokenizer, dtype="fp16", kind="cuda")).to("cuda").train()
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(5, len(tokenizer), (batch_size, max_length), device="cuda")
    targets = torch.softmax(torch.randn(batch_size, 3, device="cuda"), -1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.float16):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        loss = -(targets * torch.log_softmax(logits.float(), -1)).sum(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del model, opt
    return peak / 1e9


def main() -> int:
    runtime = resolve("auto")
    versions = {n: importlib.metadata.version(n) for n in ("torch", "transformers", "peft", "bitsandbytes")}
    print(f"device {runtime.kind}: {torch.cuda.get_device_name(0) if runtime.kind == 'cuda' else '-'}; "
          f"dtype {runtime.dtype}; {versions}")
    if runtime.kind != "cuda":
        print("no CUDA device: nothing to check here")
        return 1
    work = Path(tempfile.mkdtemp())
    train_csv, test_csv = write_demo_data(work / "data", n_train=800, n_test=200)
    model_dir = build_tiny_model(work / "tiny", hidden_size=256, num_layers=4)

    print("1. fp16 training on the GPU (autocast + loss scaling) through train()")
    config = Config(train_path=str(train_csv), output_dir=str(work / "run"), model=str(model_dir), max_length=256,
                    batch_size=16, grad_accum=2, epochs=3, lr=3e-3, warmup_steps=10, lora_r=16, lora_alpha=32,
                    lora_dropout=0.0, log_every=10, eval_every=40, save_every=40, valid_frac=0.1)
    t = time.perf_counter()
    history = train(config, progress_file=io.StringIO())
    losses = np.array(history["loss"])
    print(f"  {history['total_steps']} steps in {time.perf_counter() - t:.1f} s ({history['step_s'] * 1000:.1f} "
          f"ms/step after {history['compile_s']:.2f} s warm-up); loss {losses[:5].mean():.3f} -> "
          f"{losses[-5:].mean():.3f}; valid log loss {history['eval'][-1]['log_loss']:.4f}")
    check(history["device"] == "cuda" and np.isfinite(losses).all(), "all fp16 losses finite, on cuda")
    check(history["eval"][-1]["log_loss"] < 1.0, "valid log loss below the uniform 1.0986")

    print("2. prediction on the GPU (fp16) against the CPU (fp32), with TTA")
    adapter = work / "run" / "adapter"
    gpu = predict(test_csv, str(model_dir), adapter=adapter, out=work / "gpu.csv", tta=True, progress=False)
    cpu = predict(test_csv, str(model_dir), adapter=adapter, out=work / "cpu.csv", tta=True, device="cpu",
                  dtype="fp32", progress=False)
    diff = np.abs(gpu.iloc[:, 1:].to_numpy() - cpu.iloc[:, 1:].to_numpy()).max()
    print(f"  {len(gpu)} rows; max |fp16 GPU - fp32 CPU| = {diff:.2e}")
    check(list(gpu["id"]) == list(cpu["id"]) and diff < 2e-2, "GPU predictions match the CPU's within 2e-2")

    print("3. bitsandbytes weights on the GPU: prediction and QLoRA training")
    for quantization, tolerance in (("8bit", 0.05), ("4bit", 0.15)):
        out = work / f"{quantization}.csv"
        quantized = predict(test_csv, str(model_dir), adapter=adapter, out=out, tta=True,
                            quantization=quantization, progress=False)
        q_diff = np.abs(quantized.iloc[:, 1:].to_numpy() - probs_of(work / "gpu.csv")).max()
        hist = train(dataclasses.replace(config, output_dir=str(work / f"q{quantization}"), quantization=quantization,
                                         max_steps=20, epochs=1), progress_file=io.StringIO())
        print(f"  {quantization}: max |quantized - fp16| = {q_diff:.3f}; QLoRA 20 steps loss "
              f"{hist['loss'][0]:.3f} -> {np.mean(hist['loss'][-5:]):.3f}")
        check(q_diff < tolerance, f"{quantization} predictions within {tolerance} of fp16")
        check(np.isfinite(hist["loss"]).all(), f"{quantization} QLoRA losses finite")

    print("4. the memory plan against the CUDA allocator's peak (LoRA + AdamW, fp16 autocast)")
    big = build_tiny_model(work / "big", hidden_size=1024, num_layers=8)
    for batch_size, max_length in ((8, 512), (4, 2048)):
        plan = plan_memory(big, "gpu:80", dtype="fp16", training=True, batch_size=batch_size, max_length=max_length,
                           advise=False)
        planned = plan.total_gb - plan.overhead_gb
        measured = measured_peak_gb(big, batch_size, max_length)
        print(f"  {batch_size} x {max_length}: planned {planned:.2f} GB, measured {measured:.2f} GB "
              f"(plan/measured {planned / measured:.2f})")
        check(abs(planned - measured) / measured < 0.35, f"plan within 35% of the measured peak at {batch_size} x "
              f"{max_length}")
    print(f"{len(FAILED)} failed" + (f": {FAILED}" if FAILED else ""))
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())

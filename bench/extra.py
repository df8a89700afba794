"""Rows/s of `load_extra` on a 140k-schema parquet, with its counts; blend figures on the real sample.

The parquet is the real sample rebuilt in the 140k set's schema, repeated with a per-copy suffix (every copy a
new battle) plus A/B-swapped copies (duplicates), written to a temporary folder only.
Run: .venv/bin/python bench/extra.py [--copies 20]
"""

import argparse
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression

from lmsys_utils.blend import cross_validate, fit_blend
from lmsys_utils.data import load_arena, make_folds
from lmsys_utils.extra import load_extra

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "arena" / "train_sample.csv"
WINNERS = ("model_a", "model_b", "tie")


def _messages(prompt, response, suffix):
    out = []
    for i, p in enumerate(prompt):
        out.append({"role": "user", "content": [{"type": "text", "text": p + suffix, "image": None}]})
        if i < len(response):
            out.append({"role": "assistant", "content": [{"type": "text", "text": response[i], "image": None}]})
    return out


def write_parquet(df: pd.DataFrame, copies: int, path: Path) -> int:
    rows = []
    for copy in range(copies):
        suffix = "" if copy == 0 else f" (variant {copy})"
        for r in df.itertuples():
            a, b = _messages(r.prompt, r.response_a, suffix), _messages(r.prompt, r.response_b, suffix)
            rows.append({"id": f"{copy}-{r.id}", "model_a": r.model_a, "model_b": r.model_b,
                         "winner": WINNERS[r.label], "conversation_a": a, "conversation_b": b})
            if r.Index % 10 == 0:  # every tenth battle again with A and B exchanged
                rows.append({**rows[-1], "id": f"{copy}-{r.id}-swapped", "conversation_a": b, "conversation_b": a,
                             "winner": WINNERS[(1, 0, 2)[r.label]]})
    pd.DataFrame(rows).to_parquet(path)
    return len(rows)


def blend_figures(df: pd.DataFrame) -> None:
    labels = df["label"].to_numpy()
    folds = make_folds(df, k=5).to_numpy()
    la = np.log1p(df["response_a"].map(lambda t: sum(map(len, t))))
    lb = np.log1p(df["response_b"].map(lambda t: sum(map(len, t))))
    features = np.c_[la - lb, np.abs(la - lb), la + lb]
    prior, length = np.zeros((len(df), 3)), np.zeros((len(df), 3))
    for fold in range(5):
        train, test = folds != fold, folds == fold
        prior[test] = np.bincount(labels[train], minlength=3) / train.sum()
        length[test] = LogisticRegression().fit(features[train], labels[train]).predict_proba(features[test])
    cv = cross_validate(labels, [prior, length])
    print(f"real sample, out-of-fold inputs: prior {cv['inputs'][0]:.4f}, length model {cv['inputs'][1]:.4f}; "
          f"5-fold CV blend {cv['blend']:.4f}, calibrated blend {cv['calibrated']:.4f}; "
          f"weights {np.round(fit_blend(labels, [prior, length])['weights'], 3).tolist()}")
    over = length ** 4 / (length ** 4).sum(axis=1, keepdims=True)
    cv = cross_validate(labels, [over])
    t = fit_blend(labels, [over])["temperature"]
    print(f"over-confident length model (p^4): {cv['inputs'][0]:.4f} -> temperature-scaled {cv['calibrated']:.4f} "
          f"(T = {t:.2f})")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--copies", type=int, default=20, help="copies of the 999-row sample (default 20)")
    args = parser.parse_args()
    datasets.disable_progress_bars()
    df, _ = load_arena(SAMPLE)
    with tempfile.TemporaryDirectory() as tmp:
        datasets.config.HF_DATASETS_CACHE = str(Path(tmp) / "cache")
        n = write_parquet(df, args.copies, Path(tmp) / "arena.parquet")
        start = time.perf_counter()
        extra, report = load_extra(Path(tmp) / "arena.parquet", exclude=[SAMPLE])
        seconds = time.perf_counter() - start
    print(report)
    print(f"load_extra: {n} rows in {seconds:.1f} s = {n / seconds:,.0f} rows/s (parquet conversion by datasets "
          f"included, exclude file read included)")
    blend_figures(df)


if __name__ == "__main__":
    main()

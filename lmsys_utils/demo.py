"""Synthetic demo data in the competition's format, made by the project so a fresh clone runs end to end.

The rows are clearly synthetic (model names start with `demo-`) but have the real data's structure:
JSON lists of turns, multi-turn rows, null turns, non-ASCII text and ties. The label follows a learnable
signal: a helpful, specific response beats a vague or refusing one; equal quality is most often a tie.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .data import LABEL_COLUMNS, to_competition_csv

_TOPICS = [
    "sorting a list in Python", "the water cycle", "baking sourdough bread", "the French Revolution",
    "compound interest", "photosynthesis", "writing a cover letter", "black holes", "la cuisine française",
    "東京の観光", "learning to juggle", "binary search", "the history of tea", "training for a marathon",
    "choosing a laptop", "the Pythagorean theorem", "résumé tips", "coral reefs", "Ünïcödé normalisation",
    "planning a trip to Kraków", "prime numbers", "making cold brew coffee ☕", "electric cars", "haiku",
]
_ASK = [
    "Can you explain {t}?", "Tell me about {t}.", "What should I know about {t}?",
    "Give me a short guide to {t}.", "Why does {t} matter?",
]
_FOLLOW_UP = ["Can you give an example?", "Make it shorter please.", "What is a common mistake?", "Merci !"]
_GOOD = [
    "Sure! Here is a clear answer about {t}.\n\n1. Start with the key idea.\n2. Then look at an example.\n"
    "3. Finally, check the common mistakes.\n\nI hope this helps, happy to go deeper.",
    "Great question. {t} comes down to three points: the definition, a worked example and a practical "
    "tip. For example, step by step, you can see how each part fits. Let me know if you want more detail.",
    "Here is a concise, accurate overview of {t}:\n- what it is\n- how it works\n- why it matters\n"
    "Example included below, with a short summary at the end.",
]
_BAD = [
    "I cannot help with that request.",
    "Not sure. {t}? Maybe look it up somewhere.",
    "As an AI I have no opinion on {t}.",
    "{t} is something. It depends.",
]
_MODELS = {  # name -> probability of a helpful answer
    "demo-model-alpha": 0.8, "demo-model-beta": 0.6, "demo-model-gamma": 0.45, "demo-model-delta": 0.25,
}


def make_demo_data(n_rows: int = 800, seed: int = 0, labeled: bool = True) -> pd.DataFrame:
    """Return `n_rows` synthetic battles as parsed rows (lists of turns), deterministic for a seed."""
    rng = np.random.default_rng(seed)
    names = list(_MODELS)
    rows = []
    for i in range(n_rows):
        topic = _TOPICS[rng.integers(len(_TOPICS))]
        n_turns = 1 if rng.random() < 0.85 else int(rng.integers(2, 4))
        prompt = [_ASK[rng.integers(len(_ASK))].format(t=topic)]
        prompt += [_FOLLOW_UP[rng.integers(len(_FOLLOW_UP))] for _ in range(n_turns - 1)]
        model_a, model_b = rng.choice(names, size=2, replace=False)
        good_a, good_b = rng.random() < _MODELS[model_a], rng.random() < _MODELS[model_b]
        response_a = _respond(rng, topic, good_a, n_turns)
        response_b = _respond(rng, topic, good_b, n_turns)
        row = {"id": 9_000_000 + i, "model_a": model_a, "model_b": model_b,
               "prompt": prompt, "response_a": response_a, "response_b": response_b}
        if labeled:
            row.update(zip(LABEL_COLUMNS, _label(rng, good_a, good_b)))
        rows.append(row)
    return pd.DataFrame(rows)


def _respond(rng, topic: str, good: bool, n_turns: int) -> list:
    pool = _GOOD if good else _BAD
    turns = [pool[rng.integers(len(pool))].format(t=topic) for _ in range(n_turns)]
    if rng.random() < 0.02:  # the real data has JSON null turns
        turns[-1] = None
    return turns


def _label(rng, good_a: bool, good_b: bool) -> tuple:
    if good_a != good_b:
        p = [0.82, 0.06, 0.12] if good_a else [0.06, 0.82, 0.12]
    else:
        p = [0.2, 0.2, 0.6]
    winner = rng.choice(3, p=p)
    return tuple(int(k == winner) for k in range(3))


def write_demo_data(out_dir, n_train: int = 800, n_test: int = 100, seed: int = 0) -> tuple[Path, Path]:
    """Write `train.csv` and `test.csv` (no labels) in the competition's format; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train = make_demo_data(n_train, seed)
    test = make_demo_data(n_test, seed + 1, labeled=False).drop(columns=["model_a", "model_b"])
    test["id"] += n_train
    train_path, test_path = out_dir / "train.csv", out_dir / "test.csv"
    to_competition_csv(train, train_path)
    to_competition_csv(test, test_path)
    return train_path, test_path

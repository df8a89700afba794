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


def run_demo(out_dir="runs/demo", data=None, max_steps: int | None = None, seed: int = 0) -> dict:
    """The main job end to end on CPU: data check, EDA figures, training of the tiny model with the step bar,
    evaluation on a held-out split against the uniform guess and the class prior, a checked submission.

    Args:
        data: a competition-format train CSV to use instead of the synthetic demo data.
        max_steps: stop training after this many steps (default: three epochs).
    Returns the metrics written to `out_dir/metrics.json`.
    """
    import dataclasses
    import json

    from .config import Config
    from .data import load_arena, split_train_valid
    from .metrics import accuracy, log_loss
    from .model import build_tiny_model, load_tokenizer
    from .plots import plot_confusion_matrix, plot_history, plot_reliability, save_eda_figures, token_lengths
    from .predict import load_models, predict, predict_proba
    from .train import train

    out = Path(out_dir)
    if data:
        train_path, test_path = Path(data), None
    else:
        train_path, test_path = write_demo_data(out / "data", seed=seed)
    df, summary = load_arena(train_path)
    print(summary)

    # the held-out split is never seen in training (training makes its own validation split from the rest)
    rest, holdout = split_train_valid(df, valid_frac=0.15, seed=seed)
    (out / "data").mkdir(parents=True, exist_ok=True)
    to_competition_csv(rest, out / "data" / "train_split.csv")
    to_competition_csv(holdout, out / "data" / "holdout.csv")

    model_dir = build_tiny_model(out / "tiny_model", seed=seed)
    tokenizer = load_tokenizer(model_dir)
    figures = save_eda_figures(df, out / "figures", lengths=token_lengths(tokenizer, df),
                               max_lengths=(128, 256, 512), tokenizer_name="tiny BPE")
    print(f"\nEDA: {len(figures)} figures in {out / 'figures'}\n")

    config = Config(
        train_path=str(out / "data" / "train_split.csv"), output_dir=str(out / "run"), model=str(model_dir),
        device="cpu", memory_target="cpu", valid_frac=0.1, max_length=256, batch_size=16, grad_accum=1,
        epochs=3, max_steps=max_steps, lr=3e-3, warmup_steps=10, lora_r=16, lora_alpha=32, lora_dropout=0.0,
        log_every=5, eval_every=20, save_every=None, seed=seed,
    )
    history = train(config)

    models, tokenizer = load_models(model_dir, adapter=out / "run" / "adapter", device_kind="cpu")
    probs = predict_proba(models, tokenizer, holdout, max_length=config.max_length, device_kind="cpu")
    y = holdout["label"].to_numpy()
    prior = np.bincount(rest["label"], minlength=3) / len(rest)
    metrics = {
        "holdout_rows": len(holdout),
        "holdout_log_loss": log_loss(y, probs),
        "holdout_accuracy": accuracy(y, probs),
        "uniform_log_loss": log_loss(y, np.full((len(y), 3), 1 / 3)),
        "class_prior_log_loss": log_loss(y, np.tile(prior, (len(y), 1))),
        "best_valid_log_loss": history["best_log_loss"],
        "train_steps": history["total_steps"],
        "compile_s": history["compile_s"],
        "step_s": history["step_s"],
        "config": dataclasses.asdict(config),
    }
    for name, fig in {"history": plot_history(history), "reliability": plot_reliability(y, probs),
                      "confusion": plot_confusion_matrix(y, probs)}.items():
        fig.savefig(out / "figures" / f"{name}.png", dpi=110)

    submission = predict(test_path or out / "data" / "holdout.csv", str(model_dir), adapter=out / "run" / "adapter",
                         out=out / "submission.csv", max_length=config.max_length, device_kind="cpu",
                         memory_target="cpu", progress=False)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"""
held-out log loss {metrics['holdout_log_loss']:.4f} (accuracy {metrics['holdout_accuracy']:.3f}) on {len(y)} rows;
  uniform guess {metrics['uniform_log_loss']:.4f}, class prior {metrics['class_prior_log_loss']:.4f}
outputs in {out}/:
  data/            demo train/test CSVs and the held-out split
  figures/         {len(figures) + 3} PNGs (EDA, loss/lr, reliability, confusion matrix)
  run/adapter/     the LoRA adapter, score head and tokenizer; run/history.json; run/checkpoints/
  submission.csv   {len(submission)} rows, checked
  metrics.json     the figures above""")
    return metrics

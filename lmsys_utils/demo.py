"""The main job on a fresh clone, end to end on the CPU: synthetic data, EDA figures, training of the tiny
model with the step bar, held-out evaluation against the uniform guess and the class prior, a checked submission."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from .blend import cross_validate
from .config import Config
from .data import load_arena, split_train_valid, to_competition_csv
from .device import resolve
from .files import check_writable
from .metrics import accuracy, log_loss
from .model import load_tokenizer
from .plots import plot_confusion_matrix, plot_history, plot_reliability, save_eda_figures, token_lengths
from .predict import compare_rules, load_models, predict, predict_proba
from .synthetic import build_tiny_model, write_demo_data
from .train import train


def run_demo(out_dir="runs/demo", data=None, max_steps: int | None = None, seed: int = 0) -> dict:
    """The main job end to end on CPU: data check, EDA figures, training of the tiny model with the step bar,
    evaluation on a held-out split against the uniform guess and the class prior, a checked submission.

    Args:
        data: a competition-format train CSV to use instead of the synthetic demo data.
        max_steps: stop training after this many steps (default: three epochs).
    Returns the metrics written to `out_dir/metrics.json`.
    """
    out = check_writable(out_dir)  # a file there, or a folder nobody may write: refused before any work
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
        log_every=5, eval_every=20, save_every=None, seed=seed, overwrite=True,  # the demo replaces its own run
    )
    history = train(config)

    runtime = resolve("cpu")
    loaded = load_models(model_dir, adapter=out / "run" / "adapter", runtime=runtime)
    probs = predict_proba(loaded[0], loaded[1], holdout, loaded[2], runtime)
    y = holdout["label"].to_numpy()
    rules = compare_rules(holdout, probs)
    # temperature scaling, cross-validated on the held-out rows (fitted on 4/5, scored on the rest)
    calibration = cross_validate(y, [probs], folds=5, seed=seed)
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
        "rules": rules,
        "calibrated_holdout_log_loss": calibration["calibrated"],
        "config": dataclasses.asdict(config),
    }
    for name, fig in {"history": plot_history(history), "reliability": plot_reliability(y, probs),
                      "confusion": plot_confusion_matrix(y, probs)}.items():
        fig.savefig(out / "figures" / f"{name}.png", dpi=110)

    submission = predict(test_path or out / "data" / "holdout.csv", str(model_dir), adapter=out / "run" / "adapter",
                         out=out / "submission.csv", device="cpu", progress=False, loaded=loaded)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"""
held-out log loss {metrics['holdout_log_loss']:.4f} (accuracy {metrics['holdout_accuracy']:.3f}) on {len(y)} rows;
  uniform guess {metrics['uniform_log_loss']:.4f}, class prior {metrics['class_prior_log_loss']:.4f};
  temperature-scaled (5-fold cross-validated on these rows) {calibration['calibrated']:.4f};
  with the identical/empty-response rules {rules['log_loss_with_rules']:.4f} ({rules['rows_changed']} rows changed)
outputs in {out}/:
  data/            demo train/test CSVs and the held-out split
  figures/         {len(figures) + 3} PNGs (EDA, loss/lr, reliability, confusion matrix)
  run/adapter/     the LoRA adapter, score head and tokenizer; run/history.json; run/checkpoints/
  submission.csv   {len(submission)} rows, checked
  metrics.json     the figures above""")
    return metrics

"""Log loss as the competition scores it, and accuracy."""

import numpy as np

EPS = 1e-15


def normalize_probs(probs, eps: float = EPS) -> np.ndarray:
    """Rescale each row to sum to 1, clip to [eps, 1 - eps] so no log is infinite, and rescale again."""
    p = np.asarray(probs, dtype=np.float64)
    p = np.clip(p / p.sum(axis=1, keepdims=True), eps, 1 - eps)
    return p / p.sum(axis=1, keepdims=True)


def as_target_probs(targets, n_classes: int = 3) -> np.ndarray:
    """Targets as (N, n_classes) probabilities: class ids become one-hot rows, probability rows stay."""
    t = np.asarray(targets)
    return np.eye(n_classes)[t.astype(int)] if t.ndim == 1 else t.astype(np.float64)


def log_loss(targets, probs, eps: float = EPS) -> float:
    """Multi-class log loss.

    Args:
        targets: class ids of shape (N,) or target probabilities of shape (N, 3).
        probs: predicted probabilities (N, 3); clipped and row-normalised first, as Kaggle does.
    """
    p = normalize_probs(probs, eps)
    t = as_target_probs(targets, p.shape[1])
    if t.shape != p.shape:
        raise ValueError(f"targets have shape {t.shape} but probabilities {p.shape}")
    return float(-(t * np.log(p)).sum(axis=1).mean())


def accuracy(targets, probs) -> float:
    """Share of rows whose most probable class is the (most probable) target class."""
    t = as_target_probs(targets, np.shape(probs)[1]).argmax(axis=1)
    return float((np.asarray(probs).argmax(axis=1) == t).mean())

"""Log loss as the competition scores it, and accuracy."""

import numpy as np

EPS = 1e-15


def normalize_probs(probs, eps: float = EPS) -> np.ndarray:
    """Rescale each row to sum to 1, clip to [eps, 1 - eps] so no log is infinite, and rescale again."""
    p = np.asarray(probs, dtype=np.float64)
    p = np.clip(p / p.sum(axis=1, keepdims=True), eps, 1 - eps)
    return p / p.sum(axis=1, keepdims=True)


def log_loss(targets, probs, eps: float = EPS) -> float:
    """Multi-class log loss.

    Args:
        targets: class ids of shape (N,) or target probabilities of shape (N, 3).
        probs: predicted probabilities (N, 3); clipped and row-normalised first, as Kaggle does.
    """
    p = normalize_probs(probs, eps)
    t = np.asarray(targets)
    if t.ndim == 1:
        t = np.eye(p.shape[1])[t.astype(int)]
    if t.shape != p.shape:
        raise ValueError(f"targets have shape {t.shape} but probabilities {p.shape}")
    return float(-(t * np.log(p)).sum(axis=1).mean())


def accuracy(targets, probs) -> float:
    """Share of rows whose most probable class is the (most probable) target class."""
    t = np.asarray(targets)
    if t.ndim == 2:
        t = t.argmax(axis=1)
    return float((np.asarray(probs).argmax(axis=1) == t).mean())

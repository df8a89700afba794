"""Blend out-of-fold predictions: non-negative weights on the models' log-probabilities and one temperature,
fitted by log loss, with cross-validated figures so a gain is not fitted noise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from .data import LABEL_COLUMNS, ArenaDataError, read_id_table, read_probabilities
from .metrics import log_loss, normalize_probs
from .predict import predict, read_file_ids, write_submission


def read_preds(path) -> tuple[pd.Series, np.ndarray]:
    """Ids and probabilities (rows renormalized) of a submission-format file `id,winner_model_a,...`."""
    return read_probabilities(path, "predictions")


def read_labels(path) -> tuple[pd.Series, np.ndarray]:
    """Ids and class ids (0 A, 1 B, 2 tie) of a labeled file: train.csv or any CSV with id and the winner_* columns."""
    path = Path(path)
    raw = read_id_table(path, "labels")
    values = raw[list(LABEL_COLUMNS)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isin(values, (0.0, 1.0)).all(axis=1) | (values.sum(axis=1) != 1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ArenaDataError(f"{path}: {bad.sum()} row(s) are not one-hot labels, first at row {row + 1}, id "
                             f"{raw['id'][row]}: {raw.loc[row, list(LABEL_COLUMNS)].tolist()}.")
    return raw["id"], values.argmax(axis=1)


def align_preds(paths) -> tuple[pd.Series, list[np.ndarray]]:
    """Read prediction files whose id sets must all equal the first's; rows follow the first file's order."""
    ids, first = read_preds(paths[0])
    preds = [first]
    for path in paths[1:]:
        other_ids, probs = read_preds(path)
        _check_same_ids(ids, paths[0], other_ids, path)
        preds.append(probs[pd.Index(other_ids).get_indexer(ids)])
    return ids, preds


def _check_same_ids(ids, name, other_ids, other_name) -> None:
    missing, extra = ids[~ids.isin(other_ids)], other_ids[~other_ids.isin(ids)]
    if len(missing) or len(extra):
        raise ArenaDataError(f"{other_name}: ids differ from {name}: {len(missing)} missing ({_show(missing)}), "
                             f"{len(extra)} extra ({_show(extra)}); predict the same rows in every file.")


def _refuse_overwrite(out, inputs) -> None:
    out = Path(out)
    if out.exists() and any(Path(p).exists() and out.samefile(p) for p in inputs):
        raise ArenaDataError(f"{out}: --out is one of the input files; choose another path.")


def _show(values, n: int = 5) -> str:
    values = list(values)
    return ", ".join(map(str, values[:n])) + (" ..." if len(values) > n else "") if values else "none"


def _objective(v, logs, targets):
    """Log loss of softmax(sum_k v_k log p_k) and its gradient in v."""
    z = np.tensordot(v, logs, axes=1)
    z -= z.max(axis=1, keepdims=True)
    log_q = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    loss = -(targets * log_q).sum(axis=1).mean()
    diff = np.exp(log_q) - targets
    grad = np.einsum("knc,nc->k", logs, diff) / len(targets)
    return loss, grad


def fit_blend(labels, preds, temperature: bool = True) -> dict:
    """Weights (non-negative, summing to 1) on the models' log-probabilities and a temperature, by log loss.

    Blend = softmax(sum_k w_k log p_k / T). With one model this is temperature scaling alone.

    Args:
        labels: class ids (N,) or target probabilities (N, 3).
        preds: list of (N, 3) probabilities, one per model.
        temperature: fit T; False keeps T = 1 (the uncalibrated blend).
    """
    logs = np.stack([np.log(normalize_probs(p)) for p in preds])
    targets = np.asarray(labels)
    targets = np.eye(3)[targets.astype(int)] if targets.ndim == 1 else targets.astype(np.float64)
    n_models = len(preds)
    start = np.full(n_models, 1 / n_models)
    if temperature:
        # free non-negative v: weights v / sum(v), temperature 1 / sum(v)
        result = minimize(_objective, start, args=(logs, targets), jac=True, method="L-BFGS-B",
                          bounds=[(0, None)] * n_models)
    elif n_models == 1:
        return {"weights": [1.0], "temperature": 1.0}
    else:
        result = minimize(_objective, start, args=(logs, targets), jac=True, method="SLSQP",
                          bounds=[(0, 1)] * n_models,
                          constraints=[{"type": "eq", "fun": lambda v: v.sum() - 1, "jac": lambda v: np.ones_like(v)}])
    v = np.clip(result.x, 0, None)
    if v.sum() <= 0:
        raise ValueError("the blend found no useful model (all weights zero); check that the predictions "
                         "belong to these labels")
    return {"weights": (v / v.sum()).tolist(), "temperature": float(1 / v.sum())}


def apply_blend(blend: dict, preds) -> np.ndarray:
    """Blended probabilities (N, 3) of `preds` (one (N, 3) array per model, in the fitted order)."""
    weights = np.asarray(blend["weights"], dtype=np.float64)
    if len(weights) != len(preds):
        raise ValueError(f"the blend has {len(weights)} weights but {len(preds)} prediction inputs were given; "
                         "pass one file per model, in the order of the fit")
    logs = np.stack([np.log(normalize_probs(p)) for p in preds])
    z = np.tensordot(weights / blend["temperature"], logs, axes=1)
    q = np.exp(z - z.max(axis=1, keepdims=True))
    return q / q.sum(axis=1, keepdims=True)


def cross_validate(labels, preds, folds: int = 5, seed: int = 0) -> dict:
    """Cross-validated log loss of each input, the blend (T = 1) and the calibrated blend.

    The blends are fitted on folds-1 folds (stratified by label) and scored on the held-out one; the inputs
    are fitted on nothing, so theirs is their plain log loss.
    """
    labels = np.asarray(labels)
    classes = labels if labels.ndim == 1 else labels.argmax(axis=1)
    if len(labels) < 2 * folds:
        raise ValueError(f"{len(labels)} labeled rows are too few for {folds}-fold cross-validation")
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(labels), dtype=int)
    for c in np.unique(classes):
        rows = rng.permutation(np.flatnonzero(classes == c))
        fold_of[rows] = np.arange(len(rows)) % folds
    held_out = {"blend": np.empty((len(labels), 3)), "calibrated": np.empty((len(labels), 3))}
    for fold in range(folds):
        train, test = fold_of != fold, fold_of == fold
        for name, calibrate in (("blend", False), ("calibrated", True)):
            fitted = fit_blend(labels[train], [p[train] for p in preds], temperature=calibrate)
            held_out[name][test] = apply_blend(fitted, [p[test] for p in preds])
    return {"inputs": [log_loss(labels, p) for p in preds],
            **{name: log_loss(labels, probs) for name, probs in held_out.items()}}


def blend_files(labels_path, pred_paths, out, folds: int = 5, seed: int = 0) -> dict:
    """Fit the blend of prediction files on a labeled file, print the cross-validated log losses, save JSON."""
    _refuse_overwrite(out, [labels_path, *pred_paths])
    ids, preds = align_preds(pred_paths)
    label_ids, label_values = read_labels(labels_path)
    missing = ids[~ids.isin(label_ids)]
    if len(missing):
        raise ArenaDataError(f"{labels_path}: no label for {len(missing)} predicted id(s) ({_show(missing)}); "
                             "predictions must be of labeled rows (out-of-fold predictions of the training file).")
    labels = label_values[pd.Index(label_ids).get_indexer(ids)]
    print(f"{len(ids)} labeled rows predicted by {len(preds)} file(s) (of {len(label_ids)} in {labels_path})")
    cv = cross_validate(labels, preds, folds=folds, seed=seed)
    fitted = fit_blend(labels, preds)
    names = [str(p) for p in pred_paths]
    for name, loss in zip(names, cv["inputs"]):
        print(f"  log loss {loss:.4f}  {name}")
    if len(preds) > 1:
        print(f"  log loss {cv['blend']:.4f}  blend (T = 1), {folds}-fold cross-validated")
    print(f"  log loss {cv['calibrated']:.4f}  {'calibrated blend' if len(preds) > 1 else 'temperature-scaled'}, "
          f"{folds}-fold cross-validated")
    weights = ", ".join(f"{w:.3f}" for w in fitted["weights"])
    print(f"  weights {weights}; temperature {fitted['temperature']:.3f}")
    result = {**fitted, "inputs": names, "rows": len(ids), "folds": folds, "seed": seed,
              "cv_log_loss": {"inputs": dict(zip(names, cv["inputs"])), "blend": cv["blend"],
                              "calibrated": cv["calibrated"]}}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def apply_blend_files(blend_path, pred_paths, out, data=None) -> pd.DataFrame:
    """Blend test prediction files with a saved blend.json and write a checked submission.

    Args:
        data: the test CSV; when given, the submission must hold exactly its ids, in its order.
    """
    blend_path = Path(blend_path)
    if not blend_path.is_file():
        raise ArenaDataError(f"{blend_path}: no such blend file; write one with `blend --labels ... --out`.")
    try:
        blend = json.loads(blend_path.read_text())
        weights, temperature = blend["weights"], float(blend["temperature"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise ArenaDataError(f"{blend_path}: not a blend file (needs weights and temperature).") from None
    if len(weights) != len(pred_paths):
        fitted_on = ", ".join(blend.get("inputs", []))
        raise ArenaDataError(f"{blend_path} was fitted on {len(weights)} file(s) ({fitted_on}) but {len(pred_paths)} "
                             "--preds were given; pass one test file per model, in the same order.")
    _refuse_overwrite(out, [blend_path, *pred_paths, *([data] if data else [])])
    ids, preds = align_preds(pred_paths)
    probs = apply_blend({"weights": weights, "temperature": temperature}, preds)
    expected = ids
    if data is not None:
        expected = read_file_ids(data)
    return write_submission(ids, probs, out, expected_ids=expected)


def predict_blend(data_path, pairs, out, blend=None, work_dir=None, **predict_kwargs) -> pd.DataFrame:
    """Predict a test CSV with each (model, adapter) pair in turn, one model in memory at a time, and write one
    checked submission: their predictions blended with `blend` (a blend.json fitted on the same models'
    out-of-fold predictions, in the same order) or, without one, with equal weights on the log-probabilities.

    Each pair's own submission-format predictions stay in `work_dir` (default: beside `out`) as pred_<i>.csv.
    `predict_kwargs` go to `predict.predict` (tta, max_length, quantization, device, ...).
    """
    if not pairs:
        raise ValueError("predict_blend needs at least one (model, adapter) pair")
    out = Path(out)
    work = Path(work_dir) if work_dir else out.parent / f"{out.stem}_models"
    work.mkdir(parents=True, exist_ok=True)
    files = []
    for i, (model, adapter) in enumerate(pairs):
        files.append(work / f"pred_{i}.csv")
        print(f"model {i + 1} of {len(pairs)}: {model}" + (f" + {adapter}" if adapter else ""))
        predict(data_path, model, adapter=adapter, out=files[-1], **predict_kwargs)
    if blend is None:
        blend = work / "equal_weights.json"
        blend.write_text(json.dumps({"weights": [1 / len(files)] * len(files), "temperature": 1.0,
                                     "inputs": [str(f) for f in files]}, indent=2))
    return apply_blend_files(blend, files, out, data=data_path)

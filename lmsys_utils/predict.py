"""Class probabilities for Arena rows (length-sorted batches, A/B-swap TTA, one model copy per device) and a
submission file that is checked before it is written."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .auth import is_local, preflight
from .batching import inference_buckets, rows_per_batch, sorted_batches
from .config import DEFAULT_ENCODING, EncodingSettings
from .data import LABEL_COLUMNS, is_empty, load_arena, parse_ids, swap_ab, targets
from .device import Runtime, resolve
from .device import memory_target as this_machine
from .files import atomic_write, check_output_file
from .memory import check_fits, format_plan, plan_memory
from .metrics import log_loss, normalize_probs
from .model import check_max_length, load_for_inference
from .text import encode_rows

# Values winning solutions used for degenerate rows (see notes/ANCHORS.md); columns A, B, tie.
IDENTICAL_PROBS = (0.06, 0.06, 0.88)
A_EMPTY_PROBS = (0.04, 0.88, 0.08)


class SubmissionError(ValueError):
    """Probabilities or ids that would make an invalid submission; nothing was written."""


def predict_proba(model, tokenizer, df: pd.DataFrame, encoding: EncodingSettings, runtime: Runtime,
                  max_tokens: int = 16384, tta: bool = False, max_batch: int | None = None,
                  progress: bool = False) -> np.ndarray:
    """P(A wins), P(B wins), P(tie) per row, shape (N, 3), in the order of `df`.

    Args:
        model: a sequence classifier, or a list of copies, one per device (e.g. Kaggle's 2x T4); each copy
            runs in its own thread and takes the next batch as it frees up.
        encoding: how rows become model input: the settings saved with the adapter (`load_models`).
        runtime: from `device.resolve`; on XLA batches are padded to fixed buckets so each shape compiles once.
        max_tokens: token budget per batch (rows x padded length), so long rows don't run out of memory.
        tta: also predict the A/B-swapped rows and average (doubles the cost).
    """
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    seqs = encode_rows(tokenizer, df, **encoding.as_kwargs())
    if tta:
        seqs += encode_rows(tokenizer, swap_ab(df), **encoding.as_kwargs())
    buckets = inference_buckets(encoding.max_length) if runtime.padding == "buckets" else None
    batches = sorted_batches(seqs, tokenizer.pad_token_id, max_tokens, max_batch=max_batch, buckets=buckets,
                             shards=runtime.shards)
    probs = _run_batches(models, batches, len(seqs), runtime, progress=progress)
    if tta:
        n = len(df)
        # a swapped row's "A wins" is the original's "B wins": exchange those columns before averaging
        probs = (probs[:n] + probs[n:][:, [1, 0, 2]]) / 2
    return probs


def _run_batches(models, batches, n_rows: int, runtime: Runtime, progress: bool) -> np.ndarray:
    """Feed the batches to the models, one thread per model copy; rows land at their original index."""
    probs = np.full((n_rows, 3), np.nan, dtype=np.float64)
    lock = threading.Lock()
    errors = []
    bar = tqdm(total=n_rows, desc="predict", unit="row", disable=not progress)

    def work(model):
        try:
            while True:
                with lock:  # the batch generator is shared; one batch at a time to each free device
                    item = next(batches, None)
                if item is None or errors:
                    return
                index, batch = item
                probs[index] = _forward(model, batch, runtime)[:len(index)]
                bar.update(len(index))
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(e)

    if len(models) == 1:
        work(models[0])
    else:
        threads = [threading.Thread(target=work, args=(m,), daemon=True) for m in models]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    bar.close()
    if errors:
        raise errors[0]
    return probs


def _forward(model, batch: dict, runtime: Runtime) -> np.ndarray:
    device = next(model.parameters()).device  # each copy of the model sits on its own GPU
    inputs = runtime.to_device(batch, device=device if runtime.kind != "xla" else None)
    # kernels that launch on the current GPU (bitsandbytes) must see this copy's GPU in this thread
    gpu = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with gpu, runtime.inference():
        probs = model(**inputs).logits.float().softmax(-1)
        runtime.sync()
        return probs.cpu().numpy()  # filler rows are dropped on the host: slicing on the device compiles per count


def apply_rules(df: pd.DataFrame, probs, identical=IDENTICAL_PROBS, a_empty=A_EMPTY_PROBS) -> np.ndarray:
    """Overwrite degenerate rows: identical responses -> `identical`; one empty response -> lean to the other.

    Off by default in `predict`: measure it on your validation predictions with `compare_rules` first.
    """
    probs = np.array(probs, dtype=np.float64, copy=True)
    empty_a = df["response_a"].map(is_empty).to_numpy(dtype=bool)
    empty_b = df["response_b"].map(is_empty).to_numpy(dtype=bool)
    same = (df["response_a"] == df["response_b"]).to_numpy(dtype=bool) | (empty_a & empty_b)
    probs[empty_a & ~same] = a_empty
    probs[empty_b & ~same] = np.asarray(a_empty)[[1, 0, 2]]
    probs[same] = identical
    return probs


def compare_rules(df: pd.DataFrame, probs, **rule_values) -> dict:
    """Log loss of `probs` on labeled rows with and without `apply_rules`, overall and on the rows it changes."""
    y = targets(df)
    probs = np.asarray(probs, dtype=np.float64)
    ruled = apply_rules(df, probs, **rule_values)
    changed = (ruled != probs).any(axis=1)
    result = {"rows": len(df), "rows_changed": int(changed.sum()),
              "log_loss": log_loss(y, probs), "log_loss_with_rules": log_loss(y, ruled)}
    if changed.any():
        result["changed_log_loss"] = log_loss(y[changed], probs[changed])
        result["changed_log_loss_with_rules"] = log_loss(y[changed], ruled[changed])
    return result


def write_submission(ids, probs, path, expected_ids=None) -> pd.DataFrame:
    """Check and write `id,winner_model_a,winner_model_b,winner_tie`; rows clipped and normalised to sum 1.

    Refuses (SubmissionError, before anything is written) non-finite or negative values, all-zero rows, a row
    count that differs from the ids, duplicate ids, and - given `expected_ids` (the test file's ids) - missing
    or extra ids, and a `path` that is a folder or an existing file other than a submission (files.check_output_file).
    Rows are written in the order of `expected_ids` when given, ids exactly as given (strings stay strings). The
    file is written to a temporary name and renamed (files.atomic_write, mode 0644 under the usual umask), so a
    failure never leaves a half-written submission.
    """
    ids = pd.Series(list(ids))
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != 3:
        raise SubmissionError(f"probabilities must have shape (rows, 3) for A, B, tie; got {probs.shape}")
    if len(probs) != len(ids):
        raise SubmissionError(f"{len(probs)} rows of probabilities for {len(ids)} ids; predict every id once")
    bad = ~np.isfinite(probs).all(axis=1)
    if bad.any():
        raise SubmissionError(f"{bad.sum()} row(s) hold NaN or inf (ids {_show(ids[bad])}); check the model "
                              "output (fp16 overflow?) before writing")
    bad = (probs < 0).any(axis=1)
    if bad.any():
        raise SubmissionError(f"{bad.sum()} row(s) hold negative values (ids {_show(ids[bad])}); these look like "
                              "logits - apply softmax first")
    bad = probs.sum(axis=1) <= 0
    if bad.any():
        raise SubmissionError(f"{bad.sum()} row(s) are all zero (ids {_show(ids[bad])}); no prediction was made")
    dup = ids[ids.duplicated()]
    if len(dup):
        raise SubmissionError(f"{len(dup)} duplicate id(s): {_show(dup)}; each test id must appear once")
    if expected_ids is not None:
        expected = pd.Series(list(expected_ids))
        missing, extra = expected[~expected.isin(ids)], ids[~ids.isin(expected)]
        if len(missing) or len(extra):
            raise SubmissionError(f"ids differ from the test file: {len(missing)} missing ({_show(missing)}), "
                                  f"{len(extra)} extra ({_show(extra)}); predict exactly the test file's rows")
        order = pd.Series(np.arange(len(ids)), index=ids.to_numpy())[expected.to_numpy()].to_numpy()
        ids, probs = expected, probs[order]
    sub = pd.DataFrame(normalize_probs(probs), columns=list(LABEL_COLUMNS))
    sub.insert(0, "id", ids.to_numpy())
    check_output_file(path, kind="submission")
    with atomic_write(path, newline="") as f:
        sub.to_csv(f, index=False)
    return sub


def _show(values, n: int = 5) -> str:
    values = list(values)
    return ", ".join(map(str, values[:n])) + (" ..." if len(values) > n else "") if values else "none"


def resolve_encoding(saved: EncodingSettings | None, max_length: int | None = None) -> EncodingSettings:
    """The encoding to predict with: the one saved with the adapter, changed only by an explicit override
    (printed); a model without saved settings gets the defaults, said so."""
    if saved is None:
        saved = DEFAULT_ENCODING
        print(f"no encoding settings saved with the model: using the defaults (max_length {saved.max_length}, "
              f"prompt_share {saved.prompt_share}, keep_tail {saved.keep_tail})")
    if max_length is not None and max_length != saved.max_length:
        print(f"max_length {max_length} (override; the model was trained with {saved.max_length})")
        saved = dataclasses.replace(saved, max_length=max_length)
    return saved


def predict(data_path, model, adapter=None, out="submission.csv", tta: bool = False, max_length: int | None = None,
            max_tokens: int = 16384, token=None, quantization: str | None = None, dtype="auto", device="auto",
            rules: bool = False, progress: bool = True, memory_target: str | None = None, force: bool = False,
            loaded=None) -> pd.DataFrame:
    """The inference entry point (CLI and notebook): load the model, predict a test CSV, write the submission.

    Args:
        model: hub id or local directory of the base model (or of a merged classifier).
        adapter: LoRA adapter directory written by training (None: `model` is a complete classifier).
        max_length: override the max_length saved with the adapter (printed when it differs).
        quantization: None, "8bit" or "4bit" (bitsandbytes, GPU).
        device: auto | cuda | xla | cpu. On CUDA every visible GPU gets its own copy of the model and a share
            of the rows.
        rules: apply `apply_rules` to degenerate rows (measure with `compare_rules` first).
        memory_target: what the memory plan checks before loading (default: this machine, see
            `device.memory_target`); a setup that cannot fit is refused unless `force`.
        loaded: (models, tokenizer, encoding) from `load_models`, to predict with models already in memory.
    """
    check_output_file(out, inputs=[data_path])  # before hours of prediction, not after
    if is_local(model):
        preflight(model)  # a missing or incomplete model folder: one clear message before anything loads
    df, _ = load_arena(data_path, drop_invalid=True, labels=False)
    runtime = resolve(device, dtype)
    if loaded is None:
        encoding = resolve_encoding(EncodingSettings.load(adapter), max_length)
        check_max_length(model, encoding.max_length, token=token)
        plan = plan_memory(model, memory_target or this_machine(runtime.kind), quantization=quantization,
                           batch_size=rows_per_batch(max_tokens, encoding.max_length),
                           max_length=encoding.max_length, token=token)
        print(format_plan(check_fits(plan, force=force)))
        models, tokenizer, _ = load_models(model, adapter, token=token, runtime=runtime, quantization=quantization,
                                           placement=plan.placement)
    else:
        models, tokenizer, saved = loaded
        encoding = resolve_encoding(saved, max_length)
    probs = predict_proba(models, tokenizer, df, encoding, runtime, max_tokens=max_tokens, tta=tta,
                          progress=progress)
    if rules:
        probs = apply_rules(df, probs)
    ids, expected = df["id"], read_file_ids(data_path)
    dropped = expected[~expected.isin(ids)]
    if len(dropped):
        # a row the parser cannot read still needs a line in the submission: give it the uniform guess
        print(f"warning: {len(dropped)} unreadable row(s) predicted as uniform (ids {_show(dropped)})")
        ids = pd.concat([ids, dropped], ignore_index=True)
        probs = np.vstack([probs, np.full((len(dropped), 3), 1 / 3)])
    return write_submission(ids, probs, out, expected_ids=expected)


def load_models(name_or_path, adapter=None, token=None, runtime: Runtime | None = None,
                quantization: str | None = None, placement: str | None = None):
    """(models, tokenizer, encoding) to predict with: one model copy per visible GPU on CUDA (Kaggle's 2x T4),
    or with placement="split" (a copy does not fit one GPU) one model split across them; one copy sharded over
    all devices on XLA; one on CPU. `encoding` is what the adapter saved (None without one)."""
    runtime = runtime or resolve()
    kwargs = dict(adapter_dir=adapter, token=token, dtype=runtime.dtype, kind=runtime.kind,
                  quantization=quantization)
    if runtime.kind == "cuda" and placement == "split":
        # layers spread over the GPUs in turn: it fits, but only one GPU works at a time
        model, tokenizer, encoding = load_for_inference(name_or_path, **kwargs, device_map="auto")
        return [model], tokenizer, encoding
    if runtime.kind == "cuda":
        loaded = [load_for_inference(name_or_path, **kwargs, device_map={"": i})
                  for i in range(torch.cuda.device_count())]
        return [m for m, _, _ in loaded], loaded[0][1], loaded[0][2]
    model, tokenizer, encoding = load_for_inference(name_or_path, **kwargs)
    return [runtime.prepare_model(model)], tokenizer, encoding


def read_file_ids(path) -> pd.Series:
    """Every id of a CSV, exactly as written (the ids a submission for it must hold)."""
    # read as load_arena reads (compression inferred, bad bytes replaced) so both see the same ids
    raw = pd.read_csv(path, usecols=["id"], dtype=str, keep_default_na=False, encoding="utf-8-sig",
                      encoding_errors="replace")
    return parse_ids(raw["id"], Path(path))

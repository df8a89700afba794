"""Class probabilities for Arena rows (length-sorted batches, A/B-swap TTA, one model copy per device) and a
submission file that is checked before it is written."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import numpy as np
import pandas as pd

from .data import LABEL_COLUMNS, is_empty, load_arena, parse_ids, swap_ab
from .files import atomic_write, check_output_file
from .metrics import log_loss, normalize_probs

# Values winning solutions used for degenerate rows (see notes/ANCHORS.md); columns A, B, tie.
IDENTICAL_PROBS = (0.06, 0.06, 0.88)
A_EMPTY_PROBS = (0.04, 0.88, 0.08)
XLA_BUCKETS = (256, 512, 1024, 1536, 2048, 3072, 4096)


class SubmissionError(ValueError):
    """Probabilities or ids that would make an invalid submission; nothing was written."""


def predict_proba(model, tokenizer, df: pd.DataFrame, max_length: int = 1024, max_tokens: int = 16384,
                  tta: bool = False, device_kind: str | None = None, buckets=None, max_batch: int | None = None,
                  prompt_share: float = 0.3, keep_tail: int = 0, progress: bool = False) -> np.ndarray:
    """P(A wins), P(B wins), P(tie) per row, shape (N, 3), in the order of `df`.

    Args:
        model: a sequence classifier, or a list of copies, one per device (e.g. Kaggle's 2x T4); each copy
            runs in its own thread and takes the next batch as it frees up.
        max_tokens: token budget per batch (rows x padded length), so long rows don't run out of memory.
        tta: also predict the A/B-swapped rows and average (doubles the cost).
        device_kind: "xla" pads batches to fixed `buckets` so each shape compiles once (default: detect()).
        buckets: padded lengths on XLA (default: XLA_BUCKETS up to max_length, plus max_length).
    """
    from .batching import sorted_batches
    from .device import detect, num_data_shards
    from .text import encode_rows

    models = list(model) if isinstance(model, (list, tuple)) else [model]
    device_kind = device_kind or detect()
    if device_kind == "xla" and buckets is None:
        buckets = sorted({b for b in XLA_BUCKETS if b < max_length} | {max_length})
    seqs = encode_rows(tokenizer, df, max_length, prompt_share=prompt_share, keep_tail=keep_tail)
    if tta:
        seqs += encode_rows(tokenizer, swap_ab(df), max_length, prompt_share=prompt_share, keep_tail=keep_tail)
    batches = sorted_batches(seqs, tokenizer.pad_token_id, max_tokens, max_batch=max_batch,
                             buckets=list(buckets) if buckets else None)
    rows_for = None
    if buckets:
        shards = num_data_shards(device_kind)

        def rows_for(length):
            # XLA compiles one graph per shape, so every batch of a bucket length gets the same row count,
            # a multiple of the devices the batch is split over under SPMD
            rows = max(1, min(max_tokens // length, max_batch or max_tokens))
            return -(-rows // shards) * shards
    probs = _run_batches(models, batches, len(seqs), device_kind, rows_for, progress=progress)
    if tta:
        n = len(df)
        # a swapped row's "A wins" is the original's "B wins": exchange those columns before averaging
        probs = (probs[:n] + probs[n:][:, [1, 0, 2]]) / 2
    return probs


def _run_batches(models, batches, n_rows: int, device_kind: str, rows_for, progress: bool) -> np.ndarray:
    """Feed the batches to the models, one thread per model copy; rows land at their original index."""
    from tqdm.auto import tqdm

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
                probs[index] = _forward(model, batch, device_kind, rows_for)
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


def _forward(model, batch: dict, device_kind: str, rows_for) -> np.ndarray:
    import torch

    from .device import sync, to_device

    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows = len(ids)
    full = rows_for(ids.shape[1]) if rows_for else rows
    if full > rows:
        # the short last batch of a bucket is filled up with copies of its last row (outputs dropped) so it
        # reuses the bucket's compiled graph
        ids, mask = (torch.cat([t, t[-1:].expand(full - rows, -1)]) for t in (ids, mask))
    device = next(model.parameters()).device  # each copy of the model sits on its own GPU
    if device_kind == "xla":
        inputs = to_device({"input_ids": ids, "attention_mask": mask}, device_kind)
    else:
        inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    # kernels that launch on the current GPU (bitsandbytes) must see this copy's GPU in this thread
    gpu = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    # torch_xla rejects inference tensors ("Cannot set version_counter for inference tensor")
    with gpu, torch.no_grad() if device_kind == "xla" else torch.inference_mode():
        logits = model(**inputs).logits
        probs = logits.float().softmax(-1)
        sync(device_kind)
        return probs.cpu().numpy()[:rows]  # slicing on the device would compile a graph per row count


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
    missing = [c for c in LABEL_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"compare_rules needs labeled rows; missing column(s) {', '.join(missing)}")
    targets = df[list(LABEL_COLUMNS)].to_numpy(dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    ruled = apply_rules(df, probs, **rule_values)
    changed = (ruled != probs).any(axis=1)
    result = {"rows": len(df), "rows_changed": int(changed.sum()),
              "log_loss": log_loss(targets, probs), "log_loss_with_rules": log_loss(targets, ruled)}
    if changed.any():
        result["changed_log_loss"] = log_loss(targets[changed], probs[changed])
        result["changed_log_loss_with_rules"] = log_loss(targets[changed], ruled[changed])
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


def predict(data_path, model, adapter=None, out="submission.csv", tta: bool = False, max_length: int = 1024,
            max_tokens: int = 16384, token=None, quantization: str | None = None, dtype=None,
            device_kind: str | None = None, rules: bool = False, progress: bool = True,
            memory_target: str | None = None, force: bool = False) -> pd.DataFrame:
    """The inference entry point (CLI and notebook): load the model, predict a test CSV, write the submission.

    Args:
        model: hub id or local directory of the base model (or of merged weights).
        adapter: LoRA adapter directory written by training (None: `model` is complete).
        quantization: None, "8bit" or "4bit" (bitsandbytes, GPU).
        device_kind: "cuda" | "xla" | "cpu" (default: detect()). On CUDA every visible GPU gets its own copy
            of the model and a share of the rows.
        rules: apply `apply_rules` to degenerate rows (measure with `compare_rules` first).
        memory_target: what the memory plan checks before loading (default: this machine, see
            `device.memory_target`); a setup that cannot fit is refused unless `force`.
    """
    from .device import detect
    from .device import memory_target as this_machine
    from .memory import check_fits, format_plan, plan_memory

    df, _ = load_arena(data_path, drop_invalid=True, labels=False)
    device_kind = device_kind or detect()
    plan = plan_memory(model, memory_target or this_machine(device_kind), quantization=quantization,
                       batch_size=max(1, max_tokens // max_length), max_length=max_length, token=token)
    print(format_plan(check_fits(plan, force=force)))
    models, tokenizer = load_models(model, adapter, token=token, dtype=dtype, device_kind=device_kind,
                                    quantization=quantization, placement=plan.placement)
    probs = predict_proba(models, tokenizer, df, max_length=max_length, max_tokens=max_tokens, tta=tta,
                          device_kind=device_kind, progress=progress)
    if rules:
        probs = apply_rules(df, probs)
    ids, expected = df["id"], _file_ids(data_path)
    dropped = expected[~expected.isin(ids)]
    if len(dropped):
        # a row the parser cannot read still needs a line in the submission: give it the uniform guess
        print(f"warning: {len(dropped)} unreadable row(s) predicted as uniform (ids {_show(dropped)})")
        ids = pd.concat([ids, dropped], ignore_index=True)
        probs = np.vstack([probs, np.full((len(dropped), 3), 1 / 3)])
    return write_submission(ids, probs, out, expected_ids=expected)


def load_models(name_or_path, adapter=None, token=None, dtype=None, device_kind: str = "cpu",
                quantization: str | None = None, placement: str | None = None):
    """The model(s) to predict with and the tokenizer: one copy per visible GPU on CUDA (Kaggle's 2x T4),
    or with placement="split" (a copy does not fit one GPU) one model split across them; one copy sharded
    over all devices on XLA; one on CPU."""
    import torch

    from .device import prepare_model
    from .model import load_for_inference

    kwargs = dict(adapter_dir=adapter, token=token, dtype=dtype, device_kind=device_kind, quantization=quantization)
    if device_kind == "cuda" and placement == "split":
        # layers spread over the GPUs in turn: it fits, but only one GPU works at a time
        model, tokenizer = load_for_inference(name_or_path, **kwargs, device_map="auto")
        return [model], tokenizer
    if device_kind == "cuda":
        loaded = [load_for_inference(name_or_path, **kwargs, device_map={"": i})
                  for i in range(torch.cuda.device_count())]
        return [m for m, _ in loaded], loaded[0][1]
    model, tokenizer = load_for_inference(name_or_path, **kwargs)
    return [prepare_model(model, device_kind) if device_kind == "xla" else model], tokenizer


def _file_ids(path) -> pd.Series:
    # read as load_arena reads (compression inferred, bad bytes replaced) so both see the same ids
    raw = pd.read_csv(path, usecols=["id"], dtype=str, keep_default_na=False, encoding="utf-8-sig",
                      encoding_errors="replace")
    return parse_ids(raw["id"], Path(path))

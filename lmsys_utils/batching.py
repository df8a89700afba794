"""Batches of encoded rows: fixed shapes for XLA training, length-sorted token-budget batches for inference."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch


XLA_BUCKETS = (256, 512, 1024, 1536, 2048, 3072, 4096)
"""Padded lengths for inference on XLA (each compiles once); max_length is always added as the last one."""


def pad_batch(seqs, pad_id: int, length: int | None = None, rows: int | None = None) -> dict:
    """Right-pad rows into {"input_ids", "attention_mask"} LongTensors.

    Args:
        length: pad to exactly this many columns (static shapes for XLA); None pads to the longest row.
        rows: fill a short batch up to this many rows with copies of its last row (their outputs are dropped),
            so it reuses the compiled graph of full batches.
    """
    if rows is not None and len(seqs) < rows:
        seqs = list(seqs) + [seqs[-1]] * (rows - len(seqs))
    longest = max((len(s) for s in seqs), default=0)
    if length is None:
        length = longest
    elif longest > length:
        raise ValueError(f"a row has {longest} tokens but the batch is padded to {length}; "
                         "encode with max_length <= the padded length")
    input_ids = np.full((len(seqs), length), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(seqs), length), dtype=np.int64)
    for i, s in enumerate(seqs):
        input_ids[i, :len(s)] = s
        attention_mask[i, :len(s)] = 1
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask)}


def rows_per_batch(max_tokens: int, length: int, shards: int = 1, max_batch: int | None = None) -> int:
    """Rows of `length` tokens in a batch of at most `max_tokens` (at least one), rounded up to a multiple of
    the `shards` devices a batch is split over."""
    rows = max(1, min(max_tokens // max(length, 1), max_batch or max_tokens))
    return -(-rows // shards) * shards


def inference_buckets(max_length: int) -> list[int]:
    """The padded lengths for inference on XLA: XLA_BUCKETS below max_length, then max_length."""
    return sorted({b for b in XLA_BUCKETS if b < max_length} | {max_length})


def bucket_length(n: int, buckets) -> int:
    """The smallest bucket length >= n."""
    fits = [b for b in buckets if b >= n]
    if not fits:
        raise ValueError(f"a row of {n} tokens is longer than the largest bucket {max(buckets)}; "
                         "add a bucket >= max_length")
    return min(fits)


def num_train_batches(n_rows: int, batch_size: int) -> int:
    """Full batches per epoch (the last partial batch is dropped)."""
    return n_rows // batch_size


def train_batches(seqs, targets, batch_size: int, pad_id: int, length: int | None, seed: int, epoch: int,
                  start: int = 0, buckets=None) -> Iterator[dict]:
    """One epoch of shuffled training batches with {"input_ids", "attention_mask", "labels"}.

    The order depends only on (seed, epoch), so a resumed run sees the same batches. The last partial
    batch is dropped so that every batch has the same number of rows (one compiled graph on XLA).

    Args:
        targets: (N, 3) target probabilities (A wins, B wins, tie); returned as float32 `labels`.
        length: pad every batch to this many tokens (XLA); None pads to the longest row of each batch.
        start: skip the first `start` batches of the epoch (resume mid-epoch).
        buckets: pad each batch to the smallest of these lengths that fits (a few graphs instead of one
            padded to the maximum); overrides `length`.
    """
    targets = np.asarray(targets, dtype=np.float32)
    if targets.shape != (len(seqs), 3):
        raise ValueError(f"targets must have shape ({len(seqs)}, 3), got {targets.shape}")
    if batch_size < 1 or len(seqs) < batch_size:
        raise ValueError(f"batch_size {batch_size} needs 1 <= batch_size <= the {len(seqs)} training rows")
    order = np.random.default_rng([seed, epoch]).permutation(len(seqs))
    for b in range(start, num_train_batches(len(seqs), batch_size)):
        idx = order[b * batch_size:(b + 1) * batch_size]
        rows = [seqs[i] for i in idx]
        pad_to = bucket_length(max(map(len, rows)), buckets) if buckets else length
        batch = pad_batch(rows, pad_id, pad_to)
        batch["labels"] = torch.from_numpy(targets[idx])
        yield batch


def sorted_batches(seqs, pad_id: int, max_tokens: int, max_batch: int | None = None,
                   buckets=None, shards: int = 1) -> Iterator[tuple[np.ndarray, dict]]:
    """Length-sorted batches (longest first) of at most `max_tokens` padded tokens each.

    Yields (original row indices, padded batch); write each batch's first len(indices) outputs to those
    indices to restore the input order. Longest first, so an out-of-memory error shows up on the first batch.
    A row longer than `max_tokens` goes alone in its batch.

    Args:
        max_batch: at most this many rows per batch.
        buckets: pad to the smallest bucket length that fits, and fill every batch of a bucket to the same
            row count (multiple of `shards`): each shape compiles once on XLA.
    """
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    order = np.argsort(-lengths, kind="stable")
    max_batch = max_batch or len(seqs)
    i = 0
    while i < len(order):
        width = bucket_length(int(lengths[order[i]]), buckets) if buckets else int(lengths[order[i]])
        # rows are sorted longest first, so the first row fixes the padded width of the batch
        rows = rows_per_batch(max_tokens, width, shards if buckets else 1, max_batch)
        idx = order[i:i + rows]
        yield idx, pad_batch([seqs[j] for j in idx], pad_id, width, rows=rows if buckets else None)
        i += rows

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


def choose_buckets(lengths, max_length: int, count: int = 6, multiple: int = 64) -> tuple[int, ...]:
    """The `count` padded lengths (multiples of `multiple`, max_length last) that pad `lengths` least.

    Exact: a dynamic programme over the candidate lengths. Lengths no row needs are left out, so a short
    training set may get fewer buckets (fewer graphs to compile on XLA).
    """
    cands = np.array(sorted({*range(multiple, max_length, multiple), max_length}), dtype=np.int64)
    lengths = np.minimum(np.asarray(lengths, dtype=np.int64), max_length)
    upto = np.searchsorted(np.sort(lengths), cands, side="right")  # rows a bucket at each candidate would hold
    n = len(cands)
    # cost[i]: fewest padded tokens for the rows <= cands[i] with the buckets so far, the longest at cands[i]
    cost, back = upto * cands, []
    for _ in range(max(count, 1) - 1):
        # [i, j]: a bucket at cands[i] on top of the best ones ending at cands[j] (j == i: no new bucket)
        total = cost[None, :] + (upto[:, None] - upto[None, :]) * cands[:, None]
        total[np.triu_indices(n, 1)] = np.iinfo(np.int64).max
        back.append(total.argmin(axis=1))
        cost = total[np.arange(n), back[-1]]
    chosen, i = {n - 1}, n - 1
    for prev in reversed(back):
        i = int(prev[i])
        chosen.add(i)
    chosen = sorted(chosen)
    counts = np.diff(np.concatenate([[0], upto[chosen]]))
    return tuple(int(cands[c]) for c, rows in zip(chosen, counts) if rows or c == n - 1)


def num_train_batches(n_rows: int, batch_size: int, lengths=None, buckets=None, group: int = 1) -> int:
    """Full batches per epoch (the last partial batch, or step of `group` batches per bucket, is dropped)."""
    if not buckets:
        return n_rows // batch_size
    return sum(len(idx) for idx in _bucket_steps(np.asarray(lengths), batch_size * group, buckets,
                                                 np.random.default_rng(0))[1]) // batch_size


def _bucket_steps(lengths, step_rows: int, buckets, rng) -> tuple[list, list]:
    """(width, row indices) of every step of `step_rows` rows, drawn within a bucket, shortest bucket first.

    Rows that make no full step in their bucket move up to the next longer one; only the longest bucket's
    remainder (fewer than step_rows rows) is dropped.
    """
    edges = np.sort(np.asarray(buckets, dtype=np.int64))
    if len(lengths) and lengths.max() > edges[-1]:
        raise ValueError(f"a row of {lengths.max()} tokens is longer than the largest bucket {edges[-1]}; "
                         "add a bucket >= max_length")
    home = np.searchsorted(edges, lengths)
    widths, steps, carry = [], [], np.zeros(0, dtype=np.int64)
    for b, width in enumerate(edges):
        rows = np.concatenate([carry, rng.permutation(np.flatnonzero(home == b))])
        full = len(rows) // step_rows * step_rows
        widths += [int(width)] * (full // step_rows)
        steps += [rows[i:i + step_rows] for i in range(0, full, step_rows)]
        carry = rows[full:]
    return widths, steps


def train_batches(seqs, targets, batch_size: int, pad_id: int, length: int | None, seed: int, epoch: int,
                  start: int = 0, buckets=None, group: int = 1) -> Iterator[dict]:
    """One epoch of shuffled training batches with {"input_ids", "attention_mask", "labels"}.

    The order depends only on (seed, epoch), so a resumed run sees the same batches. The last partial
    batch is dropped so that every batch has the same number of rows (one compiled graph on XLA).

    Args:
        targets: (N, 3) target probabilities (A wins, B wins, tie); returned as float32 `labels`.
        length: pad every batch to this many tokens (XLA); None pads to the longest row of each batch.
        start: skip the first `start` batches of the epoch (resume mid-epoch).
        buckets: padded lengths (see `choose_buckets`); overrides `length`. Each optimizer step's `group`
            batches are drawn from one bucket and padded to its length, and steps are shuffled across buckets:
            one compiled graph per bucket on XLA.
        group: batches per optimizer step (grad_accum), kept in one bucket.
    """
    targets = np.asarray(targets, dtype=np.float32)
    if targets.shape != (len(seqs), 3):
        raise ValueError(f"targets must have shape ({len(seqs)}, 3), got {targets.shape}")
    if batch_size < 1 or len(seqs) < batch_size:
        raise ValueError(f"batch_size {batch_size} needs 1 <= batch_size <= the {len(seqs)} training rows")
    rng = np.random.default_rng([seed, epoch])
    if buckets:
        widths, steps = _bucket_steps(np.fromiter(map(len, seqs), np.int64, len(seqs)), batch_size * group,
                                      buckets, rng)
        order = rng.permutation(len(steps))
        plan = [(widths[s], steps[s][g * batch_size:(g + 1) * batch_size]) for s in order for g in range(group)]
    else:
        order = rng.permutation(len(seqs))
        plan = [(length, order[b * batch_size:(b + 1) * batch_size])
                for b in range(num_train_batches(len(seqs), batch_size))]
    for pad_to, idx in plan[start:]:
        batch = pad_batch([seqs[i] for i in idx], pad_id, pad_to)
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

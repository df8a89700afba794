"""Padding, static/dynamic training batches and length-sorted inference batches."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmsys_utils.batching import (bucket_length, num_train_batches, pad_batch, rows_per_batch, sorted_batches,
                                  train_batches)

PAD = 0


def make_seqs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 100, size=n).tolist() for n in lengths]


def test_pad_batch_dynamic_pads_to_longest_on_the_right():
    batch = pad_batch([[5, 6, 7], [8]], PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long


def test_pad_batch_static_length_and_overflow_error():
    batch = pad_batch([[5, 6], [8]], 9, length=4)
    assert batch["input_ids"].tolist() == [[5, 6, 9, 9], [8, 9, 9, 9]]
    with pytest.raises(ValueError, match="padded to 2"):
        pad_batch([[1, 2, 3]], PAD, length=2)


def test_bucket_length():
    assert bucket_length(100, [512, 128, 1024]) == 128
    assert bucket_length(128, [128, 512]) == 128
    with pytest.raises(ValueError, match="largest bucket 512"):
        bucket_length(600, [128, 512])


def test_train_batches_static_shapes_drop_last_and_labels():
    seqs = make_seqs(np.arange(1, 24))
    targets = np.eye(3)[np.arange(23) % 3]
    batches = list(train_batches(seqs, targets, 5, PAD, length=32, seed=1, epoch=0))
    assert len(batches) == num_train_batches(23, 5) == 4
    assert {tuple(b["input_ids"].shape) for b in batches} == {(5, 32)}
    assert all(b["labels"].shape == (5, 3) and b["labels"].dtype == torch.float32 for b in batches)
    # every row once at most, with its own target
    seen = []
    for b in batches:
        for ids, mask, label in zip(b["input_ids"], b["attention_mask"], b["labels"]):
            i = int(mask.sum()) - 1               # row i has length i + 1
            assert ids[:i + 1].tolist() == seqs[i] and label.tolist() == targets[i].tolist()
            seen.append(i)
    assert len(seen) == len(set(seen)) == 20


def test_train_batches_deterministic_by_seed_and_epoch_and_resumable():
    seqs = make_seqs(np.full(40, 6))
    targets = np.full((40, 3), 1 / 3)

    def order(seed, epoch, start=0):
        return [b["input_ids"].tolist() for b in train_batches(seqs, targets, 4, PAD, None, seed, epoch, start)]

    assert order(3, 0) == order(3, 0)
    assert order(3, 0) != order(3, 1) and order(3, 0) != order(4, 0)
    assert order(3, 1, start=7) == order(3, 1)[7:]
    assert order(3, 1, start=10) == []


def test_train_batches_dynamic_and_bucketed_widths():
    seqs = make_seqs([3, 9, 4, 20, 7, 2, 15, 5])
    targets = np.eye(3)[[0, 1, 2, 0, 1, 2, 0, 1]]
    for b in train_batches(seqs, targets, 2, PAD, None, seed=0, epoch=0):
        assert b["input_ids"].shape[1] == int(b["attention_mask"].sum(1).max())
    widths = {b["input_ids"].shape[1] for b in train_batches(seqs, targets, 2, PAD, None, 0, 0, buckets=[8, 32])}
    assert widths <= {8, 32}


def test_train_batches_errors():
    seqs = make_seqs([3, 4])
    with pytest.raises(ValueError, match="shape"):
        next(train_batches(seqs, np.zeros((3, 3)), 1, PAD, None, 0, 0))
    with pytest.raises(ValueError, match="batch_size 4"):
        next(train_batches(seqs, np.zeros((2, 3)), 4, PAD, None, 0, 0))


@settings(max_examples=50, deadline=None)
@given(lengths=st.lists(st.integers(1, 300), min_size=1, max_size=60), max_tokens=st.integers(64, 2048),
       max_batch=st.none() | st.integers(1, 16), use_buckets=st.booleans())
def test_sorted_batches_budget_order_and_restore(lengths, max_tokens, max_batch, use_buckets):
    seqs = make_seqs(lengths)
    buckets = [64, 128, 256, 512] if use_buckets else None
    restored = [None] * len(seqs)
    widths = []
    for idx, batch in sorted_batches(seqs, PAD, max_tokens, max_batch=max_batch, buckets=buckets):
        rows, width = batch["input_ids"].shape
        # with buckets every batch of a width has the same row count (one graph): filled with its last row
        assert rows == (rows_per_batch(max_tokens, width, max_batch=max_batch or len(seqs)) if buckets else len(idx))
        assert len(idx) <= rows and (rows * width <= max_tokens or rows == 1)
        assert max_batch is None or rows <= max_batch
        assert (batch["input_ids"][len(idx):] == batch["input_ids"][len(idx) - 1]).all()
        assert width == (bucket_length(max(lengths[i] for i in idx), buckets) if buckets
                         else max(lengths[i] for i in idx))
        widths.append(width)
        for i, ids, mask in zip(idx, batch["input_ids"], batch["attention_mask"]):
            restored[i] = ids[mask.bool()].tolist()
    assert restored == seqs                                    # every row exactly once, order restorable
    assert widths == sorted(widths, reverse=True)              # longest first


def test_sorted_batches_padding_waste_is_small():
    lengths = np.random.default_rng(0).integers(10, 1000, size=500)
    seqs = make_seqs(lengths)
    padded = sum(b["input_ids"].numel() for _, b in sorted_batches(seqs, PAD, max_tokens=8192))
    assert padded < 1.1 * lengths.sum()

"""Padding, static/dynamic training batches and length-sorted inference batches."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmsys_utils.batching import (bucket_length, choose_buckets, num_train_batches, pad_batch, rows_per_batch,
                                  sorted_batches, train_batches)

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


def padded_share(lengths, buckets):
    edges = np.sort(buckets)
    return edges[np.searchsorted(edges, lengths)].sum() / np.sum(lengths)


def test_choose_buckets_pads_least_of_every_choice():
    lengths = np.random.default_rng(0).lognormal(5.8, 0.9, size=400).astype(int).clip(5, 1024)
    buckets = choose_buckets(lengths, 1024, count=3)
    assert len(buckets) == 3 and buckets[-1] == 1024 and all(b % 64 == 0 for b in buckets)
    # exhaustive check: no other pair of multiples of 64 below 1024 pads fewer tokens
    others = [(a, b, 1024) for a in range(64, 1024, 64) for b in range(a + 64, 1024, 64)]
    assert padded_share(lengths, buckets) <= min(padded_share(lengths, o) for o in others) + 1e-12
    assert choose_buckets(lengths, 1024, count=1) == (1024,)
    assert padded_share(lengths, choose_buckets(lengths, 1024, 6)) < padded_share(lengths, buckets)


def test_choose_buckets_leaves_out_lengths_no_row_needs():
    assert choose_buckets([10, 20, 30], 256, count=6) == (64, 256)
    assert choose_buckets([300, 500], 256, count=4) == (256,)  # rows are truncated to max_length
    assert choose_buckets([100], 100, count=3, multiple=128) == (100,)


def test_bucketed_batches_keep_a_step_in_one_bucket_and_resume_exactly():
    lengths = np.random.default_rng(1).integers(1, 200, size=203)
    seqs, targets = make_seqs(lengths), np.eye(3)[np.arange(203) % 3]
    buckets = choose_buckets(lengths, 200, count=3)
    group, batch_size = 2, 4

    def epoch(e, start=0):
        return list(train_batches(seqs, targets, batch_size, PAD, None, seed=5, epoch=e, start=start,
                                  buckets=buckets, group=group))

    first = epoch(0)
    assert len(first) == num_train_batches(203, batch_size, lengths, buckets, group)
    assert len(first) % group == 0 and len(first) * batch_size > 203 - batch_size * group  # < one step dropped
    widths = [b["input_ids"].shape[1] for b in first]
    assert set(widths) <= set(buckets) and len(set(widths)) > 1
    assert all(widths[i] == widths[i + 1] for i in range(0, len(widths), group))  # a step shares its bucket
    seen = []
    for b in first:
        assert b["input_ids"].shape == (batch_size, b["input_ids"].shape[1])
        for ids, mask in zip(b["input_ids"], b["attention_mask"]):
            seen.append(tuple(ids[mask.bool()].tolist()))
    assert len(seen) == len(set(seen))  # each row at most once
    # a row moves up to a longer bucket only when its own has no full step left: so most sit in their own
    own = sum(b["input_ids"].shape[1] == bucket_length(int(m.sum()), buckets)
              for b in first for m in b["attention_mask"])
    assert own >= len(seen) - len(buckets) * batch_size * group
    # buckets are shuffled across the epoch (not all short ones first), deterministic by (seed, epoch)
    assert widths != sorted(widths) and widths != sorted(widths, reverse=True)
    same = epoch(0)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, same))
    assert [b["input_ids"].shape[1] for b in epoch(1)] != widths
    resumed = epoch(0, start=6)
    assert len(resumed) == len(first) - 6
    assert all(torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
               for a, b in zip(first[6:], resumed))

"""Buckets, and an iterator that is deterministic, resumable and shardable across processes."""

import dataclasses

import datasets
import numpy as np
import pytest

from align_jax.data import DataError, LoaderState, batches, bucket, collate, default_buckets, encode


@pytest.fixture(scope="module")
def encoded(tok):
    rows = [{"prompt": f"What is {i}+1? ", "completion": "x " * (i % 7 + 1)} for i in range(23)]
    return encode(datasets.Dataset.from_list(rows), tok)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def first_tokens(batch):
    return batch.ids_BxT[:, :8].tolist()


def test_buckets():
    assert default_buckets(100) == (16, 32, 64, 100)
    assert [bucket(n, (16, 32, 64)) for n in (1, 16, 17, 64)] == [16, 16, 32, 64]
    with pytest.raises(DataError, match="length 65 exceeds the largest bucket 64"):
        bucket(65, (16, 32, 64))


def test_epochs_visit_every_full_batch_once_in_a_seeded_order(encoded):
    kw = dict(batch_size=5, pad_id=0, buckets=(16, 32, 64))
    run = list(batches(encoded, seed=3, epochs=2, **kw))
    assert len(run) == 2 * (23 // 5)
    assert [s for s, _ in run][:5] == [LoaderState(0, 1), LoaderState(0, 2), LoaderState(0, 3),
                                       LoaderState(0, 4), LoaderState(1, 1)]
    epoch0 = [row for _, b in run[:4] for row in first_tokens(b)]
    assert len({tuple(r) for r in epoch0}) == 20  # 20 distinct rows, none twice
    assert first_tokens(run[0][1]) != first_tokens(run[4][1])  # a new order each epoch
    again = list(batches(encoded, seed=3, epochs=2, **kw))
    assert all(np.array_equal(a.ids_BxT, b.ids_BxT) for (_, a), (_, b) in zip(run, again))
    other = next(batches(encoded, seed=4, **kw))[1]
    assert first_tokens(other) != first_tokens(run[0][1])


def test_resume_from_a_saved_state_sees_exactly_the_same_batches(encoded):
    kw = dict(batch_size=4, seed=0, pad_id=0, buckets=(16, 32, 64))
    uninterrupted = take(batches(encoded, **kw), 12)
    saved = dataclasses.asdict(uninterrupted[6][0])  # as a checkpoint stores it, mid-epoch 1
    resumed = take(batches(encoded, state=LoaderState(**saved), **kw), 5)
    for (s1, b1), (s2, b2) in zip(uninterrupted[7:], resumed):
        assert s1 == s2
        np.testing.assert_array_equal(b1.ids_BxT, b2.ids_BxT)
        np.testing.assert_array_equal(b1.completion_mask_BxT, b2.completion_mask_BxT)
    at_epoch_end = take(batches(encoded, state=uninterrupted[4][0], **kw), 1)[0]
    assert at_epoch_end[0] == LoaderState(1, 1)


def test_processes_split_each_global_batch(encoded):
    kw = dict(batch_size=6, seed=1, pad_id=0, buckets=(64,))
    whole = take(batches(encoded, **kw), 3)
    parts = [take(batches(encoded, process_index=p, process_count=3, **kw), 3) for p in range(3)]
    for step in range(3):
        stitched = np.concatenate([parts[p][step][1].ids_BxT for p in range(3)])
        np.testing.assert_array_equal(stitched, whole[step][1].ids_BxT)
    with pytest.raises(DataError, match="batch_size 6 is not divisible by the 4 processes"):
        next(batches(encoded, process_count=4, **kw))


def test_too_few_rows_for_a_batch(encoded):
    with pytest.raises(DataError, match="23 rows cannot fill one batch of 24"):
        next(batches(encoded, batch_size=24, seed=0, pad_id=0, buckets=(64,)))


def test_shared_prompt_packs_each_pair_into_one_row():
    examples = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10, 11, 12, 13]},
                {"prompt_ids": [], "chosen_ids": [20], "rejected_ids": [21, 22]}]
    packed = collate(examples, "preference", (4, 8), pad_id=0, share_prompt=True)
    # widths: prompt + longest completion fits 8, every completion fits 4, so T = 8 + 4
    assert packed.ids_BxT.shape == (2, 12) and packed.labels_Bx2xC.shape == (2, 2, 4)
    np.testing.assert_array_equal(packed.ids_BxT[0], [5, 6, 7, 8, 9, 10, 11, 12, 13, 0, 0, 0])
    np.testing.assert_array_equal(packed.segment_ids_BxT[0], [0, 0, 0, 1, 1, 2, 2, 2, 2, 0, 0, 0])
    np.testing.assert_array_equal(packed.attention_mask_BxT[0], [1] * 9 + [0] * 3)
    # chosen 8, 9 follow slots 2 (the prompt's last token) and 3; rejected 10..13 follow 2, 5, 6, 7
    np.testing.assert_array_equal(packed.logit_index_Bx2xC[0], [[2, 3, 0, 0], [2, 5, 6, 7]])
    np.testing.assert_array_equal(packed.labels_Bx2xC[0], [[8, 9, 0, 0], [10, 11, 12, 13]])
    np.testing.assert_array_equal(packed.label_mask_Bx2xC[0], [[1, 1, 0, 0], [1, 1, 1, 1]])
    # an empty prompt leaves each completion's first token without a predictor, as unpacked rows do
    np.testing.assert_array_equal(packed.ids_BxT[1, :3], [20, 21, 22])
    np.testing.assert_array_equal(packed.logit_index_Bx2xC[1], [[0, 0, 0, 0], [0, 1, 0, 0]])
    np.testing.assert_array_equal(packed.label_mask_Bx2xC[1], [[0, 0, 0, 0], [0, 1, 0, 0]])
    unpacked = collate(examples, "preference", (4, 8), pad_id=0)
    # the same number of scored tokens as the unpacked rows
    for side, seq in enumerate(unpacked[:2]):
        np.testing.assert_array_equal(packed.label_mask_Bx2xC[:, side].sum(1),
                                      seq.completion_mask_BxT[:, 1:].sum(1))
    with pytest.raises(ValueError,
                       match="share_prompt packs preference pairs, not prompt_completion rows"):
        collate([{"prompt_ids": [1], "completion_ids": [2]}], "prompt_completion", (8,), 0,
                share_prompt=True)

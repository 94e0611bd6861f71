"""Manifests, weighted mixing, length bucketing, and the batch stream's resumable, rank-sharded order."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_engine.training.data import (BatchStream, TrainData, epoch_batches, epoch_order, fixed_batches,
                                       load_manifest)


def _data(sizes: list[int], weights=None, with_lengths=True) -> TrainData:
    datasets = [[(d, i) for i in range(n)] for d, n in enumerate(sizes)]
    lengths = [[(7 * i + 3 * d) % 23 + 1 for i in range(n)] for d, n in enumerate(sizes)] if with_lengths else None
    return TrainData(datasets, collate=list, weights=weights, lengths=lengths)


def test_load_manifest(tmp_path: Path) -> None:
    p = tmp_path / "m.jsonl"
    p.write_text('{"audio": "a.wav", "text": "hi"}\n\n{"audio": "b.wav", "text": "yo"}\n')
    assert load_manifest(p) == [{"audio": "a.wav", "text": "hi"}, {"audio": "b.wav", "text": "yo"}]
    p.write_text('{"audio": "a.wav"}\n{"audio": \n')
    with pytest.raises(ValueError, match=r"m.jsonl:2: not valid JSON"):
        load_manifest(p)
    p.write_text('[1, 2]\n')
    with pytest.raises(ValueError, match="expected a JSON object"):
        load_manifest(p)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_manifest(tmp_path / "missing.jsonl")


@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4), seed=st.integers(0, 2**31), epoch=st.integers(0, 5))
def test_unweighted_epoch_is_a_permutation(sizes: list[int], seed: int, epoch: int) -> None:
    order = epoch_order(sizes, None, seed, epoch)
    assert sorted(order) == [(d, i) for d, n in enumerate(sizes) for i in range(n)]
    assert order == epoch_order(sizes, None, seed, epoch)


def test_weights_set_each_datasets_share() -> None:
    order = epoch_order([100, 10], [1.0, 1.0], seed=0, epoch=0)
    counts = Counter(d for d, _ in order)
    assert counts == {0: 55, 1: 55}  # the small set is cycled: each of its examples 5 or 6 times
    small = Counter(i for d, i in order if d == 1)
    assert set(small) == set(range(10)) and max(small.values()) - min(small.values()) <= 1


def test_length_bucketing_reduces_padding() -> None:
    data = _data([400])
    order = epoch_order([400], None, 0, 0)
    lengths = data.lengths

    def padding(batches):
        return sum(max(lengths[d][i] for d, i in b) * len(b) - sum(lengths[d][i] for d, i in b) for b in batches)

    plain = epoch_batches(order, 8, None, 1, 0, 0)
    bucketed = epoch_batches(order, 8, lengths, 10, 0, 0)
    assert sorted(r for b in plain for r in b) == sorted(r for b in bucketed for r in b)  # same examples
    assert sorted(map(sorted, plain)) != sorted(map(sorted, bucketed))  # grouped otherwise
    assert padding(bucketed) < padding(plain) / 3


def test_stream_resumes_from_its_state() -> None:
    data = _data([37, 11], weights=[2.0, 1.0])
    a = BatchStream(data, batch_size=5, seed=3, bucket_window=4)
    for _ in range(23):  # past the first epoch boundary (48 examples = 9 batches an epoch)
        a.next_refs()
    state = a.state_dict()
    assert state["epoch"] == 2
    b = BatchStream(data, batch_size=5, seed=3, bucket_window=4)
    b.load_state_dict(json.loads(json.dumps(state)))
    assert [a.next_refs() for _ in range(20)] == [b.next_refs() for _ in range(20)]
    with pytest.raises(ValueError, match="same --seed and --batch-size"):
        BatchStream(data, batch_size=4, seed=3).load_state_dict(state)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_the_single_process_stream(world: int) -> None:
    """Rank r takes every world-th micro-batch of the one global stream, so N processes see what one sees."""
    data = _data([50, 20])
    single = BatchStream(data, batch_size=4, seed=1)
    ranks = [BatchStream(data, batch_size=4, seed=1, world_size=world, rank=r) for r in range(world)]
    expected = [single.next_refs() for _ in range(world * 30)]
    got = [ranks[r].next_refs() for _ in range(30) for r in range(world)]
    assert got == expected
    assert len({json.dumps(s.state_dict() | {"world_size": 0}) for s in ranks}) == 1  # positions agree


def test_too_little_data_is_an_actionable_error() -> None:
    with pytest.raises(ValueError, match="fewer than batch_size"):
        BatchStream(_data([3]), batch_size=4, seed=0)


def test_fixed_batches_shard_without_loss() -> None:
    ex = list(range(23))
    shards = [fixed_batches(ex, 5, 2, r) for r in range(2)]
    assert sorted(x for s in shards for b in s for x in b) == ex
    assert fixed_batches(ex, 5) == [ex[0:5], ex[5:10], ex[10:15], ex[15:20], ex[20:23]]

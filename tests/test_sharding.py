import numpy as np
import pytest

from comind.sharding import METHODS, shard

# 10 classes of 500 examples each, in a shuffled order.
LABELS = np.random.default_rng(3).permutation(np.repeat(np.arange(10), 500))


def all_shards(num_shards, method, **kwargs):
    return [shard(LABELS, num_shards, i, method, **kwargs) for i in range(num_shards)]


def class_shares(part):
    return np.bincount(LABELS[part], minlength=10) / len(part)


@pytest.mark.parametrize("method", ["contiguous", "iid", "dirichlet"])
@pytest.mark.parametrize("num_shards", [1, 3, 7])
def test_shards_are_disjoint_sorted_and_cover_everything(method, num_shards):
    parts = all_shards(num_shards, method)
    for part in parts:
        assert len(part) and np.all(np.diff(part) > 0)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))


def test_contiguous_is_array_split():
    for i, expected in enumerate(np.array_split(np.arange(len(LABELS)), 7)):
        np.testing.assert_array_equal(shard(LABELS, 7, i), expected)


def test_none_gives_every_worker_everything():
    for i in range(3):
        np.testing.assert_array_equal(shard(LABELS, 3, i, "none"), np.arange(len(LABELS)))


def test_iid_shards_are_even_and_mixed():
    parts = all_shards(4, "iid")
    assert {len(part) for part in parts} == {1250}
    assert not np.array_equal(parts[0], np.arange(1250))
    for part in parts:
        assert np.abs(class_shares(part) - 0.1).max() < 0.05


@pytest.mark.parametrize("method", ["iid", "dirichlet"])
def test_the_seed_decides_the_partition(method):
    np.testing.assert_array_equal(shard(LABELS, 5, 2, method, seed=7), shard(LABELS, 5, 2, method, seed=7))
    assert not np.array_equal(shard(LABELS, 5, 2, method, seed=7), shard(LABELS, 5, 2, method, seed=8))


def test_a_small_alpha_gives_each_shard_few_classes():
    parts = all_shards(10, "dirichlet", alpha=0.05)
    top_two = [np.sort(class_shares(part))[-2:].sum() for part in parts]
    assert np.median(top_two) > 0.8


def test_a_large_alpha_is_nearly_iid():
    parts = all_shards(10, "dirichlet", alpha=1000.0)
    for part in parts:
        assert abs(len(part) - 500) < 50
        assert np.abs(class_shares(part) - 0.1).max() < 0.03


def test_too_small_an_alpha_for_many_shards_is_refused():
    # Nearly all of each class lands on one shard, so 2 classes cannot fill 20 shards.
    with pytest.raises(ValueError, match=r"alpha=0.001 is too small for 20 shards.*Received: alpha=0.001$"):
        shard(np.repeat([0, 1], 50), 20, 0, "dirichlet", alpha=0.001)


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "random"}, r"'contiguous', 'iid', 'dirichlet', 'none'. Received: method='random'$"),
    ({"num_shards": 0}, r"num_shards must be an integer >= 1. Received: num_shards=0$"),
    ({"num_shards": 2.0}, r"Received: num_shards=2.0$"),
    ({"index": 3}, r"0 <= index < num_shards=3. Received: index=3$"),
    ({"index": -1}, r"Received: index=-1$"),
    ({"alpha": 0.0}, r"alpha must be a positive finite number. Received: alpha=0.0$"),
    ({"alpha": float("nan")}, r"Received: alpha=nan$"),
    ({"labels": np.zeros((10, 2))}, r"Received: labels.shape=\(10, 2\)$"),
    ({"labels": np.zeros(2)}, r"Cannot split 2 examples into 3 non-empty shards. Received: num_shards=3$"),
])
def test_bad_arguments_are_refused(kwargs, message):
    arguments = {"labels": LABELS, "num_shards": 3, "index": 0, "method": "iid", **kwargs}
    with pytest.raises(ValueError, match=message):
        shard(**arguments)


def test_methods_are_listed():
    assert METHODS == ("contiguous", "iid", "dirichlet", "none")

import re

import numpy as np
import pytest

from comind.aggregation import BLOCK_ELEMENTS, RunningWeightedSum
from comind.aggregators import AGGREGATORS, AggregatorSettings
from comind.robust import clip_update, coordinate_median, trimmed_mean, update_norm
from comind.tensors import Layout


def updates(count, rng):
    shapes = [(BLOCK_ELEMENTS * 2 + 17,), (7, 3)]
    return [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(count)]


@pytest.mark.parametrize("weights", [[1, 1, 1], [50, 100, 250], [1e-3, 7.5, 1e6]])
def test_mean_is_the_weighted_average(weights):
    models = updates(3, np.random.default_rng(0))
    total = RunningWeightedSum(Layout.of(models[0]))
    for model, weight in zip(models, weights, strict=True):
        total.add(model, weight)
    mean = total.layout.views(total.result())
    for i in range(2):
        expected = np.average(np.stack([m[i] for m in models]).astype(np.float64), axis=0, weights=weights)
        np.testing.assert_allclose(mean[i], expected, rtol=1e-6, atol=1e-6)
        assert mean[i].dtype == np.float32


def test_integer_tensors_are_averaged_and_rounded():
    total = RunningWeightedSum(Layout.of([np.zeros(3, np.int64)]))
    total.add([np.array([0, 10, 3])], 1)
    total.add([np.array([1, 20, 4])], 3)
    np.testing.assert_array_equal(total.layout.views(total.result())[0], [1, 18, 4])


def test_mean_resets_and_needs_an_update():
    layout = Layout.of([np.zeros(2, np.float32)])
    total = RunningWeightedSum(layout)
    with pytest.raises(ValueError, match="No update"):
        total.result()
    total.add([np.ones(2, np.float32)], 2)
    total.result()
    assert total.count == 0 and total.total_weight == 0
    with pytest.raises(ValueError, match="positive weight"):
        total.add([np.ones(2, np.float32)], 0)


# Robust aggregation (comind/robust.py) ---------------------------------------------


def models(*values):
    """One model per value: a float32 tensor spanning several blocks and an int64 one, filled with it."""
    return [[np.full(BLOCK_ELEMENTS + 5, v, np.float32), np.full((2, 3), v, np.int64)] for v in values]


def test_median_of_an_odd_count_is_the_middle_value_whatever_the_outlier():
    rng = np.random.default_rng(1)
    honest = updates(4, rng)
    poisoned = [t * 1e6 for t in honest[0]]
    result = coordinate_median([*honest, poisoned])
    expected = np.median(np.stack([m[0] for m in [*honest, poisoned]]), axis=0)
    np.testing.assert_array_equal(result[0], expected)
    assert result[0].dtype == np.float32
    assert np.abs(result[0]).max() <= max(np.abs(m[0]).max() for m in honest)


def test_median_of_an_even_count_is_the_mean_of_the_middle_two():
    result = coordinate_median(models(1, 2, 4, 100))
    np.testing.assert_array_equal(result[0], 3.0)
    np.testing.assert_array_equal(result[1], 3)  # integers: rounded
    assert result[1].dtype == np.int64


def test_median_and_trimmed_mean_of_one_update_are_that_update():
    [update] = updates(1, np.random.default_rng(2))
    for result in (coordinate_median([update]), trimmed_mean([update], 0.25)):
        for got, want in zip(result, update, strict=True):
            np.testing.assert_array_equal(got, want)


def test_trimmed_mean_drops_the_largest_and_smallest_of_each_coordinate():
    values = [-1000, 1, 2, 3, 7, 9, 5000, 6, 4, 8]  # 10 updates: 0.2 trims 2 from each end
    result = trimmed_mean(models(*values), 0.2)
    np.testing.assert_array_equal(result[0], np.mean([2, 3, 4, 6, 7, 8]))
    np.testing.assert_array_equal(result[1], 5)
    # Each coordinate is trimmed on its own: the outliers may sit in different updates.
    a, b = np.array([1.0, 100.0], np.float32), np.array([100.0, 1.0], np.float32)
    rows = [[a], [b], [np.float32([2, 2])], [np.float32([3, 3])]]
    np.testing.assert_allclose(trimmed_mean(rows, 0.25)[0], [2.5, 2.5])


def test_trimmed_mean_without_trimming_is_the_unweighted_mean():
    rng = np.random.default_rng(3)
    three = updates(3, rng)
    result = trimmed_mean(three, 0.25)  # floor(0.75) = 0 trimmed
    np.testing.assert_allclose(result[0], np.mean([m[0] for m in three], axis=0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fraction", [0.5, 0.7, -0.1])
def test_a_trim_that_would_drop_every_update_is_refused(fraction):
    with pytest.raises(ValueError, match=rf"trim_fraction must be at least 0 and below 0.5.*Received: "
                                         rf"trim_fraction={fraction}"):
        trimmed_mean(models(1, 2, 3), fraction)


def test_aggregating_nothing_is_an_error():
    with pytest.raises(ValueError, match="No update"):
        coordinate_median([])


def test_clipping_scales_the_change_down_to_the_bound_and_keeps_its_direction():
    update = [np.full(BLOCK_ELEMENTS + 5, 2.0, np.float32), np.full(3, 10**9, np.int64)]
    norm = clip_update(update, 4.0)
    assert norm == pytest.approx(2.0 * np.sqrt(BLOCK_ELEMENTS + 5))  # the integer tensor (a value) does not count
    assert update_norm(update) == pytest.approx(4.0, rel=1e-6)
    np.testing.assert_allclose(update[0], 4.0 / np.sqrt(BLOCK_ELEMENTS + 5), rtol=1e-6)
    np.testing.assert_array_equal(update[1], 10**9)


def test_a_change_within_the_bound_is_left_alone():
    update = [np.array([0.0, 1.0, 0.0, 0.0])]
    assert clip_update(update, 1.0) == 1.0
    np.testing.assert_array_equal(update[0], [0.0, 1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="max_norm must be positive"):
        clip_update(update, 0.0)


def aggregator(rule, fraction=0.25):
    return AGGREGATORS[rule](AggregatorSettings(trim_fraction=fraction))


def test_held_updates_are_copies_unweighted_and_fall_back_to_the_median_when_too_few_to_trim(caplog):
    layout = Layout.of(models(0)[0])
    held = aggregator("trimmed-mean").start(layout)
    buffer = models(1)[0]
    for value, weight in ((1, 1000), (2, 1), (30, 1)):
        for tensor in buffer:
            tensor.fill(value)  # the ps reuses its receive buffers
        held.add(buffer, weight)
    result = layout.views(held.result())
    np.testing.assert_array_equal(result[0], 2.0)  # 3 updates trim none at 0.25: the median, not the mean 11
    assert "too few to trim" in caplog.text
    assert held.count == 3


@pytest.mark.parametrize("rule, fraction, updates_, words", [
    ("median", 0.25, 2, "median needs rounds of at least 3 updates"),
    ("trimmed-mean", 0.25, 3, "needs rounds of at least 4 updates (COMIND_NUM_WORKERS or --workers, or "
                              "COMIND_REPLICAS_TO_AGGREGATE if set; with asynchronous rounds, COMIND_BUFFER_SIZE), "
                              "or raise COMIND_TRIM_FRACTION to 0.334"),
    ("trimmed-mean", 0.2, 4, "needs rounds of at least 5 updates"),
])
def test_a_quorum_too_small_for_the_rule_is_a_clear_error(rule, fraction, updates_, words):
    chosen = aggregator(rule, fraction)
    with pytest.raises(ValueError, match=re.escape(words)):
        chosen.check_quorum(updates_)
    chosen.check_quorum(updates_ + 1)


def test_the_mean_streams_and_the_robust_rules_hold_the_updates():
    layout = Layout.of(models(0)[0])
    assert aggregator("mean").start(layout).__class__ is RunningWeightedSum
    assert not aggregator("mean").holds_updates
    assert aggregator("median").holds_updates and aggregator("trimmed-mean").holds_updates
    with pytest.raises(ValueError, match=r"COMIND_AGGREGATION must be one of mean, median, trimmed-mean\. "
                                         r"Received: COMIND_AGGREGATION='mode'"):
        AGGREGATORS["mode"]

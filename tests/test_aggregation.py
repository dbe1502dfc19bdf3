import numpy as np
import pytest

from comind.aggregation import BLOCK_ELEMENTS, RunningWeightedSum
from comind.tensors import Layout


def updates(count, rng):
    shapes = [(BLOCK_ELEMENTS * 2 + 17,), (7, 3)]
    return [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(count)]


@pytest.mark.parametrize("weights", [[1, 1, 1], [50, 100, 250], [1e-3, 7.5, 1e6]])
def test_mean_is_the_weighted_average(weights):
    models = updates(3, np.random.default_rng(0))
    total = RunningWeightedSum(Layout.of(models[0]))
    for model, weight in zip(models, weights):
        total.add(model, weight)
    mean = total.layout.views(total.mean())
    for i in range(2):
        expected = np.average(np.stack([m[i] for m in models]).astype(np.float64), axis=0, weights=weights)
        np.testing.assert_allclose(mean[i], expected, rtol=1e-6, atol=1e-6)
        assert mean[i].dtype == np.float32


def test_integer_tensors_are_averaged_and_rounded():
    total = RunningWeightedSum(Layout.of([np.zeros(3, np.int64)]))
    total.add([np.array([0, 10, 3])], 1)
    total.add([np.array([1, 20, 4])], 3)
    np.testing.assert_array_equal(total.layout.views(total.mean())[0], [1, 18, 4])


def test_mean_resets_and_needs_an_update():
    layout = Layout.of([np.zeros(2, np.float32)])
    total = RunningWeightedSum(layout)
    with pytest.raises(ValueError, match="No update"):
        total.mean()
    total.add([np.ones(2, np.float32)], 2)
    total.mean()
    assert total.count == 0 and total.total_weight == 0
    with pytest.raises(ValueError, match="positive weight"):
        total.add([np.ones(2, np.float32)], 0)

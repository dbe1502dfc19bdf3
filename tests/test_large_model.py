"""A 1 GB model makes the full round trip: initialize, push, average, pull."""

import numpy as np

from comind import WorkerClient

GIB = 1 << 30


def test_a_1gb_model_round_trips(start_ps):
    ps = start_ps("--num-workers", "1", "--rounds", "1", "--max-model-bytes", str(2 * GIB), "--exit-grace", "5")
    kernel = np.full((GIB // 4 // 4096, 4096), 1.0, dtype=np.float32)
    kernel[-1, -1] = 7.0  # the last byte of the stream must arrive too
    bias = np.arange(10, dtype=np.float32)
    with WorkerClient(ps.address) as client:
        start = client.join([kernel, bias])
        assert start.round == 0 and start.weights[0].nbytes + start.weights[1].nbytes > GIB
        assert start.weights[0][-1, -1] == 7.0 and np.array_equal(start.weights[1], bias)
        del start
        kernel += 1.0
        final = client.sync([kernel, bias + 1], num_examples=1)
    assert final.round == 1 and final.done
    assert np.array_equal(final.weights[0], kernel)
    assert np.array_equal(final.weights[1], bias + 1)
    assert ps.wait() == 0

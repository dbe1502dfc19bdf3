import random

from comind.backoff import Backoff


def test_delays_grow_to_the_cap_with_full_jitter():
    delays = Backoff(base=0.1, cap=2.0).delays(random.Random(0))
    first = [next(delays) for _ in range(200)]
    assert all(0 <= d <= min(2.0, 0.1 * 2 ** i) for i, d in enumerate(first))
    assert max(first[50:]) > 1.5  # reaches near the cap, jittered below it
    assert len(set(first)) == len(first)

"""Worker-level DP on the ps: what epsilon a federation gets, and what the mechanism costs a round.

    PYTHONPATH=. python bench/privacy.py

1. Epsilon at delta 1e-5 from the ps's own ledger (RDP, and PLD where cheap)
   for noise multipliers 0.5 / 1 / 2: every worker in every round (q = 1, all
   a federation of a few data holders can do today) against sampling 1 % of a
   large population per round (q = 0.01, once client sampling lands).
2. The ps's aggregation time per round for a 10 MB model and 8 workers: the
   streamed mean against DP (clip, sum, noise from the OS's CSPRNG, fixed
   denominator, ledger).
"""

from __future__ import annotations

import time

import numpy as np

from comind.accountant import Ledger
from comind.pipeline import PipelineSettings, ServerPipeline
from comind.privacy import DpSettings
from comind.tensors import Layout


def epsilon(z: float, q: float, rounds: int, accountant: str = "rdp") -> float:
    ledger = Ledger(z, 1e-5, accountant)
    ledger.restore({"sampled_fraction": np.array([q]), "noise_multiplier": np.array([z]),
                    "rounds": np.array([rounds])})
    return ledger.epsilon


def round_seconds(pipeline: ServerPipeline, layout: Layout, updates: list[list[np.ndarray]], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        round = pipeline.start_round(layout, np.zeros(layout.nbytes, np.uint8))
        for update in updates:
            round.add([u.copy() for u in update], 1.0)
        round.result(1.0)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def main() -> None:
    print("epsilon at delta 1e-5 (RDP; PLD in brackets)")
    print("z     q=1, 100 rounds        q=0.01, 1000 rounds")
    for z in (0.5, 1.0, 2.0):
        print(f"{z:<4}  {epsilon(z, 1.0, 100):>10.4g} [{epsilon(z, 1.0, 100, 'pld'):.4g}]"
              f"     {epsilon(z, 0.01, 1000):>8.4g} [{epsilon(z, 0.01, 1000, 'pld'):.4g}]")
    mean, dp = large_model_costs()
    print(f"10 MB model, 8 updates: mean {mean:.0f} ms a round, DP {dp:.0f} ms ({dp / mean:.1f}x)")


def large_model_costs() -> tuple[float, float]:
    """The ps pipeline's milliseconds a round for a 10 MB model and 8 updates: the streamed mean, and DP."""
    rng = np.random.default_rng(0)
    layout = Layout.of([np.zeros(2_500_000, np.float32)], ["w"])
    updates = [[rng.normal(size=2_500_000).astype(np.float32)] for _ in range(8)]
    plain = ServerPipeline(PipelineSettings(weighting="uniform"))
    private = ServerPipeline(PipelineSettings(weighting="uniform", privacy=DpSettings(
        noise_multiplier=1.0, clip=1.0, expected_updates=8)))
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(5):  # alternately, so that a busy machine's load hits both alike
        for pipeline, seconds in zip((plain, private), times, strict=True):
            seconds.append(round_seconds(pipeline, layout, updates, repeats=1))
    return 1000 * float(np.median(times[0])), 1000 * float(np.median(times[1]))


if __name__ == "__main__":
    main()

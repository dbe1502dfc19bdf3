"""Worker-level differential privacy: the ledger, the mechanism, adaptive clipping, the refusals, and a real ps
SIGKILLed and restarted that never forgets spent budget."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from comind import settings
from comind.accountant import Ledger
from comind.metrics import PsMetrics
from comind.pipeline import PipelineSettings, ServerPipeline
from comind.privacy import DpFedAvg, DpSettings, secure_normal
from comind.ps import ParameterServer, UpdateResult
from comind.ps_main import round_policy, server_pipeline
from comind.sampling import parse_ranges, select_poisson
from comind.tensors import Layout
from numpy_cluster import assert_finishes, read_history, start_worker
from processes import ROOT
from test_ps import data, delta, initialized, model_values
from test_sampling import fixed_seeds


def pipeline_for(**flags: object) -> ServerPipeline:
    """The ps's own pipeline, from its settings as `comind ps` takes them."""
    loaded = settings.load("ps", {k: str(v) for k, v in flags.items()})
    return server_pipeline(loaded, round_policy(loaded))


def ps_for(registry: CollectorRegistry | None = None, **flags: object) -> ParameterServer:
    """The ps as `comind ps` builds it from these settings: its round rules and its pipeline."""
    loaded = settings.load("ps", {k: str(v) for k, v in flags.items()})
    policy = round_policy(loaded)
    return ParameterServer(policy, PsMetrics(registry or CollectorRegistry()), pipeline=server_pipeline(loaded, policy))


def one_round(pipeline: ServerPipeline, layout: Layout, updates: list[list[np.ndarray]],
              sampled_fraction: float = 1.0) -> list[np.ndarray]:
    """The round's aggregate, through the pipeline the ps runs."""
    round = pipeline.start_round(layout, layout.pack([np.full(s.shape, 7, s.dtype) for s in layout.specs]))
    for update in updates:
        round.add([u.copy() for u in update], weight=1.0)
    return [view.copy() for view in layout.views(round.result(sampled_fraction))]


SMALL = Layout.of([np.zeros(4, np.float32)], ["w"])


def test_the_ledger_gives_the_reference_epsilon_through_the_ps_pipeline():
    """ALGORITHMS.md: q = 0.01, z = 1.0, 1000 rounds, delta 1e-5: RDP epsilon 2.1014."""
    pipeline = pipeline_for(dp_noise_multiplier=1.0, dp_clip=1.0, num_workers=2)
    assert pipeline.privacy is not None
    epsilons = [pipeline.privacy.ledger.epsilon]
    for _ in range(1000):
        one_round(pipeline, SMALL, [[np.ones(4, np.float32)]], sampled_fraction=0.01)
        epsilons.append(pipeline.privacy.ledger.epsilon)
    assert epsilons[-1] == pytest.approx(2.1014, abs=1e-3)
    assert all(b > a for a, b in itertools.pairwise(epsilons))  # every round spends
    # Saved and restored, the same epsilon to the bit.
    restored = pipeline_for(dp_noise_multiplier=1.0, dp_clip=1.0, num_workers=2)
    restored.restore(pipeline.state())
    assert restored.privacy is not None and restored.privacy.ledger.epsilon == epsilons[-1]


#: ``Round R selects seed 0x..., Poisson q Q, S of N live (tasks POPULATION): tasks SELECTED.``, as the ps logs it.
POISSON_DRAW = re.compile(r"Round (\d+) selects seed (0x[0-9a-f]+), Poisson q (\S+), (\d+) of (\d+) live \(tasks "
                          r"([0-9.,]+)\): tasks ([0-9.,]+|none)\.")


def test_client_sampling_with_dp_draws_poisson_samples_and_the_ps_ledger_gives_the_reference_epsilon(caplog):
    """ALGORITHMS.md's reference, q = 0.01, z = 1.0, 1000 rounds, delta 1e-5 (RDP epsilon 2.1014), through the ps:
    its draws, its rounds (most of them, (0.99)^20 = 82 %, select no one and release noise alone), its ledger."""
    workers, total = 20, 1000

    async def scenario() -> tuple[ParameterServer, list[int]]:
        ps = ps_for(num_workers=workers, client_fraction=0.01, dp_noise_multiplier=1.0, dp_clip=1.0, rounds=total,
                    lease_seconds=3600, round_timeout=3600)
        assert ps.pipeline.privacy is not None and ps.pipeline.privacy.settings.expected_updates == pytest.approx(0.2)
        assert ps.sampled_fraction() == 0.01
        ps.rounds._seeds = fixed_seeds()
        members = await initialized(ps, workers)  # the chief's initial model: round 1 draws
        updates = []
        while not ps.done:
            round = ps.round + 1
            chosen = [m for m in members if ps.rounds.is_selected(m)]
            assert chosen  # a round that selected no one closed at once
            for member in chosen:
                header, arrays = delta(0.5, round=round)
                assert await ps.receive(member, header, data(arrays)) is UpdateResult.ACCEPTED
            assert ps.round >= round
            updates.append(len(chosen))
        return ps, updates

    with caplog.at_level(logging.INFO, logger="comind.ps"):
        ps, updates = asyncio.run(scenario())
    privacy = ps.pipeline.privacy
    assert privacy is not None and ps.round == total
    assert privacy.ledger.events == {(0.01, 1.0): total}  # the configured q, every round, the empty ones too
    assert privacy.ledger.epsilon == pytest.approx(2.1014, abs=1e-3)
    assert ps.model is not None and ps.model.epsilon == privacy.ledger.epsilon
    assert ps.last_closed is not None and ps.last_closed.sampling_rate == 0.01
    # Each draw, replayed from its line as an auditor would: the same workers, and Poisson's sizes.
    draws = [m for r in caplog.records if (m := POISSON_DRAW.search(r.getMessage()))]
    assert [int(d.group(1)) for d in draws] == list(range(1, total + 1))
    sizes = []
    for draw in draws:
        q, population, chosen = float(draw.group(3)), parse_ranges(draw.group(6)), parse_ranges(draw.group(7))
        assert q == 0.01 and population == list(range(workers))
        assert select_poisson(population, q, int(draw.group(2), 16)) == chosen
        sizes.append(len(chosen))
    assert sorted(s for s in sizes if s) == sorted(updates) and sum(updates) == sum(sizes)
    # Rounds with no one: Binomial(1000, 0.99^20 = 0.818), std 12.2.
    assert sizes.count(0) == pytest.approx(total * 0.99**workers, abs=4.5 * math.sqrt(total * 0.818 * 0.182))
    lines = [r.getMessage() for r in caplog.records if re.match(r"Round \d+/1000: 0 updates", r.getMessage())]
    assert len(lines) == sizes.count(0) and "0 of 20 live workers selected (q 0.01), epsilon" in lines[0]


def test_a_round_whose_poisson_draw_selects_no_one_releases_the_noise_alone_over_q_n():
    """4 workers at q 1/4: the fixed denominator is q N = 1; with every normal draw at +1 std, the aggregate of a
    round without updates is z C / (q N) in every floating-point coordinate, and the round is in the ledger."""
    ps = ps_for(num_workers=4, clients_per_round=1, dp_noise_multiplier=2.0, dp_clip=0.5, rounds=3)
    privacy = ps.pipeline.privacy
    assert privacy is not None and privacy.settings.expected_updates == 1.0
    privacy._normal = lambda std, count: np.full(count, std)
    ps.rounds._seeds = lambda: next(seed for seed in itertools.count() if not select_poisson(range(4), 0.25, seed))

    async def scenario() -> None:
        await initialized(ps, 4)
        # The initial model's round drew no one, and closed at once; the next draws too (the same empty seeds).

    asyncio.run(scenario())
    assert ps.done and ps.round == 3 and ps.last_closed is not None
    assert (ps.last_closed.updates, ps.last_closed.sampled, ps.last_closed.population) == (0, 0, 4)
    assert math.isnan(ps.last_closed.loss) and ps.last_closed.sampling_rate == 0.25
    weights, bias, _ = model_values(ps)
    np.testing.assert_allclose(weights, 3 * 2.0 * 0.5 / 1.0)  # three rounds of noise alone, each z C / (q N)
    np.testing.assert_allclose(bias, 3.0)
    assert privacy.ledger.events == {(0.25, 2.0): 3}


def test_the_pld_accountant_gives_its_reference_epsilon():
    ledger = Ledger(1.0, 1e-5, "pld")
    ledger.restore({"sampled_fraction": np.array([0.01]), "noise_multiplier": np.array([1.0]),
                    "rounds": np.array([1000])})
    assert ledger.epsilon == pytest.approx(1.8282, abs=1e-3)


def test_every_worker_in_every_round_gives_no_meaningful_epsilon():
    ledger = Ledger(1.0, 1e-5)
    for _ in range(100):
        ledger.record_round(1.0)
    assert ledger.epsilon == pytest.approx(96.1, abs=0.1)


def test_adaptive_clipping_approaches_its_fixed_point():
    """Every update at norm 1, no noise: C grows from 0.1 by e^0.1 a round, 0.7389 after 20 (Andrew et al.)."""
    dp = DpFedAvg(DpSettings(noise_multiplier=0.0, clip=None, expected_updates=5))
    update = [np.full(4, 0.5, np.float32)]  # norm 1
    for _ in range(20):
        round = dp.start(SMALL, np.zeros(SMALL.nbytes, np.uint8))
        for _ in range(5):
            round.add([u.copy() for u in update], 1.0)
        dp.release(round, 1.0)
    assert dp.clip == pytest.approx(0.7389, abs=1e-4)
    # Past the norm, every update is within C, and C comes back down towards it.
    for _ in range(40):
        round = dp.start(SMALL, np.zeros(SMALL.nbytes, np.uint8))
        for _ in range(5):
            round.add([u.copy() for u in update], 1.0)
        dp.release(round, 1.0)
    assert 0.9 < dp.clip < 1.25


def test_the_aggregate_noise_has_std_z_c_over_m():
    """Identical updates over many rounds: the aggregate's std is z C / m, and its mean the clipped update."""
    z, clip, m, size = 1.5, 0.2, 4, 5000
    pipeline = pipeline_for(dp_noise_multiplier=z, dp_clip=clip, num_workers=m)
    layout = Layout.of([np.zeros(size, np.float32)], ["w"])
    update = [np.full(size, 1.0, np.float32)]  # norm sqrt(5000): clipped to C, each coordinate C / sqrt(size)
    aggregates = np.stack([one_round(pipeline, layout, [update] * m)[0] for _ in range(40)])
    assert aggregates.std() == pytest.approx(z * clip / m, rel=0.03)
    assert aggregates.mean() == pytest.approx(clip / math.sqrt(size), abs=4 * z * clip / m / math.sqrt(aggregates.size))


def test_the_denominator_is_the_expected_updates_not_those_received():
    pipeline = ServerPipeline(PipelineSettings(weighting="uniform", privacy=DpSettings(
        noise_multiplier=0.0, clip=10.0, expected_updates=4)))
    [aggregate] = one_round(pipeline, SMALL, [[np.ones(4, np.float32)]] * 2)
    np.testing.assert_allclose(aggregate, 0.5)  # 2 updates of 1, over 4 expected


def test_integer_tensors_are_not_released_and_the_global_models_stand():
    """A worker's integer tensors cannot be clipped: the aggregate keeps the global model's (one_round's 7s), which
    the server optimizer then takes, so a counter neither leaks a worker's value nor resets."""
    layout = Layout.of([np.zeros(2, np.float32), np.zeros(2, np.int64)], ["w", "steps"])
    pipeline = ServerPipeline(PipelineSettings(weighting="uniform", privacy=DpSettings(
        noise_multiplier=1.0, clip=1.0, expected_updates=1)))
    _, steps = one_round(pipeline, layout, [[np.zeros(2, np.float32), np.full(2, 10**9, np.int64)]])
    assert steps.tolist() == [7, 7]


def test_the_noise_comes_from_the_os_and_is_standard_normal():
    draws = secure_normal(2.0, 200_001)
    assert draws.shape == (200_001,) and np.isfinite(draws).all()
    assert draws.mean() == pytest.approx(0, abs=0.02) and draws.std() == pytest.approx(2.0, rel=0.01)
    assert not np.array_equal(secure_normal(1.0, 8), secure_normal(1.0, 8))


@pytest.mark.parametrize("flags, message", [
    ({"dp_noise_multiplier": 1.0}, "Noise without a clip"),
    ({"dp_clip": 1.0}, "a clip, not privacy"),
    ({"dp_noise_multiplier": 1.0, "dp_clip": 1.0, "weighting": "examples"}, "counts every update once"),
    ({"dp_noise_multiplier": 1.0, "dp_clip": 1.0, "aggregation": "median", "num_workers": 5}, "mean only"),
    ({"dp_noise_multiplier": 1.0, "dp_clip": 1.0, "max_update_norm": 2.0}, "unset COMIND_MAX_UPDATE_NORM"),
    ({"dp_noise_multiplier": 1.0, "dp_clip": "adaptive", "num_workers": 10}, "more than 10 updates a round"),
    ({"dp_noise_multiplier": 1.0, "dp_clip": 1.0, "num_workers": 3, "replicas_to_aggregate": 2},
     "push out another's update"),
])
def test_refusals(flags, message):
    with pytest.raises(ValueError, match=message):
        pipeline_for(**flags)


def test_dp_sets_uniform_weighting_and_adaptive_clipping_is_taken_with_enough_workers():
    pipeline = pipeline_for(dp_noise_multiplier=1.0, dp_clip="adaptive", num_workers=11)
    assert pipeline.settings.weighting == "uniform" and pipeline.privacy is not None
    assert pipeline.privacy.clip == 0.1 and pipeline.privacy.z_update > 1.0
    assert pipeline_for().settings.weighting == "examples"


def test_a_ps_sigkilled_and_restarted_continues_the_ledger(start_ps, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    flags = ["--num-workers", "2", "--rounds", "10", "--exit-grace", "5", "--lease-seconds", "2",
             "--checkpoint-dir", str(checkpoints), "--dp-noise-multiplier", "2", "--dp-clip", "0.5"]
    first = start_ps(*flags)
    outs = [tmp_path / f"worker-{task}.jsonl" for task in range(2)]
    workers = [start_worker(first.address, task, outs[task], delta=0.01, pause=0.15) for task in range(2)]
    first.wait_for(r"Round 4/10")
    first.kill()
    second = start_ps(*flags, port=first.port)
    resumed = int(second.wait_for(r"Resumed from \S+ at round (\d+)").group(1))
    second.wait_for(rf"The privacy ledger holds {resumed} rounds")
    for worker in workers:
        assert_finishes(worker, second)
    assert second.wait(timeout=60) == 0

    logged = [(int(r), float(e)) for log in (first.log(), second.log())
              for r, e in re.findall(r"Round (\d+)/10: .*, epsilon (\S+) at delta 1e-05", log)]
    epsilons = dict(logged)
    assert sorted(epsilons) == list(range(1, 11))
    assert all(epsilons[r + 1] > epsilons[r] for r in range(1, 10))  # never down, across the restart too
    final = np.load(checkpoints / "round-000000010.npz")
    assert int(final["state/dp/ledger/rounds"].sum()) == 10
    ledger = Ledger(2.0, 1e-5)
    ledger.restore({k.removeprefix("state/dp/ledger/"): final[k] for k in final.files if "dp/ledger" in k})
    assert ledger.epsilon == pytest.approx(epsilons[10], rel=1e-3)
    # The chief's view: every model carries the ledger's epsilon.
    seen = {h["round"]: h["epsilon"] for h in read_history(outs[0]) if h["round"] > 0}
    assert seen == pytest.approx({r: epsilons[r] for r in seen}, rel=1e-3) and json.dumps(seen)


@pytest.mark.parametrize("target", [24.0, None])
def test_the_ps_exports_its_target_epsilon_for_the_budget_alert(target):
    registry = CollectorRegistry()
    ps_for(registry, num_workers=2, dp_noise_multiplier=0.5, dp_clip=1.0,
           **({"dp_target_epsilon": target} if target else {}))
    exported = registry.get_sample_value("comind_dp_target_epsilon")
    assert exported == target if target else math.isnan(exported)


def test_the_accountant_brings_no_tensorflow_into_the_ps():
    code = ("import sys; from comind.accountant import Ledger; ledger = Ledger(1.0, 1e-5); ledger.record_round(1.0); "
            "bad = [m for m in ('tensorflow', 'keras') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_the_target_epsilon_ends_training_at_the_last_round_within_it(start_ps, tmp_path):
    """z 0.5 over 2 workers in every round: epsilon 10.7, 16.5, 21.4, 25.8 after rounds 1 to 4."""
    ps = start_ps("--num-workers", "2", "--rounds", "10", "--exit-grace", "5", "--lease-seconds", "2",
                  "--dp-noise-multiplier", "0.5", "--dp-clip", "1", "--dp-target-epsilon", "24")
    outs = [tmp_path / f"worker-{task}.jsonl" for task in range(2)]
    workers = [start_worker(ps.address, task, outs[task], delta=0.01) for task in range(2)]
    for worker in workers:
        assert_finishes(worker, ps)
    assert ps.wait(timeout=60) == 0
    assert re.search(r"The privacy budget is spent: round 4 would take epsilon to 25\.\d+, past "
                     r"COMIND_DP_TARGET_EPSILON=24, so training ends at round 3, with epsilon 21\.4", ps.log())
    history = read_history(outs[0])
    assert history[-1]["round"] == 3 and history[-1]["done"]
    assert history[-1]["epsilon"] == pytest.approx(21.44, abs=0.01)

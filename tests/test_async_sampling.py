"""Client sampling with asynchronous rounds: K workers train at once, each turn that ends passes to a worker drawn
uniformly from the live ones not training. The rules stepped by hand, the ps in-process over hundreds of draws (the
draw's uniformity, the log replayed, never more than K with a model to train), and real processes."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import secrets

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from comind.async_rounds import AsyncPolicy
from comind.pipeline import PipelineSettings, ServerPipeline
from comind.ps import ParameterServer, UpdateResult
from comind.rounds import RoundPolicy, Rounds, Verdict
from comind.sampling import SamplingPolicy, parse_ranges, select
from numpy_cluster import kill_one_and_finish, read_history, start_worker
from test_ps import data, delta, initialized, make_ps, timers_for
from test_rounds import Clock
from test_sampling import fixed_seeds

#: ``Round R selects seed 0x..., S of N live (tasks IDLE): tasks SELECTED (of those not training), T training at
#: once.``, as the ps logs each draw in asynchronous rounds.
DRAW = re.compile(r"Round (\d+) selects seed (0x[0-9a-f]+), (\d+) of (\d+) live \(tasks ([0-9.,]+)\): "
                  r"tasks ([0-9.,]+) \(of those not training\), (\d+) training at once\.")


def turns(clock, members=6, k=2, buffer=2, **policy) -> tuple[Rounds, list[str]]:
    rounds = Rounds(RoundPolicy(num_workers=members, total_rounds=100, round_timeout=60,
                                sampling=SamplingPolicy(clients_per_round=k), asynchronous=AsyncPolicy(buffer),
                                **policy), clock=clock, seeds=fixed_seeds())
    ids = [rounds.register(task) for task in range(members)]
    rounds.complete(0)
    return rounds, ids


def test_k_train_at_once_and_a_turn_that_ends_passes_to_one_not_training():
    clock = Clock()
    rounds, ids = turns(clock)
    first = rounds.draw()
    assert first is not None and len(first.selected) == 2 and rounds.selected == set(first.selected)
    assert rounds.draw() is None  # no free place
    a, b = (ids[task] for task in sorted(first.selected))
    idle = next(m for m in ids if not rounds.is_selected(m))
    assert rounds.check(idle, 1) is Verdict.NOT_SELECTED and rounds.check(a, 1) is Verdict.ACCEPT
    rounds.record(a)  # its update is taken: its turn ends, and its place is free
    assert not rounds.is_selected(a) and rounds.check(a, 1) is Verdict.NOT_SELECTED
    again = rounds.draw()
    assert again is not None and len(again.selected) == 1
    # Drawn from the live workers not training: every one but b, a included.
    assert set(again.population) == set(range(6)) - {rounds.members[b].task_index}
    assert len(rounds.selected) == 2 and rounds.population() == (2, 6)
    # A version's turns carry over to the next; one that ends without an update is counted as abandoned.
    rounds.complete(1)
    assert len(rounds.selected) == 2 and rounds.abandoned == 0
    rounds.leave(b)
    assert len(rounds.selected) == 1 and rounds.abandoned == 1
    rounds.leave(next(m for m in ids if m != b and not rounds.is_selected(m)))  # not training: nothing to end
    assert rounds.abandoned == 1
    assert rounds.draw() is not None and len(rounds.selected) == 2


def test_a_turn_without_an_update_for_the_round_timeout_ends_and_leases_end_turns_too():
    clock = Clock()
    rounds, ids = turns(clock, lease_seconds=100)
    rounds.draw()
    clock.now = 30.0
    assert rounds.next_event() == 60.0  # the turns' end, before any lease's
    training = sorted(rounds.selected)
    rounds.record(ids[training[0]])
    rounds.draw()
    clock.now = 60.0
    assert rounds.end_silent_turns() == [training[1]]  # the other's turn is 30 s old
    assert rounds.abandoned == 1 and len(rounds.selected) == 1
    clock.now = 100.0
    assert {m.task_index for m in rounds.expire()} == set(range(6))
    assert rounds.selected == set() and rounds.abandoned == 2


def test_the_buffer_defaults_to_half_the_workers_training_at_once_and_over_selection_is_refused():
    policy = RoundPolicy(num_workers=20, sampling=SamplingPolicy(clients_per_round=8), asynchronous=AsyncPolicy())
    assert policy.expected_updates == 4
    rounds, _ = turns(Clock(), members=10, k=6, buffer=None)
    assert rounds.buffer_size() == 3
    fraction = RoundPolicy(num_workers=20, sampling=SamplingPolicy(client_fraction=0.5), asynchronous=AsyncPolicy())
    assert fraction.expected_updates == 5
    with pytest.raises(ValueError, match="Unset --over-selection"):
        RoundPolicy(sampling=SamplingPolicy(clients_per_round=2, over_selection=0.5), asynchronous=AsyncPolicy())


# The ps in-process -------------------------------------------------------------

def async_ps(registry: CollectorRegistry, workers: int, k: int, **policy: object) -> ParameterServer:
    ps = make_ps(registry, pipeline=ServerPipeline(PipelineSettings(rounds_mode="async")), num_workers=workers,
                 sampling=SamplingPolicy(clients_per_round=k), **{"asynchronous": AsyncPolicy(2), **policy})
    ps.rounds._seeds = fixed_seeds()
    return ps


async def push(ps: ParameterServer, member: str, update_id: bytes | None = None) -> UpdateResult:
    header, arrays = delta(0.001, round=ps.round + 1)
    header = dataclasses.replace(header, update_id=update_id or secrets.token_bytes(16))
    return await ps.receive(member, header, data(arrays))


def test_a_retry_of_the_update_that_ended_a_turn_is_a_duplicate_not_a_refusal():
    async def scenario() -> None:
        ps = async_ps(CollectorRegistry(), 2, 1, total_rounds=10)
        members = await initialized(ps, 2)
        training = next(m for m in members if ps.rounds.is_selected(m))
        update_id = secrets.token_bytes(16)
        assert await push(ps, training, update_id) is UpdateResult.ACCEPTED
        assert not ps.rounds.is_selected(training)  # the draw (fixed seeds) passed the turn to the other worker
        # Its receipt was lost, and its retry comes.
        assert await push(ps, training, update_id) is UpdateResult.DUPLICATE
        assert ps.rounds.buffered == 1

    asyncio.run(scenario())


def test_over_600_turns_each_draw_is_uniform_over_the_workers_not_training_and_the_log_reproduces_it(caplog):
    workers, k, updates = 12, 3, 600
    registry = CollectorRegistry()

    async def scenario() -> list[set[int]]:
        ps = async_ps(registry, workers, k, total_rounds=updates // 2)
        members = await initialized(ps, workers)
        order = np.random.default_rng(3)  # which training worker's update comes in next
        idle: list[set[int]] = []  # the workers each draw after the first should draw from
        for step in range(updates):
            training = sorted(ps.rounds.selected)
            assert len(training) == k
            if step % 60 == 0:  # only training workers get a model; the others' calls wait
                models = [await ps.next_model(member, 0, 0.0) for member in members]
                assert {task for task, model in enumerate(models) if model is not None} == set(training)
                other = next(task for task in range(workers) if task not in training)
                assert await push(ps, members[other]) is UpdateResult.NOT_SELECTED
            task = int(order.choice(training))
            assert await push(ps, members[task]) is UpdateResult.ACCEPTED
            idle.append(set(range(workers)) - set(training) | {task})
        assert ps.done and ps.round == updates // 2
        return idle

    with caplog.at_level(logging.INFO, logger="comind.ps"):
        idle = asyncio.run(scenario())
    draws = [m for r in caplog.records if (m := DRAW.search(r.getMessage()))]
    assert len(draws) == 1 + len(idle)  # the first draw, then one per update (the last's, before its version)
    assert parse_ranges(draws[0].group(5)) == list(range(workers)) and len(parse_ranges(draws[0].group(6))) == k
    ranks = np.zeros(workers - k + 1)
    for draw, population in zip(draws[1:], idle, strict=True):
        members, chosen = parse_ranges(draw.group(5)), parse_ranges(draw.group(6))
        assert set(members) == population and int(draw.group(7)) == k
        assert select(members, len(chosen), int(draw.group(2), 16)) == chosen  # an auditor replays each draw
        ranks[members.index(chosen[0])] += 1
    # Each draw selects one of the m = 10 workers not training: uniformly, its rank among them is uniform on
    # 0..9, and over n = 600 draws the Pearson statistic sum (O - E)^2 / E, E = n/m, is chi-square with 9 degrees
    # of freedom, whose 0.999 quantile is 27.88 (fixed seeds: one outcome; any seeds fail one run in a thousand).
    expected = ranks.sum() / len(ranks)
    assert ((ranks - expected) ** 2 / expected).sum() < 27.88, ranks
    values = {status: registry.get_sample_value("comind_round_workers", {"status": status})
              for status in ("population", "selected", "reported", "dropped")}
    assert values == {"population": workers, "selected": k, "reported": 2, "dropped": 0}
    assert registry.get_sample_value("comind_round_sampling_rate") == k / workers
    assert registry.get_sample_value("comind_buffer_size") == 2


def test_a_silent_turn_passes_on_after_the_round_timeout(caplog):
    async def scenario() -> None:
        ps = async_ps(CollectorRegistry(), 3, 1, round_timeout=0.2)
        await initialized(ps, 3)
        await timers_for(ps, 0.5)
        assert ps.rounds.abandoned >= 1 and len(ps.rounds.selected) == 1

    with caplog.at_level(logging.INFO, logger="comind.ps"):
        asyncio.run(scenario())
    log = caplog.text
    assert "without an update: live, but silent; their turn passes to another worker" in log
    assert len(DRAW.findall(log)) >= 2, log


# Real processes ----------------------------------------------------------------

def test_a_training_worker_that_vanishes_passes_its_turn_on_at_its_lease_and_training_completes(start_ps, tmp_path):
    # A round timeout of two minutes: only the lease (2 s) can end the vanished worker's turn in time.
    ps = start_ps("--num-workers", "4", "--rounds", "12", "--rounds-mode", "async", "--clients-per-round", "2",
                  "--lease-seconds", "2", "--round-timeout", "120", "--exit-grace", "2")
    outs = [tmp_path / f"worker-{task}.jsonl" for task in range(4)]
    workers = [start_worker(ps.address, task, outs[task], pause=1.0) for task in range(4)]
    draw = DRAW.search(ps.wait_for(r"Round 2 selects .*").group(0))
    assert draw is not None
    gone = parse_ranges(draw.group(6))[0]  # its turn began: it is in its pretend training
    kill_one_and_finish(workers, gone, ps)
    log = ps.log()
    assert f"Worker {gone}'s lease ended" in log
    versions = re.findall(r"Round (\d+)/12: 1 updates, .* (\d) of (\d) live workers training \(q [0-9.]+\), "
                          r"(\d) turns ended without an update", log)
    assert [int(v[0]) for v in versions] == list(range(1, 13)), log
    assert all(int(v[1]) <= 2 for v in versions), versions
    # The vanished worker's turn ended at its lease; on a loaded machine another worker's lease may end too.
    assert 1 <= sum(int(v[3]) for v in versions) <= log.count("lease ended"), versions
    for task in range(4):
        if task != gone:
            rounds = [h["round"] for h in read_history(outs[task])]
            assert rounds == sorted(rounds) and rounds[-1] == 12, rounds

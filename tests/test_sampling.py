"""Client sampling: the draw, the rules of a sampled round, the ps in-process, and real processes."""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import re

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from comind import cli, settings
from comind.checkpoint import CheckpointStore
from comind.ps import ParameterServer, UpdateResult
from comind.ps_main import round_policy
from comind.rounds import RoundPolicy, Rounds, Verdict
from comind.sampling import SamplingPolicy, Selection, parse_ranges, ranges, select, select_poisson
from numpy_cluster import kill_one_and_finish, read_history, start_worker
from test_ps import data, delta, initialized, make_ps
from test_rounds import Clock

#: ``Round R selects seed 0x..., S of N live (tasks POPULATION): tasks SELECTED.``, as the ps logs each draw.
DRAW = re.compile(r"Round (\d+) selects seed (0x[0-9a-f]+), (\d+) of (\d+) live \(tasks ([0-9.,]+)\): "
                  r"tasks ([0-9.,]+|none)\.")


#: Worker-level DP's flags.
DP = ["--dp-noise-multiplier", "1", "--dp-clip", "1"]


def fixed_seeds(seed: int = 17):
    """Seeds that repeat from run to run, so that a statistical test has one outcome, not a failure rate."""
    return functools.partial(random.Random(seed).getrandbits, 128)


# The draw --------------------------------------------------------------------

def test_select_is_a_reproducible_uniform_subset():
    members = [2, 3, 5, 8, 13, 21]
    assert select(members, 3, 42) == select(members, 3, 42)
    assert len(set(select(members, 3, 42))) == 3 and set(select(members, 3, 42)) <= set(members)
    assert select(members, 3, 42) == sorted(select(members, 3, 42))
    assert select(members, 10, 1) == members and select(members, 0, 1) == []
    assert len({tuple(select(members, 3, seed)) for seed in range(200)}) == 20  # every 3-subset of 6 drawn
    with pytest.raises(ValueError, match="ascending"):
        select([3, 1], 1, 0)


def test_a_poisson_draw_reproduces_from_its_seed_and_selects_each_worker_with_probability_q():
    members, q, draws = list(range(0, 40, 2)), 0.25, 2000
    assert select_poisson(members, q, 42) == select_poisson(members, q, 42) == sorted(select_poisson(members, q, 42))
    assert select_poisson(range(20), 1.0, 7) == list(range(20))
    selection = Selection.draw_poisson(3, reversed(members), q, 42)  # what the ps logs, and an auditor replays
    assert selection.population == tuple(members) and sorted(selection.selected) == select_poisson(members, q, 42)
    assert f"Poisson q {q!r}, " in selection.describe()
    with pytest.raises(ValueError, match="ascending"):
        select_poisson([3, 1], q, 0)
    seeds = fixed_seeds()
    chosen = [select_poisson(members, q, seeds()) for _ in range(draws)]
    # Each worker's count O_i is Binomial(n = 2000, q = 1/4), independently of the others' (Poisson sampling has
    # no fixed size), so X^2 = sum_i (O_i - nq)^2 / (nq(1 - q)) is chi-square with 20 degrees of freedom: its
    # 0.999 quantile is 45.31. With fixed seeds the test has one outcome.
    observed = np.array([sum(member in c for c in chosen) for member in members], float)
    expected, variance = draws * q, draws * q * (1 - q)
    assert ((observed - expected) ** 2 / variance).sum() < 45.31, observed
    # The sample's size is Binomial(20, 1/4), not fixed: mean 5, variance 3.75.
    sizes = np.array([len(c) for c in chosen])
    assert sizes.mean() == pytest.approx(5, abs=0.15) and sizes.var() == pytest.approx(3.75, rel=0.15)
    # A draw from 3 selects no one with probability (3/4)^3 = 0.42.
    empty = sum(not select_poisson([0, 1, 2], q, seeds()) for _ in range(draws))
    assert empty / draws == pytest.approx(0.75**3, abs=4.5 * np.sqrt(0.42 * 0.58 / draws))


def test_client_sampling_is_poisson_with_worker_level_dp_and_of_fixed_size_without():
    def policy(**flags: object) -> SamplingPolicy:
        loaded = settings.load("ps", {"num_workers": "20", **{k: str(v) for k, v in flags.items()}})
        return round_policy(loaded).sampling

    dp = {"dp_noise_multiplier": 1.0, "dp_clip": 1.0}
    assert policy(clients_per_round=5).poisson_rate is None  # no DP: K of them, steadier rounds
    assert policy(clients_per_round=5, **dp).poisson_rate == 0.25  # K / --num-workers
    assert policy(client_fraction=0.1, **dp).poisson_rate == 0.1  # F
    assert policy(clients_per_round=30, max_members=40, **dp).poisson_rate == 1.0
    assert policy(**dp).poisson_rate is None  # DP without sampling: q = 1, every live worker


@pytest.mark.parametrize("numbers", [[], [4], [0, 1, 2, 3], [0, 2, 3, 4, 9, 11, 12], [-3, -2, 0]])
def test_ranges_read_back(numbers):
    assert parse_ranges(ranges(numbers)) == numbers
    assert ranges(list(range(10_000))) == "0..9999"


def test_the_quorum_and_the_draw_size():
    assert SamplingPolicy(clients_per_round=5).quorum(20) == 5
    assert SamplingPolicy(clients_per_round=5).quorum(3) == 3
    assert SamplingPolicy(clients_per_round=5, over_selection=0.3).size(20) == 7  # ceil(6.5)
    assert SamplingPolicy(clients_per_round=5, over_selection=0.2).size(20) == 6  # not 7 for 6.000000000000001
    assert SamplingPolicy(client_fraction=0.3).quorum(10) == 3
    assert SamplingPolicy(client_fraction=0.01).quorum(10) == 1
    assert SamplingPolicy(clients_per_round=5, over_selection=1.0).size(8) == 8


@pytest.mark.parametrize("flags, message", [
    (["--clients-per-round", "5", "--client-fraction", "0.5"], "not both"),
    (["--over-selection", "0.2"], "needs client sampling"),
    (["--clients-per-round", "5", "--replicas-to-aggregate", "6"], "replicas_to_aggregate must not exceed"),
    (["--clients-per-round", "5", "--min-updates", "6"], "min_updates must not exceed"),
    (["--clients-per-round", "50", "--max-members", "8"], "clients_per_round must not exceed max_members"),
    # With worker-level DP, sampling is Poisson: nothing may close a round on who else reported.
    (["--clients-per-round", "2", "--over-selection", "0.5", *DP], "Unset --over-selection"),
    (["--client-fraction", "0.5", "--replicas-to-aggregate", "1", *DP], "close at the first updates in"),
    (["--clients-per-round", "2", "--min-updates", "2", *DP], "--min-updates above 1"),
])
def test_contradictory_settings_are_refused_at_start_with_exit_2(flags, message, capsys):
    options = dict(zip([f[2:].replace("-", "_") for f in flags[::2]], flags[1::2], strict=True))
    with pytest.raises(ValueError, match=message):
        round_policy(settings.load("ps", options))
    with pytest.raises(SystemExit) as exit:
        cli.main(["local", "--workers", "4", *flags])
    assert exit.value.code == 2 and message in capsys.readouterr().err


# The rules of a sampled round --------------------------------------------------

def sampled(clock, members=6, **sampling):
    rounds = Rounds(RoundPolicy(num_workers=members, round_timeout=60, sampling=SamplingPolicy(**sampling)),
                    clock=clock, seeds=fixed_seeds())
    ids = [rounds.register(task) for task in range(members)]
    rounds.complete(0)
    return rounds, ids


def test_a_sampled_round_takes_only_its_selected_workers_and_closes_at_k():
    rounds, ids = sampled(Clock(), clients_per_round=2, over_selection=0.5)
    selection = rounds.draw()
    assert selection is not None and len(selection.selected) == 3 and rounds.draw() is None  # one draw a round
    chosen = [mid for mid in ids if rounds.is_selected(mid)]
    others = [mid for mid in ids if not rounds.is_selected(mid)]
    assert len(chosen) == 3 and all(rounds.check(mid, 1) is Verdict.NOT_SELECTED for mid in others)
    rounds.record(chosen[0])
    assert not rounds.ready_to_close()
    rounds.record(chosen[1])
    assert rounds.ready_to_close()  # K = 2 of the 3 selected: the third is not waited for
    assert rounds.population() == (3, 6)
    rounds.begin_close()
    rounds.complete(1)
    assert not rounds.selected and rounds.draw() is not None


def test_a_round_closes_once_every_selected_worker_still_live_has_reported():
    clock = Clock()
    rounds, ids = sampled(clock, clients_per_round=3)
    rounds.draw()
    chosen = [mid for mid in ids if rounds.is_selected(mid)]
    rounds.record(chosen[0])
    rounds.record(chosen[1])
    assert not rounds.ready_to_close()
    rounds.leave(chosen[2])
    assert rounds.ready_to_close()


def test_a_round_past_its_deadline_without_min_updates_draws_again():
    clock = Clock()
    rounds, ids = sampled(clock, clients_per_round=2)
    first = rounds.draw()
    assert first is not None
    for mid in [mid for mid in ids if rounds.is_selected(mid)]:
        rounds.leave(mid)  # both selected workers vanish
    clock.now = 61
    assert rounds.overdue() and not rounds.ready_to_close()
    again = rounds.draw_again()
    assert again is not None and len(again.selected) == 2 and not again.selected & first.selected
    assert again.population == tuple(sorted(set(range(6)) - first.selected))
    assert select(list(again.population), 2, again.seed) == sorted(again.selected)


def test_the_first_round_draws_once_the_expected_workers_are_in_or_at_its_deadline():
    clock = Clock()
    rounds = Rounds(RoundPolicy(num_workers=3, round_timeout=60, sampling=SamplingPolicy(clients_per_round=1)),
                    clock=clock)
    rounds.register(0)
    rounds.complete(0)
    assert rounds.draw() is None  # one of the three expected
    clock.now = 60
    selection = rounds.draw()
    assert selection is not None and selection.population == (0,)


def test_a_poisson_round_takes_every_selected_worker_closes_at_once_on_an_empty_draw_and_never_draws_again():
    clock = Clock()
    rounds, ids = sampled(clock, members=8, client_fraction=0.5, poisson_rate=0.5)
    selection = rounds.draw()
    assert selection is not None and selection.poisson_rate == 0.5
    assert sorted(selection.selected) == select_poisson(range(8), 0.5, selection.seed)
    chosen = [mid for mid in ids if rounds.is_selected(mid)]
    assert len(chosen) >= 2  # the fixed seeds' draw
    for mid in chosen[:-1]:
        rounds.record(mid)
        assert not rounds.ready_to_close()  # no K: it takes them all
    rounds.leave(chosen[-1])
    assert rounds.ready_to_close()  # every selected worker still live has reported
    assert rounds.population() == (len(chosen), 8)
    rounds.begin_close()
    rounds.complete(1)

    # A draw that selects no one: the round may close at once, with no update.
    rounds._seeds = lambda: next(seed for seed in range(1000) if not select_poisson(range(7), 0.5, seed))
    empty = rounds.draw()
    assert empty is not None and not empty.selected and rounds.ready_to_close()
    rounds.begin_close()
    rounds.complete(2)

    # Selected workers that stay silent: at the deadline the round closes with what it has, none included, and
    # draws no one else (a second chance would select a worker with a probability above q).
    rounds._seeds = fixed_seeds()
    assert rounds.draw() is not None and not rounds.ready_to_close()
    clock.now += 60
    assert not rounds.overdue() and rounds.draw_again() is None and rounds.ready_to_close()
    assert sorted(rounds.silent_members()) == sorted(rounds.selected & {m.task_index for m in rounds.members.values()})


# The ps in-process -------------------------------------------------------------

def test_over_200_rounds_each_worker_is_selected_as_often_as_the_binomial_says_and_the_log_reproduces_it(caplog):
    workers, k, total = 20, 5, 200

    async def scenario() -> dict[int, int]:
        ps = make_ps(num_workers=workers, total_rounds=total, sampling=SamplingPolicy(clients_per_round=k))
        ps.rounds._seeds = fixed_seeds()
        members = await initialized(ps, workers)
        accepted = dict.fromkeys(range(workers), 0)
        for round in range(1, total + 1):
            for task, member in enumerate(members):
                if round <= 3 or ps.rounds.is_selected(member):  # every worker tries in the first rounds
                    header, arrays = delta(1.0, round=round)
                    result = await ps.receive(member, header, data(arrays))
                    assert result in (UpdateResult.ACCEPTED, UpdateResult.NOT_SELECTED, UpdateResult.STALE)
                    accepted[task] += result is UpdateResult.ACCEPTED
            assert ps.round == round and ps.last_closed is not None
            assert (ps.last_closed.sampled, ps.last_closed.population, ps.last_closed.updates) == (k, workers, k)
            assert ps.last_closed.sampling_rate == k / workers
        return accepted

    with caplog.at_level(logging.INFO, logger="comind.ps"):
        accepted = asyncio.run(scenario())
    draws = [DRAW.search(r.getMessage()) for r in caplog.records]
    draws = [d for d in draws if d]
    assert [int(d.group(1)) for d in draws] == list(range(1, total + 1))
    counts = dict.fromkeys(range(workers), 0)
    for draw in draws:  # what an auditor does with the log: each seed gives the round's selection again
        population, chosen = parse_ranges(draw.group(5)), parse_ranges(draw.group(6))
        assert select(population, k, int(draw.group(2), 16)) == chosen
        for task in chosen:
            counts[task] += 1
    assert counts == accepted  # exactly the selected workers' updates counted
    # Each worker's count O_i is Binomial(n = 200, p = K / N = 1/4): mean E = np = 50, variance np(1 - p) = 37.5.
    # Drawing K without replacement makes two workers' counts of one round covary by -p(1 - p)/(N - 1), so the
    # counts' covariance is np(1 - p) N/(N - 1) (I - J/N), and X^2 = (N - 1)/N sum_i (O_i - E)^2 / (np(1 - p))
    # is chi-square with N - 1 = 19 degrees of freedom. Its 0.999 quantile is 43.82: the test rejects
    # uniform selection at significance 0.001 (with fixed seeds it has one outcome; any seeds fail one run in
    # a thousand). Each count is also within 4.5 standard deviations of 50 (two-sided 7e-6 each).
    n, p = total, k / workers
    observed = np.array(list(counts.values()), float)
    chi_square = (workers - 1) / workers * ((observed - n * p) ** 2).sum() / (n * p * (1 - p))
    assert chi_square < 43.82, (chi_square, counts)
    assert (abs(observed - n * p) < 4.5 * np.sqrt(n * p * (1 - p))).all(), counts


def test_an_unselected_worker_waits_for_its_turn_and_every_worker_takes_the_final_model():
    async def scenario():
        ps = make_ps(num_workers=4, total_rounds=2, sampling=SamplingPolicy(clients_per_round=1))
        members = await initialized(ps, 4)
        chosen = next(m for m in members if ps.rounds.is_selected(m))
        waiting = [m for m in members if m != chosen]
        assert (await ps.next_model(chosen, -1, 1.0)).round == 0
        assert [await ps.next_model(m, -1, 0.05) for m in waiting] == [None] * 3
        held = [asyncio.ensure_future(ps.next_model(m, -1, 5.0)) for m in waiting]
        header, arrays = delta(1.0)
        assert await ps.receive(waiting[0], header, data(arrays)) is UpdateResult.NOT_SELECTED
        assert await ps.receive(chosen, header, data(arrays)) is UpdateResult.ACCEPTED
        # Round 2's draw wakes only the worker it selects; the others wait on.
        await asyncio.sleep(0.01)
        woken = [m for m, call in zip(waiting, held, strict=True) if call.done()]
        assert woken == [m for m in waiting if ps.rounds.is_selected(m)]
        for member in [chosen, *waiting]:
            if ps.rounds.is_selected(member):
                assert await ps.receive(member, delta(1.0, round=2)[0], data(arrays)) is UpdateResult.ACCEPTED
        models = await asyncio.gather(*held)
        assert [(m.round, m.done) for m in models] == [(1, False) if m in woken else (2, True) for m in waiting]

    asyncio.run(scenario())


def test_a_restarted_ps_keeps_sampling(tmp_path, caplog):
    store = CheckpointStore(tmp_path, keep=2)

    async def rounds(ps: ParameterServer, members: list[str], first: int, last: int) -> None:
        for round in range(first, last + 1):
            for member in [m for m in members if ps.rounds.is_selected(m)]:
                header, arrays = delta(1.0, round=round)
                assert await ps.receive(member, header, data(arrays)) is UpdateResult.ACCEPTED
            assert ps.round == round

    async def scenario():
        policy = {"num_workers": 6, "total_rounds": 4, "sampling": SamplingPolicy(clients_per_round=2)}
        ps = make_ps(store=store, **policy)
        await rounds(ps, await initialized(ps, 6), 1, 2)
        again = make_ps(store=store, **policy)
        assert again.round == 2 and not again.rounds.draws  # it waits for its workers to come back
        members = [again.join(task, "back").member_id for task in range(6)]
        assert len(again.rounds.selected) == 2
        await rounds(again, members, 3, 4)
        assert again.done and again.last_closed is not None and again.last_closed.sampled == 2

    with caplog.at_level(logging.INFO, logger="comind.ps"):
        asyncio.run(scenario())
    assert [int(m.group(1)) for r in caplog.records if (m := DRAW.search(r.getMessage()))] == [1, 2, 3, 3, 4]


def test_the_round_workers_gauges():
    registry = CollectorRegistry()

    async def scenario():
        ps = make_ps(registry, num_workers=4, sampling=SamplingPolicy(clients_per_round=2, over_selection=0.5))
        members = await initialized(ps, 4)
        header, arrays = delta(1.0)
        for member in [m for m in members if ps.rounds.is_selected(m)][:2]:
            assert await ps.receive(member, header, data(arrays)) is UpdateResult.ACCEPTED

    asyncio.run(scenario())
    values = {status: registry.get_sample_value("comind_round_workers", {"status": status})
              for status in ("population", "selected", "reported", "dropped")}
    assert values == {"population": 4, "selected": 3, "reported": 2, "dropped": 1}
    assert registry.get_sample_value("comind_round_sampling_rate") == 0.75


# Real processes ----------------------------------------------------------------

def test_a_selected_worker_that_vanishes_is_covered_by_over_selection_without_the_deadline(start_ps, tmp_path):
    # Leases and deadlines of two minutes: only over-selection can close the rounds in time.
    ps = start_ps("--num-workers", "4", "--rounds", "6", "--clients-per-round", "2", "--over-selection", "0.5",
                  "--lease-seconds", "120", "--round-timeout", "120", "--exit-grace", "2")
    outs = [tmp_path / f"worker-{task}.jsonl" for task in range(4)]
    workers = [start_worker(ps.address, task, outs[task], pause=0.5) for task in range(4)]
    ps.wait_for(r"Round 1/6: 2 updates")
    draw = DRAW.search(ps.wait_for(r"Round 2 selects .*").group(0))
    assert draw is not None
    gone = parse_ranges(draw.group(6))[0]  # selected for round 2, and still in its pretend training
    kill_one_and_finish(workers, gone, ps)
    log = ps.log()
    for round in range(1, 7):
        assert re.search(rf"Round {round}/6: 2 updates, .* 3 of 4 live workers selected \(q 0\.75\)", log), log
    assert "deadline" not in log
    for task in range(4):
        if task != gone:
            rounds = [h["round"] for h in read_history(outs[task])]
            assert rounds == sorted(set(rounds)) and rounds[-1] == 6

"""The ps's core in-process, on domain types: no gRPC, no processes.

Each test drives :class:`comind.ps.ParameterServer` the way ``service.py``
does, with updates as async iterators of bytes, and reads the results back
from the ps's model, its checkpoints and a fresh metrics registry.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from comind import ps as ps_module
from comind import refusals, service, transfers
from comind.checkpoint import CheckpointStore
from comind.metrics import PsMetrics
from comind.pipeline import PipelineSettings, ServerPipeline
from comind.ps import ParameterServer, UpdateHeader, UpdateKind, UpdateResult
from comind.rounds import RoundPolicy
from comind.server_optimizers import ServerOptimizerSettings, adam_step
from comind.tensors import Layout, TensorSpec, chunks

INITIAL = [np.zeros((4, 3), np.float32), np.zeros(3, np.float32), np.array([5], np.int64)]
LAYOUT = Layout.of(INITIAL)


async def data(arrays: Sequence[np.ndarray]) -> AsyncIterator[bytes]:
    for chunk in chunks(LAYOUT.pack(arrays), chunk_bytes=16):
        yield chunk


def make_ps(registry: CollectorRegistry | None = None, *, pipeline: ServerPipeline | None = None,
            store: CheckpointStore | None = None, **policy: object) -> ParameterServer:
    settings = {"num_workers": 2, "total_rounds": 5, "lease_seconds": 30.0, **policy}
    return ParameterServer(RoundPolicy(**settings), PsMetrics(registry or CollectorRegistry()),  # type: ignore[arg-type]
                           pipeline=pipeline, store=store)


async def initialized(ps: ParameterServer, workers: int = 2) -> list[str]:
    members = [ps.join(task, f"worker {task}").member_id for task in range(workers)]
    header = UpdateHeader(UpdateKind.INITIAL, 0, LAYOUT)
    assert await ps.receive(members[0], header, data(INITIAL)) is UpdateResult.ACCEPTED
    return members


def delta(value: float, counter: int = 5, examples: int = 10, round: int = 1) -> tuple[UpdateHeader, list]:
    arrays = [np.full((4, 3), value, np.float32), np.full(3, value, np.float32), np.array([counter], np.int64)]
    return UpdateHeader(UpdateKind.DELTA, round, LAYOUT, examples, loss=1.0, accuracy=0.5), arrays


async def timers_for(ps: ParameterServer, seconds: float) -> None:
    """Runs the ps's timers (leases, deadlines) for ``seconds``."""
    timers = asyncio.create_task(ps.run_timers())
    await asyncio.sleep(seconds)
    timers.cancel()


def model_values(ps: ParameterServer) -> list[np.ndarray]:
    assert ps.model is not None
    return ps.model.layout.views(ps.model.packed)


@pytest.mark.parametrize("weighting, expected", [("examples", (1 * 100 + 4 * 300) / 400), ("uniform", 2.5)])
def test_a_round_adds_the_weighted_mean_of_the_deltas(weighting, expected):
    async def scenario():
        ps = make_ps(pipeline=ServerPipeline(PipelineSettings(weighting=weighting)))
        a, b = await initialized(ps)
        for member, value, counter, examples in ((a, 1.0, 7, 100), (b, 4.0, 10, 300)):
            header, arrays = delta(value, counter, examples)
            assert await ps.receive(member, header, data(arrays)) is UpdateResult.ACCEPTED
        return ps

    ps = asyncio.run(scenario())
    assert ps.round == 1
    kernel, bias, counter = model_values(ps)
    np.testing.assert_allclose(kernel, expected, rtol=1e-6)
    np.testing.assert_allclose(bias, expected, rtol=1e-6)
    # Integer tensors travel as values: their mean, rounded, replaces them.
    assert counter[0] == round((7 * 100 + 10 * 300) / 400 if weighting == "examples" else 8.5)


def test_stale_duplicate_and_early_updates_are_receipts_and_change_nothing():
    async def scenario():
        registry = CollectorRegistry()
        ps = make_ps(registry)
        a, b = await initialized(ps)
        header, arrays = delta(1.0)
        assert await ps.receive(a, header, data(arrays)) is UpdateResult.ACCEPTED
        assert await ps.receive(a, header, data(arrays)) is UpdateResult.DUPLICATE
        early, _ = delta(1.0, round=3)
        assert await ps.receive(b, early, data(arrays)) is UpdateResult.EARLY
        assert await ps.receive(b, header, data(arrays)) is UpdateResult.ACCEPTED  # closes round 1
        assert await ps.receive(b, header, data(arrays)) is UpdateResult.STALE
        return ps, registry

    ps, registry = asyncio.run(scenario())
    assert ps.round == 1
    np.testing.assert_allclose(model_values(ps)[0], 1.0)
    counts = {result: registry.get_sample_value("comind_updates_total", {"result": result})
              for result in ("accepted", "duplicate", "early", "stale")}
    assert counts == {"accepted": 2, "duplicate": 1, "early": 1, "stale": 1}


async def never_read() -> AsyncIterator[bytes]:
    """Bytes that the ps must not read."""
    raise AssertionError("the ps read bytes it was to refuse or did not need")
    yield b""


def test_an_initial_model_the_ps_does_not_need_is_not_read():
    async def scenario():
        ps = make_ps()
        a, _ = await initialized(ps)
        return await ps.receive(a, UpdateHeader(UpdateKind.INITIAL, 0, LAYOUT), never_read())

    assert asyncio.run(scenario()) is UpdateResult.NOT_NEEDED


@pytest.mark.parametrize("case, error", [
    ("unknown member", refusals.UnknownMember),
    ("wrong shape", refusals.InvalidRequest),
    ("no examples", refusals.InvalidRequest),
    ("NaN loss", refusals.NotFinite),
    ("NaN value", refusals.NotFinite),
    ("truncated", refusals.TruncatedStream),
    ("2**62 examples", refusals.InvalidRequest),  # would be all of the mean
])
def test_bad_updates_are_refusals_that_change_nothing(case, error):
    async def scenario():
        registry = CollectorRegistry()
        ps = make_ps(registry)
        a, _ = await initialized(ps)
        header, arrays = delta(1.0)
        member = "0" * 32 if case == "unknown member" else a
        stream = data(arrays)
        if case == "wrong shape":
            header = UpdateHeader(UpdateKind.DELTA, 1, Layout.of([np.zeros((3, 4), np.float32)]), 10)
        elif case == "no examples":
            header = delta(1.0, examples=0)[0]
        elif case == "2**62 examples":
            header = delta(1.0, examples=2**62)[0]
        elif case == "NaN loss":
            header = UpdateHeader(UpdateKind.DELTA, 1, LAYOUT, 10, loss=float("nan"))
        elif case == "NaN value":
            arrays[1][2] = np.nan
            stream = data(arrays)
        elif case == "truncated":
            async def first_chunk() -> AsyncIterator[bytes]:
                yield LAYOUT.pack(arrays).tobytes()[:20]
            stream = first_chunk()
        with pytest.raises(error):
            await ps.receive(member, header, stream)
        return ps, registry

    ps, registry = asyncio.run(scenario())
    np.testing.assert_array_equal(model_values(ps)[0], 0.0)
    assert ps.rounds.contributors == set()
    assert registry.get_sample_value("comind_updates_total", {"result": "rejected"}) == 1


def test_every_refusal_has_its_own_status():
    def kinds_of(cls: type) -> set[type]:
        return {kind for sub in cls.__subclasses__() for kind in {sub} | kinds_of(sub)}

    # Secure aggregation's too (comind/secagg/errors.py), which service.py imports.
    assert kinds_of(refusals.Refusal) == set(service.STATUSES), \
        "a refusal without a status would reach the worker as UNKNOWN"


def test_the_ps_core_imports_neither_grpc_nor_tensorflow():
    code = ("import sys, comind.ps; bad = [m for m in ('grpc', 'tensorflow', 'keras') if m in sys.modules]; "
            "print(bad); sys.exit(bool(bad))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_busy_ps_is_counted_as_busy_not_rejected(monkeypatch):
    async def scenario():
        registry = CollectorRegistry()
        ps = ParameterServer(RoundPolicy(num_workers=2, total_rounds=5), PsMetrics(registry),
                             max_concurrent_updates=1)
        a, b = await initialized(ps)
        allowed = iter([0.5, 0.1])  # the first update holds the only slot longer than the second may wait
        monkeypatch.setattr(transfers, "transfer_seconds", lambda nbytes: next(allowed))
        release = asyncio.Event()

        async def held() -> AsyncIterator[bytes]:
            await release.wait()
            yield b""

        header, arrays = delta(1.0)
        slow = asyncio.ensure_future(ps.receive(a, header, held()))
        await asyncio.sleep(0.05)
        with pytest.raises(refusals.Busy):
            await ps.receive(b, header, data(arrays))
        with pytest.raises(refusals.TooSlow):
            await slow
        return registry

    registry = asyncio.run(scenario())
    assert registry.get_sample_value("comind_updates_total", {"result": "busy"}) == 1
    assert registry.get_sample_value("comind_updates_total", {"result": "rejected"}) == 1  # the slow one


class _FailingAggregate:
    count = 2

    def add(self, update, weight):
        pass

    def result(self):
        raise MemoryError("no room for the median")


def test_a_round_whose_aggregation_fails_keeps_the_previous_model_and_training_goes_on(caplog):
    async def scenario():
        ps = make_ps()
        a, b = await initialized(ps)
        real_start = ps.pipeline.aggregator.start
        ps.pipeline.aggregator.start = lambda layout: _FailingAggregate()  # type: ignore[method-assign]
        for member in (a, b):
            header, arrays = delta(1.0)
            await ps.receive(member, header, data(arrays))
        after_failure = ps.round, model_values(ps)[0].copy()
        ps.pipeline.aggregator.start = real_start  # type: ignore[method-assign]
        for member in (a, b):
            header, arrays = delta(2.0, round=2)
            assert await ps.receive(member, header, data(arrays)) is UpdateResult.ACCEPTED
        return ps, after_failure

    with caplog.at_level(logging.ERROR):
        ps, (round, kernel) = asyncio.run(scenario())
    assert round == 1 and (kernel == 0).all()  # the round ended, with the previous model
    assert "aggregation failed" in caplog.text and "MemoryError" in caplog.text
    assert ps.round == 2
    np.testing.assert_allclose(model_values(ps)[0], 2.0)


def test_the_timers_survive_their_own_errors(monkeypatch, caplog):
    monkeypatch.setattr("comind.ps.TIMER_RETRY_SECONDS", 0.01)

    async def scenario():
        ps = make_ps(lease_seconds=0.2)
        ps.join(0, "")
        real_expire, calls = ps.rounds.expire, []

        def expire_failing_once():
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("a bug in the timers")
            return real_expire()

        ps.rounds.expire = expire_failing_once  # type: ignore[method-assign]
        await timers_for(ps, 0.6)
        return ps

    with caplog.at_level(logging.WARNING):
        ps = asyncio.run(scenario())
    assert "timers failed" in caplog.text and "a bug in the timers" in caplog.text
    assert ps.rounds.members == {}  # the lease still ended after the error
    assert "lease ended" in caplog.text


class CountingOptimizer:
    """A server optimizer with state: the number of steps, and the sum of every aggregate."""

    learning_rate = 1.0

    def initial_state(self, layout):
        return {"steps": np.zeros((), np.int64), "total": np.zeros(layout.nbytes, np.uint8)}

    def step(self, layout, model, aggregate, state):
        total = state["total"].copy()
        for out, change in zip(layout.views(total), layout.views(aggregate), strict=True):
            if out.dtype.kind == "f":
                out += change
        packed, _ = ServerPipeline().optimizer.step(layout, model, aggregate, {})
        return packed, {"steps": state["steps"] + 1, "total": total}


def test_stage_state_is_saved_with_the_model_and_restored_on_resume(tmp_path):
    def pipeline() -> ServerPipeline:
        stages = ServerPipeline()
        stages.optimizer = CountingOptimizer()  # type: ignore[assignment]
        return stages

    async def rounds(ps: ParameterServer, members: list[str], values: Sequence[float], first: int) -> None:
        for offset, value in enumerate(values):
            for member in members:
                header, arrays = delta(value, round=first + offset)
                assert await ps.receive(member, header, data(arrays)) is UpdateResult.ACCEPTED

    async def interrupted():
        ps = make_ps(pipeline=pipeline(), store=CheckpointStore(tmp_path / "run"))
        await rounds(ps, await initialized(ps), [1.0, 2.0], first=1)
        resumed = make_ps(pipeline=pipeline(), store=CheckpointStore(tmp_path / "run"))
        assert resumed.round == 2
        members = [resumed.join(task, "").member_id for task in range(2)]
        await rounds(resumed, members, [3.0], first=3)
        return resumed

    async def uninterrupted():
        ps = make_ps(pipeline=pipeline())
        await rounds(ps, await initialized(ps), [1.0, 2.0, 3.0], first=1)
        return ps

    resumed, straight = asyncio.run(interrupted()), asyncio.run(uninterrupted())
    assert resumed.pipeline.state().keys() == {"server_optimizer/fedavg/steps", "server_optimizer/fedavg/total"}
    for key, value in straight.pipeline.state().items():
        np.testing.assert_array_equal(resumed.pipeline.state()[key], value)
    assert int(resumed.pipeline.state()["server_optimizer/fedavg/steps"]) == 3
    np.testing.assert_array_equal(resumed.model.packed, straight.model.packed)
    saved = CheckpointStore(tmp_path / "run").latest()
    assert saved is not None and saved.round == 3 and int(saved.state["server_optimizer/fedavg/steps"]) == 3


@pytest.mark.parametrize("aggregation", ["mean", "median"])
def test_the_server_optimizer_steps_on_what_the_aggregator_gives(aggregation):
    settings = ServerOptimizerSettings(learning_rate=0.1, beta1=0.9, beta2=0.99, epsilon=1e-3)

    async def scenario():
        registry = CollectorRegistry()
        ps = make_ps(registry, pipeline=ServerPipeline(PipelineSettings(
            aggregation=aggregation, server_optimizer="fedadam", server_optimizer_settings=settings)), num_workers=3)
        members = await initialized(ps, workers=3)
        for rounds in range(2):
            for member, value in zip(members, [1.0, 2.0, 10.0], strict=True):
                header, arrays = delta(value, counter=7, round=rounds + 1)
                assert await ps.receive(member, header, data(arrays)) is UpdateResult.ACCEPTED
        return ps, registry

    ps, registry = asyncio.run(scenario())
    # Equal examples: the mean of 1, 2 and 10 is 13/3; their median 2.
    aggregate = {"mean": np.float32(13 / 3), "median": np.float32(2.0)}[aggregation]
    x, m, v = (np.zeros((), np.float32),) * 3
    for step in (1, 2):
        x, m, v = adam_step(x, aggregate, m, v, step, learning_rate=0.1, beta1=0.9, beta2=0.99, epsilon=1e-3)
    weights, bias, counter = LAYOUT.views(ps.model.packed)
    np.testing.assert_allclose(weights, np.full((4, 3), x), rtol=1e-6)
    np.testing.assert_allclose(bias, np.full(3, x), rtol=1e-6)
    assert int(counter[0]) == 7
    state = ps.pipeline.state()
    assert int(state["server_optimizer/fedadam/step"]) == 2
    np.testing.assert_allclose(state["server_optimizer/fedadam/m/00000"], np.full((4, 3), m), rtol=1e-6)
    assert registry.get_sample_value("comind_server_learning_rate") == 0.1
    assert registry.get_sample_value("comind_server_optimizer_info", {"name": "fedadam"}) == 1


@pytest.mark.parametrize("task, round, error", [(1, 0, refusals.NotChief), (0, 10**9, refusals.InvalidRequest),
                                                (0, -1, refusals.InvalidRequest)])
def test_only_the_chief_reports_evaluations_and_only_of_published_rounds(task, round, error):
    async def scenario():
        registry = CollectorRegistry()
        ps = make_ps(registry)
        chief, other = await initialized(ps)
        with pytest.raises(error):
            ps.report_eval(chief if task == 0 else other, round, 0.1, 1.0)
        ps.report_eval(chief, 0, 0.5, 0.25)
        return registry

    registry = asyncio.run(scenario())
    assert registry.get_sample_value("comind_eval_accuracy") == 0.25


def test_a_round_that_closes_at_its_deadline_names_the_silent_workers(caplog):
    async def scenario():
        ps = make_ps(round_timeout=0.3)
        chief, _ = await initialized(ps)
        ps.join(2, "")  # a third member, as silent as the second
        header, arrays = delta(1.0)
        await ps.receive(chief, header, data(arrays))
        await timers_for(ps, 0.8)
        return ps

    with caplog.at_level(logging.WARNING):
        ps = asyncio.run(scenario())
    assert ps.round == 1
    assert "Round 1 closes at its deadline without an update from task 1, 2" in caplog.text


# Hostile members ---------------------------------------------------------------


def test_a_task_index_has_one_live_member_but_the_same_process_may_join_again():
    async def scenario():
        registry = CollectorRegistry()
        ps = make_ps(registry, lease_seconds=0.3)
        first = ps.join(1, "pod-a", instance="process a").member_id
        with pytest.raises(refusals.TaskTaken, match=r"Task index 1 is held by a live worker \(pod-a\).*"
                                                     r"COMIND_TASK_INDEX") as caught:
            ps.join(1, "pod-b", instance="process b")
        assert 0.2 < caught.value.retry_after <= 0.3  # the rest of the holder's lease
        again = ps.join(1, "pod-a", instance="process a").member_id  # its reply was lost: the same membership
        await asyncio.sleep(0.3)  # the holder renews nothing: a worker restarted in place waits this out
        restarted = ps.join(1, "pod-b", instance="process b").member_id
        return registry, ps, first, again, restarted

    registry, ps, first, again, restarted = asyncio.run(scenario())
    assert again == first and restarted != first
    assert list(ps.rounds.members) == [restarted]
    assert registry.get_sample_value("comind_joins_refused_total", {"reason": "taken"}) == 1


def test_members_are_bounded_and_registrations_rate_limited_without_a_log_line_each(caplog):
    async def scenario():
        registry = CollectorRegistry()
        ps = make_ps(registry, max_members=3, num_workers=2)  # 3 registrations per 30 s lease, 3 at once
        members = [ps.join(task, "").member_id for task in range(3)]
        with pytest.raises(refusals.TooManyMembers, match="COMIND_MAX_MEMBERS") as full:
            ps.join(3, "")
        ps.leave(members[0], None)
        refused = 0
        for _ in range(1000):  # a loop that registers as fast as it can
            with pytest.raises(refusals.TooManyJoins) as throttled:
                ps.join(0, "")
            refused += 1
        return registry, full.value, throttled.value, refused

    with caplog.at_level(logging.INFO):
        registry, full, throttled, refused = asyncio.run(scenario())
    assert 0 < full.retry_after <= 30
    assert 0 < throttled.retry_after <= 10  # a token comes back every lease / max_members
    counts = {reason: registry.get_sample_value("comind_joins_refused_total", {"reason": reason})
              for reason in ("full", "rate", "taken")}
    assert counts == {"full": 1, "rate": refused, "taken": 0}
    assert len(caplog.records) < 10, [r.getMessage() for r in caplog.records]  # 3 joins, 1 leave, 2 summaries


def test_only_the_chief_gives_the_initial_model_and_before_any_byte_is_read():
    async def scenario():
        registry = CollectorRegistry()
        ps = make_ps(registry)
        other = ps.join(1, "").member_id
        huge = Layout([TensorSpec("kernel", np.dtype("<f4"), (1 << 15, 1 << 15))])  # claims 4 GiB
        with pytest.raises(refusals.NotChief, match="Only the chief"):
            await ps.receive(other, UpdateHeader(UpdateKind.INITIAL, 0, huge), never_read())
        return ps, registry

    ps, registry = asyncio.run(scenario())
    assert ps.model is None
    assert registry.get_sample_value("comind_update_bytes_total", {"direction": "received"}) == 0


def test_an_initial_model_that_stalls_is_dropped_with_its_buffer_and_frees_its_slot(monkeypatch):
    # A stream must keep 1 MB/s after its grace: here, a grace of 0.2 s.
    monkeypatch.setattr(ps_module, "transfer_seconds", lambda nbytes: 0.2 + nbytes / 1e6)

    async def scenario():
        ps = ParameterServer(RoundPolicy(num_workers=1, total_rounds=5), PsMetrics(CollectorRegistry()),
                             max_concurrent_updates=1)
        chief = ps.join(0, "").member_id
        header = UpdateHeader(UpdateKind.INITIAL, 0, LAYOUT)

        async def stalls() -> AsyncIterator[bytes]:
            yield LAYOUT.pack(INITIAL).tobytes()[:8]
            await asyncio.sleep(3600)
            yield b""

        started = time.monotonic()
        with pytest.raises(refusals.TooSlow, match=r"fell behind: 8 of 68"):
            await ps.receive(chief, header, stalls())
        dropped_after = time.monotonic() - started
        # The slot is free again: the whole model goes in at once.
        assert await ps.receive(chief, header, data(INITIAL)) is UpdateResult.ACCEPTED
        return dropped_after

    assert 0.2 <= asyncio.run(scenario()) < 1

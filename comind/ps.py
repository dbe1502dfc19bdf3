"""The parameter server: the global model, its rounds, and the rules for changing them.

One asyncio event loop owns all state, so there are no data races; only the
heavy NumPy work (folding a large update into the sum, writing a checkpoint)
is handed to a thread, under ``_lock``. The gRPC layer (``service.py``)
turns requests into calls here and :class:`Refusal` into statuses.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time

import grpc
import numpy as np

from comind.aggregation import WEIGHTINGS
from comind.checkpoint import CheckpointStore
from comind.metrics import PsMetrics
from comind.proto import comind_pb2 as pb
from comind.robust import AggregationPolicy, RoundAggregate, clip_update
from comind.rounds import RoundPolicy, Rounds, Verdict
from comind.tensors import Layout, LayoutError

log = logging.getLogger(__name__)

#: Models above this size are averaged and saved in a thread, so the event
#: loop keeps answering heartbeats meanwhile; below it the hop costs more.
OFFLOAD_BYTES = 4 << 20

#: Longest worker description kept (host or pod names).
MAX_DESCRIPTION_CHARS = 200


class Refusal(Exception):
    """A request the ps will not carry out; the state is unchanged."""

    def __init__(self, code: grpc.StatusCode, message: str, result: str = "rejected"):
        super().__init__(message)
        self.code = code
        self.message = message
        self.result = result  # the comind_updates_total label, for updates


@dataclasses.dataclass(frozen=True)
class GlobalModel:
    round: int
    layout: Layout
    packed: np.ndarray
    done: bool


@dataclasses.dataclass(frozen=True)
class UpdateTicket:
    """An update whose header passed every check; its tensors are still to come."""

    member_id: str
    round: int
    layout: Layout
    weight: float
    num_examples: int
    loss: float
    accuracy: float


_VERDICT_REFUSALS = {
    Verdict.UNKNOWN_WORKER: (grpc.StatusCode.NOT_FOUND, "rejected",
                             "Unknown worker id {member}: its lease ended or the ps restarted. Register again."),
    Verdict.NO_MODEL: (grpc.StatusCode.FAILED_PRECONDITION, "rejected",
                       "The ps holds no model yet: the chief (task 0) must initialize it first."),
    Verdict.STALE: (grpc.StatusCode.ABORTED, "stale",
                    "Stale update for round {round}: the ps has moved on to round {open}. Pull the "
                    "current model and continue from it."),
    Verdict.EARLY: (grpc.StatusCode.FAILED_PRECONDITION, "rejected",
                    "Update for round {round}, but the open round is {open}: push only updates trained "
                    "from the last global model."),
}


class ParameterServer:
    def __init__(self, policy: RoundPolicy, metrics: PsMetrics, *, weighting: str = "examples",
                 aggregation: AggregationPolicy = AggregationPolicy(), store: CheckpointStore | None = None,
                 max_model_bytes: int = 4 << 30):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}. Received: weighting={weighting!r}")
        self.metrics = metrics
        self.weighting = weighting
        self.aggregation = aggregation
        self.store = store
        self.max_model_bytes = max_model_bytes
        self.model: GlobalModel | None = None
        checkpoint = store.latest() if store else None
        self.rounds = Rounds(policy, round=checkpoint.round if checkpoint else -1)
        if checkpoint:
            self._set_model(checkpoint.round, checkpoint.layout, checkpoint.packed)
            log.info("Resumed from %s at round %d.", store.path(checkpoint.round), checkpoint.round)
        self._sum: RoundAggregate | None = None
        self._stats = np.zeros(3)  # examples, examples * loss, examples * accuracy
        self._round_opened = time.monotonic()
        self._lock = asyncio.Lock()
        self._published = asyncio.Event()  # replaced at each publish; waiters hold the old one
        self._poke = asyncio.Event()        # wakes the timer when leases or deadlines change
        self.training_done = asyncio.Event()
        self.failed = asyncio.Event()       # a checkpoint could not be written: the ps must stop
        self.failure = ""
        self.finished = asyncio.Event()     # training is done and every worker has left

    # Membership -------------------------------------------------------------

    def register(self, task_index: int, description: str, peer: bytes | None = None) -> pb.RegisterReply:
        # Free text from the wire, kept for a lease and logged: a few lines at most.
        member_id = self.rounds.register(task_index, description[:MAX_DESCRIPTION_CHARS], peer)
        log.info("Worker %d joined (%s); %d live.", task_index, description or "no description",
                 len(self.rounds.members))
        self._membership_changed()
        return pb.RegisterReply(member_id=member_id, lease_seconds=self.rounds.policy.lease_seconds,
                                round=self.rounds.round, total_rounds=self.rounds.policy.total_rounds,
                                done=self.rounds.done,
                                replicas_to_aggregate=self.rounds.policy.replicas_to_aggregate or 0)

    def heartbeat(self, member_id: str, peer: bytes | None = None) -> pb.HeartbeatReply:
        self._known(member_id, peer)
        return pb.HeartbeatReply(round=self.rounds.round, done=self.rounds.done)

    def leave(self, member_id: str, peer: bytes | None = None) -> None:
        self._claim(member_id, peer)
        member = self.rounds.leave(member_id)
        if member:
            log.info("Worker %d left; %d live.", member.task_index, len(self.rounds.members))
            self._membership_changed()

    def _claim(self, member_id: str, peer: bytes | None) -> None:
        """Refuses a member id used over another client certificate than the one that registered it.

        Member ids are secrets, but one may leak (a log, a core dump); under
        mutual TLS, a worker's certificate keeps it from being used by another.
        """
        member = self.rounds.members.get(member_id)
        if member is not None and member.peer != peer:
            self.metrics.auth_failures.inc()
            log.warning("Refused a call with worker %d's member id from another client certificate.",
                        member.task_index)
            raise Refusal(grpc.StatusCode.PERMISSION_DENIED,
                          "This member id belongs to a worker with another client certificate; register with "
                          "your own.")

    def _known(self, member_id: str, peer: bytes | None = None) -> None:
        self._claim(member_id, peer)
        if not self.rounds.renew(member_id):
            raise Refusal(*_refusal(Verdict.UNKNOWN_WORKER, member_id, 0, self.rounds.open_round))

    def _membership_changed(self) -> None:
        self.metrics.workers.set(len(self.rounds.members))
        if self.rounds.done and not self.rounds.members:
            self.finished.set()
        self._poke.set()
        asyncio.ensure_future(self.maybe_close())

    # The first model ----------------------------------------------------------

    def check_initialize(self, member_id: str, layout: Layout, peer: bytes | None = None) -> bool:
        """Whether an initial model of this layout should be streamed in."""
        self._known(member_id, peer)
        if self.model is None:
            return True
        self._check_layout(layout)
        return False

    async def initialize(self, layout: Layout, packed: np.ndarray) -> pb.InitializeReply:
        async with self._lock:
            if self.model is not None:  # another worker won the race
                self._check_layout(layout)
                return pb.InitializeReply(accepted=False, round=self.rounds.round)
            if not await self._publish(0, layout, packed):
                raise Refusal(grpc.StatusCode.UNAVAILABLE, self.failure)
        log.info("Initialized the global model: %d tensors, %d bytes.", len(layout), layout.nbytes)
        return pb.InitializeReply(accepted=True, round=0)

    # Updates ------------------------------------------------------------------

    def open_update(self, header: pb.UpdateHeader, peer: bytes | None = None) -> UpdateTicket | None:
        """Checks an update's header; None means a duplicate (nothing to do)."""
        self._known(header.member_id, peer)
        verdict = self.rounds.check(header.member_id, header.round)
        if verdict is Verdict.DUPLICATE:
            return None
        if verdict is not Verdict.ACCEPT:
            raise Refusal(*_refusal(verdict, header.member_id, header.round, self.rounds.open_round))
        layout = self.layout_of(header.tensors)
        self._check_layout(layout)
        if header.num_examples < 1:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                          f"An update must count at least one example. Received: num_examples={header.num_examples}")
        if not (math.isfinite(header.loss) and math.isfinite(header.accuracy)):
            raise Refusal(grpc.StatusCode.OUT_OF_RANGE,
                          f"Loss and accuracy must be finite numbers. Received: loss={header.loss}, "
                          f"accuracy={header.accuracy}")
        weight = float(header.num_examples) if self.weighting == "examples" else 1.0
        return UpdateTicket(header.member_id, header.round, layout, weight, header.num_examples,
                            header.loss, header.accuracy)

    async def commit_update(self, ticket: UpdateTicket, packed: np.ndarray) -> pb.PushReply:
        """Folds a fully received, checked update into the round's sum."""
        async with self._lock:
            # The round may have closed while the tensors streamed in.
            verdict = self.rounds.check(ticket.member_id, ticket.round)
            if verdict is Verdict.DUPLICATE:
                return pb.PushReply(round=ticket.round, duplicate=True)
            if verdict is not Verdict.ACCEPT:
                raise Refusal(*_refusal(verdict, ticket.member_id, ticket.round, self.rounds.open_round))
            if self._sum is None:
                self._sum = self.aggregation.start(self.model.layout)
            tensors = ticket.layout.views(packed)
            bound = self.aggregation.max_update_norm
            if bound is not None:
                task = self.rounds.members[ticket.member_id].task_index  # its lease may end during the await
                norm = await self._offload(packed.nbytes, clip_update, tensors,
                                           self.model.layout.views(self.model.packed), bound)
                if norm > bound:
                    self.metrics.updates_clipped.inc()
                    log.info("Clipped worker %d's update for round %d: its change had norm %.4g, over the bound "
                             "of %g.", task, ticket.round, norm, bound)
                else:  # what honest updates look like, for choosing the bound
                    log.debug("Worker %d's update for round %d changed the model by norm %.4g.", task, ticket.round,
                              norm)
            await self._offload(packed.nbytes, self._sum.add, tensors, ticket.weight)
            self.rounds.record(ticket.member_id)
            self._stats += (ticket.num_examples, ticket.num_examples * ticket.loss,
                            ticket.num_examples * ticket.accuracy)
        return pb.PushReply(round=ticket.round)

    def layout_of(self, specs) -> Layout:
        try:
            return Layout.from_proto(specs, self.max_model_bytes)
        except LayoutError as error:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if "larger" in str(error) else grpc.StatusCode.INVALID_ARGUMENT
            raise Refusal(code, str(error)) from None

    def _check_layout(self, layout: Layout) -> None:
        problem = self.model.layout.mismatch(layout)
        if problem:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                          f"The model does not match the ps's global model: {problem}. Every worker must "
                          f"train the same architecture (check COMIND_MODEL and the checkpoint directory).")

    # Rounds -------------------------------------------------------------------

    async def maybe_close(self) -> None:
        async with self._lock:
            if not self.rounds.ready_to_close():
                return
            self.rounds.begin_close()
            round, count = self.rounds.open_round, self._sum.count
            packed = await self._offload(self.model.layout.nbytes, self._sum.result)
            self._sum = None
            # Finite updates can still average to Inf: float32 sums overflow when values near
            # the top of the range meet large weights. Such a model would stall every worker.
            if not await self._offload(packed.nbytes, self.model.layout.finite, packed):
                log.error("Round %d's average is not finite: updates near the float range's limit overflowed "
                          "it, so the previous global model stands for the round. --max-update-norm or "
                          "--aggregation median keeps such updates out.", round)
                packed = self.model.packed
            examples, loss, accuracy = self._stats
            self._stats = np.zeros(3)
            if not await self._publish(round, self.model.layout, packed):
                return
        self.metrics.train_loss.set(loss / examples)
        self.metrics.train_accuracy.set(accuracy / examples)
        log.info("Round %d/%d: %d updates, %d examples, loss %.4f, accuracy %.4f.", round,
                 self.rounds.policy.total_rounds, count, examples, loss / examples, accuracy / examples)
        if self.rounds.done:
            log.info("Training is done after round %d; waiting for the workers to leave.", round)

    async def _publish(self, round: int, layout: Layout, packed: np.ndarray) -> bool:
        """Makes a new global model durable, then visible; False if it could not be saved. Holds ``_lock``."""
        if self.store:
            started = time.perf_counter()
            try:
                await self._offload(layout.nbytes, self.store.save, round, layout, packed)
            except OSError as error:
                # Fail-stop: publishing a round that a restart would forget
                # breaks the promise that rounds never go backwards.
                self.failure = (f"Cannot write the checkpoint of round {round} ({error}). Stopping, so that no "
                                f"worker holds a round the ps could not resume from; fix COMIND_CHECKPOINT_DIR "
                                f"(space, permissions) and restart: the ps resumes from round {self.rounds.round}.")
                log.critical(self.failure)
                self.failed.set()
                return False
            self.metrics.checkpoint_seconds.observe(time.perf_counter() - started)
        self._set_model(round, layout, packed)
        self.rounds.complete(round)
        now = time.monotonic()
        if round > 0:
            self.metrics.rounds_completed.inc()
            self.metrics.round_duration.observe(now - self._round_opened)
        self._round_opened = now
        waiters, self._published = self._published, asyncio.Event()
        waiters.set()
        self._poke.set()
        if self.rounds.done:
            self.training_done.set()
            self._membership_changed()
        return True

    def _set_model(self, round: int, layout: Layout, packed: np.ndarray) -> None:
        self.model = GlobalModel(round, layout, packed, done=round >= self.rounds.policy.total_rounds)
        self.metrics.round.set(round)
        self.metrics.model_bytes.set(layout.nbytes)

    async def next_model(self, after_round: int, timeout: float) -> GlobalModel | None:
        """The first global model newer than ``after_round`` (or the final one), waiting
        at most ``timeout`` seconds for it; None if it did not come in time."""
        deadline = time.monotonic() + timeout
        while True:
            model = self.model
            if model is not None and (model.round > after_round or model.done):
                return model
            try:
                await asyncio.wait_for(self._published.wait(), deadline - time.monotonic())
            except TimeoutError:
                return None

    def report_eval(self, member_id: str, round: int, loss: float, accuracy: float,
                    peer: bytes | None = None) -> None:
        self._known(member_id, peer)
        if not (math.isfinite(loss) and math.isfinite(accuracy)):
            raise Refusal(grpc.StatusCode.OUT_OF_RANGE,
                          f"Eval loss and accuracy must be finite. Received: loss={loss}, accuracy={accuracy}")
        self.metrics.eval_loss.set(loss)
        self.metrics.eval_accuracy.set(accuracy)
        log.info("Round %d evaluation: loss %.4f, accuracy %.4f.", round, loss, accuracy)

    async def run_timers(self) -> None:
        """Ends leases and round deadlines on time: sleeps until the next one or a change."""
        while True:
            self._poke.clear()
            wait = self.rounds.next_event() - time.monotonic()
            if wait > 0:
                try:
                    await asyncio.wait_for(self._poke.wait(), None if math.isinf(wait) else wait)
                except TimeoutError:
                    pass
            for member in self.rounds.expire():
                log.warning("Worker %d's lease ended (%s); %d live.", member.task_index,
                            member.description or "no description", len(self.rounds.members))
                self._membership_changed()
            if self.rounds.overdue():
                log.warning("Round %d passed its deadline with %d of the %d updates it needs (%d workers live); "
                            "waiting another %.0f s.", self.rounds.open_round, len(self.rounds.contributors),
                            self.rounds.policy.min_updates, len(self.rounds.members),
                            self.rounds.policy.round_timeout)
                self.rounds.extend_deadline()
            await self.maybe_close()

    async def drain(self) -> None:
        """Waits for a close or checkpoint in progress, so that it lands on disk."""
        async with self._lock:
            pass

    @staticmethod
    async def _offload(nbytes: int, function, *args):
        if nbytes > OFFLOAD_BYTES:
            return await asyncio.to_thread(function, *args)
        return function(*args)


def _refusal(verdict: Verdict, member: str, round: int, open_round: int) -> tuple[grpc.StatusCode, str, str]:
    code, result, template = _VERDICT_REFUSALS[verdict]
    # Ids are 32 characters; a longer one is someone else's text, not to be echoed whole.
    return code, template.format(member=member[:40], round=round, open=open_round), result

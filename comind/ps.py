"""The parameter server: the global model, its rounds, and the rules for changing them.

One asyncio event loop owns all state, so there are no data races; only the
heavy NumPy work (folding a large update into the round, writing a
checkpoint) is handed to a thread, under ``_lock``. This module speaks
domain types and raises :class:`comind.refusals.Refusal`; ``service.py``
turns gRPC messages into calls here and refusals into statuses.

What happens to an update between its bytes and the next global model is
the round pipeline (``pipeline.py``); this module orchestrates it: validate,
transform and aggregate, step the server optimizer, check the result is
finite, persist, publish. With asynchronous rounds (``async_rounds.py``) a
round is a model version: updates trained from older versions join its
buffer with their staleness weight, and each worker gets the newest model
back at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from comind import async_rounds, encodings, federated_eval, refusals, tensors
from comind.admission import Summary, TokenBucket
from comind.checkpoint import CheckpointStore
from comind.metrics import JOIN_REFUSALS, PsMetrics
from comind.pipeline import RoundInProgress, ServerPipeline
from comind.protocol import MIN_BYTES_PER_SECOND, MIN_TRANSFER_SECONDS, transfer_seconds
from comind.rounds import RoundPolicy, Rounds, Verdict
from comind.sampling import Selection
from comind.secagg.config import SecAggSettings
from comind.tensors import Assembler, Layout
from comind.transfers import BufferPool, Slots

if TYPE_CHECKING:
    from comind.secure_rounds import SecureRounds

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Models above this size are aggregated and saved in a thread, so the event
#: loop keeps answering meanwhile; below it the hop costs more.
OFFLOAD_BYTES = 4 << 20

#: Longest worker description kept (host or pod names).
MAX_DESCRIPTION_CHARS = 200

#: How long the timer task pauses after an unexpected error before it goes on.
TIMER_RETRY_SECONDS = 1.0

#: Refused registrations are logged at most this often, each line with their count since the last.
JOIN_REFUSAL_LOG_SECONDS = 60.0


class UpdateKind(enum.Enum):
    DELTA = "delta"      # a change trained from the global model of round - 1
    INITIAL = "initial"  # the chief's initial model, for a ps that holds none


class UpdateResult(enum.Enum):
    """What became of an update; the values are the ``comind_updates_total`` labels."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    STALE = "stale"
    EARLY = "early"            # for a round past the open one: the ps resumed from an older checkpoint
    NOT_NEEDED = "not_needed"  # an initial model, but the ps holds one
    NOT_SELECTED = "not_selected"  # client sampling did not select the worker for the round


#: What becomes of an update that a round's verdict says not to read (None: read it).
_UNREAD = {Verdict.ACCEPT: None, Verdict.DUPLICATE: UpdateResult.DUPLICATE, Verdict.STALE: UpdateResult.STALE,
           Verdict.EARLY: UpdateResult.EARLY, Verdict.NOT_SELECTED: UpdateResult.NOT_SELECTED}


@dataclasses.dataclass(frozen=True)
class UpdateHeader:
    kind: UpdateKind
    round: int
    layout: Layout
    num_examples: int = 0
    loss: float = 0.0
    accuracy: float = 0.0
    #: How its bytes encode ``layout`` (:mod:`comind.encodings`); an initial model is always ``float32``.
    encoding: str = encodings.FLOAT32
    #: Names the update among its worker's (:mod:`comind.async_rounds`); empty: not given.
    update_id: bytes = b""
    #: The worker's test of the model it trained from, when the ps asked for one (:mod:`comind.federated_eval`).
    federated_eval: federated_eval.Report | None = None


@dataclasses.dataclass(frozen=True)
class JoinInfo:
    member_id: str
    lease_seconds: float
    round: int
    total_rounds: int
    done: bool
    replicas_to_aggregate: int | None
    mode: str
    update_encoding: str = encodings.FLOAT32
    rounds_mode: str = async_rounds.SYNC
    federated_eval_every: int = 0
    #: Secure aggregation's settings; None when it is off.
    secure_aggregation: SecAggSettings | None = None


@dataclasses.dataclass(frozen=True)
class GlobalModel:
    round: int
    total_rounds: int
    layout: Layout
    packed: np.ndarray
    done: bool
    #: The example-weighted training loss and accuracy of the updates that made it, as the round's log line says;
    #: NaN for a model no round of this process made (the initial one, or one resumed from a checkpoint).
    train_loss: float = math.nan
    train_accuracy: float = math.nan
    #: Worker-level DP's epsilon at its delta after this model's round (the ledger's); NaN without DP.
    epsilon: float = math.nan
    #: The server optimizer's learning rate in this model's round.
    server_learning_rate: float = math.nan
    #: The federated evaluation this model's round brought in (of the previous round's model), if one did.
    federated_eval: federated_eval.Evaluation | None = None


@dataclasses.dataclass(frozen=True)
class RoundClosed:
    """What a round that closed was made of: its line in the log, its metrics, and what a privacy accountant
    needs of it (``sampling_rate``)."""

    round: int
    updates: int      # aggregated
    examples: int
    loss: float
    accuracy: float
    #: Workers selected to train in the round (under client sampling, over-selection included; without it,
    #: every live worker) and the live workers they were drawn from.
    sampled: int
    population: int
    #: q of a Poisson draw (worker-level DP with client sampling): each live worker's probability of being
    #: selected, fixed for the run; None for a draw of fixed size, or none.
    poisson_rate: float | None = None
    #: Asynchronous rounds: the mean staleness (tau) of the version's updates; NaN for a synchronous round.
    staleness: float = math.nan
    #: Asynchronous rounds with client sampling, where ``sampled`` is the workers training when the version
    #: closed: the turns that ended during it without an update (the worker left, its lease ended, or it was
    #: silent past the round timeout). None otherwise.
    abandoned: int | None = None

    @property
    def sampling_rate(self) -> float:
        """q: each live worker's chance of being selected in the round: a Poisson draw's q (not the fraction it
        happened to select), else ``sampled / population`` (1 without client sampling)."""
        if self.poisson_rate is not None:
            return self.poisson_rate
        return self.sampled / self.population if self.population else 1.0

    @property
    def dropped(self) -> int:
        """Selected workers whose update the round closed without: gone, slow, or beyond its quorum; with
        asynchronous rounds and client sampling, the turns it saw end without an update."""
        return self.abandoned if self.abandoned is not None else max(0, self.sampled - self.updates)


class ParameterServer:
    """The global model and its rounds.

    Args:
        policy: membership, quorum and deadline rules.
        metrics: where to count.
        pipeline: the round's stages (weighting, transforms, aggregator, server optimizer).
        store: durable checkpoints, or None to keep the model in memory only.
        max_model_bytes: the largest model accepted.
        max_concurrent_updates: updates received at once (each holds a model-sized buffer).
        max_examples_per_update: the most training examples an update may claim (its weight in the mean).
        federated_eval_every: every this many rounds, each worker tests the global model on its held-out
            examples and reports with its next update (:mod:`comind.federated_eval`); 0: never.
    """

    def __init__(self, policy: RoundPolicy, metrics: PsMetrics, *, pipeline: ServerPipeline | None = None,
                 store: CheckpointStore | None = None, max_model_bytes: int = 4 << 30,
                 max_concurrent_updates: int = 2, max_examples_per_update: int = 10**7,
                 federated_eval_every: int = 0):
        self.metrics = metrics
        self.pipeline = pipeline or ServerPipeline()
        self.pipeline.check_quorum(policy.expected_updates)
        # Asynchronous rounds need one live worker, whose updates alone fill any buffer: an alert on fewer live
        # workers than the quorum must not fire because K is above them.
        metrics.quorum.set(1 if policy.asynchronous else policy.expected_updates)
        metrics.last_round_time.set_to_current_time()  # a stall is counted from here until a model exists
        metrics.server_optimizer.info({"name": self.pipeline.settings.server_optimizer})
        metrics.server_learning_rate.set(self.pipeline.optimizer.learning_rate)
        self.store = store
        self.max_model_bytes = max_model_bytes
        self.max_examples_per_update = max_examples_per_update
        self.evaluations = federated_eval.Collector(federated_eval_every, max_examples_per_update)
        self.model: GlobalModel | None = None
        checkpoint = store.latest() if store else None
        self.rounds = Rounds(policy, round=checkpoint.round if checkpoint else -1)
        if checkpoint and store:
            self.pipeline.restore(checkpoint.state)
            self._start_privacy(checkpoint.round)
            self._set_model(checkpoint.round, checkpoint.layout, checkpoint.packed)
            log.info("Resumed from %s at round %d.", store.path(checkpoint.round), checkpoint.round)
        else:
            self._start_privacy(-1)
        self._round: RoundInProgress | None = None
        #: Secure aggregation's attempts at rounds (``secure_rounds.py``); None when it is off.
        self.secure: SecureRounds | None = None
        if self.pipeline.settings.secure_aggregation is not None:
            from comind.secure_rounds import SecureRounds  # with the secagg extra only

            self.secure = SecureRounds(self.pipeline.settings.secure_aggregation, metrics, self.rounds)
        self._stats = np.zeros(4)  # examples, examples * loss, examples * accuracy, staleness (async rounds)
        self._round_opened = time.monotonic()
        self._receiving = Slots(max_concurrent_updates, "receiving")
        self._buffers = BufferPool(max_concurrent_updates)
        # A whole cluster may register at once, and again each lease (after a partition); a loop may not.
        self._joins = TokenBucket(policy.member_limit / policy.lease_seconds, policy.member_limit)
        self._join_refusals = {reason: Summary(JOIN_REFUSAL_LOG_SECONDS) for reason in JOIN_REFUSALS}
        self._lock = asyncio.Lock()
        self._published = asyncio.Event()  # replaced at each publish; waiters hold the old one
        # Under client sampling, the calls of workers not selected wait here, by task index, until a draw
        # selects them or training ends: a publish wakes only those it concerns.
        self._held: dict[int, asyncio.Event] = {}
        #: The last round that closed, once one has.
        self.last_closed: RoundClosed | None = None
        self._poke = asyncio.Event()        # wakes the timer when leases or deadlines change
        self.failed = asyncio.Event()       # a checkpoint could not be written: the ps must stop
        self.failure = ""
        self.finished = asyncio.Event()     # training is done and every worker has left
        self.training_done = asyncio.Event()
        if self.rounds.done:
            # A ps that stopped after its last checkpoint (a crash, a rescheduled pod): the workers it had may
            # still come for the final model. Say why it does not train.
            self.training_done.set()
            log.warning("The checkpoint is at round %d, and training is %d rounds: training is already done. Serving "
                        "the final model to workers that come for it; raise COMIND_ROUNDS to train on.",
                        self.rounds.round, policy.total_rounds)

    @property
    def round(self) -> int:
        """The last completed round; -1 while there is no model."""
        return self.rounds.round

    @property
    def done(self) -> bool:
        return self.rounds.done

    # Privacy ------------------------------------------------------------------

    def sampled_fraction(self) -> float:
        """The q of every round, for planning the privacy budget: with worker-level DP, client sampling is
        Poisson with a q fixed for the run (which the ledger records, :attr:`RoundClosed.sampling_rate`); 1
        without client sampling.
        """
        rate = self.rounds.policy.sampling.poisson_rate
        return 1.0 if rate is None else rate

    def _start_privacy(self, round: int) -> None:
        """Says what worker-level DP's ledger holds at start, and ends training if its budget is spent."""
        privacy = self.pipeline.privacy
        if privacy is None:
            return
        self.metrics.dp_noise_multiplier.set(privacy.settings.noise_multiplier)
        ledger = privacy.ledger
        if round > 0 and not ledger.rounds:
            log.warning("The checkpoint of round %d holds no privacy ledger: its %d rounds had no differential "
                        "privacy, and the model reveals what they did. Epsilon counts the rounds from here only.",
                        round, round)
        elif ledger.rounds:
            log.info("The privacy ledger holds %d rounds: epsilon %.4g at delta %g.", ledger.rounds, ledger.epsilon,
                     ledger.delta)
        target = privacy.settings.target_epsilon
        if target is not None:
            self.metrics.dp_target_epsilon.set(target)
        if round < 1 and target is not None and not privacy.affordable(self.sampled_fraction()):
            raise ValueError(f"One round already spends more than COMIND_DP_TARGET_EPSILON={target:g} (epsilon "
                             f"{privacy.ledger.epsilon_after(self.sampled_fraction()):.4g} at delta {ledger.delta:g}): "
                             f"raise the noise multiplier or the target. Received: target_epsilon={target!r}")
        if round >= 0:
            self._end_within_budget(round)

    def _end_within_budget(self, round: int) -> None:
        """Makes ``round`` the last if one more would spend more than the target epsilon."""
        privacy = self.pipeline.privacy
        target = privacy.settings.target_epsilon if privacy else None
        if privacy is None or target is None or round >= self.rounds.policy.total_rounds:
            return
        if privacy.affordable(self.sampled_fraction()):
            return
        log.warning("The privacy budget is spent: round %d would take epsilon to %.4g, past COMIND_DP_TARGET_EPSILON"
                    "=%g, so training ends at round %d, with epsilon %.4g at delta %g.", round + 1,
                    privacy.ledger.epsilon_after(self.sampled_fraction()), target, round, privacy.ledger.epsilon,
                    privacy.ledger.delta)
        self.rounds.policy = dataclasses.replace(self.rounds.policy, total_rounds=max(round, 1))

    # Membership -------------------------------------------------------------

    def join(self, task_index: int, description: str, peer: bytes | None = None, instance: str = "") -> JoinInfo:
        """Registers a worker, or gives the same worker process (``instance``) its membership again.

        Raises:
            TooManyJoins: registrations came faster than the ps takes them.
            TaskTaken: a live member of another process holds ``task_index``.
            TooManyMembers: the ps has as many members as it allows.
        """
        try:
            member_id = self._admit(task_index, peer, instance)
        except (refusals.TooManyJoins, refusals.TaskTaken, refusals.TooManyMembers) as refusal:
            reason = {refusals.TooManyJoins: "rate", refusals.TaskTaken: "taken",
                      refusals.TooManyMembers: "full"}[type(refusal)]
            self.metrics.joins_refused.labels(reason).inc()
            count = self._join_refusals[reason].due()
            if count:
                log.warning("Refused %d registration%s like this since the last such line (all are counted in "
                            "comind_joins_refused_total{reason=\"%s\"}): %s", count, "" if count == 1 else "s",
                            reason, refusal.message)
            raise
        if member_id is None:
            # Free text from the wire, kept for a lease and logged: a few lines at most.
            member_id = self.rounds.register(task_index, description[:MAX_DESCRIPTION_CHARS], peer, instance)
            log.info("Worker %d joined (%s); %d live.", task_index, description[:MAX_DESCRIPTION_CHARS] or
                     "no description", len(self.rounds.members))
            self._membership_changed()
        policy = self.rounds.policy
        return JoinInfo(member_id, policy.lease_seconds, self.rounds.round, policy.total_rounds, self.rounds.done,
                        policy.replicas_to_aggregate, self.pipeline.settings.mode, self.pipeline.update_encoding.name,
                        self.pipeline.settings.rounds_mode, self.evaluations.every,
                        self.pipeline.settings.secure_aggregation)

    def _admit(self, task_index: int, peer: bytes | None, instance: str) -> str | None:
        """Whether a registration may go ahead: None if so, the member id to give back if the same worker
        process already holds ``task_index`` (its last reply was lost); otherwise raises why not."""
        self._end_leases()  # a lease that just ended frees its task index and its place now, not at the next timer
        holder = self.rounds.holder(task_index)
        if holder is not None:
            member = self.rounds.members[holder]
            if instance and member.instance == instance and member.peer == peer:
                self.rounds.renew(holder)
                return holder
            # Two workers of one index would train the same shard twice, and two chiefs would both evaluate.
            left = self.rounds.seconds_left(holder)
            raise refusals.TaskTaken(
                f"Task index {task_index} is held by a live worker ({member.description or 'no description'}), "
                f"whose lease ends in {left:.1f} s unless it renews it. Give each worker its own COMIND_TASK_INDEX "
                f"(0 to COMIND_NUM_WORKERS - 1); a worker restarted in place may join again once that lease "
                f"has ended.", retry_after=left)
        limit = self.rounds.policy.member_limit
        if len(self.rounds.members) >= limit:
            soonest = min(self.rounds.seconds_left(m) for m in self.rounds.members)
            raise refusals.TooManyMembers(
                f"The ps has its most members, {limit} (COMIND_MAX_MEMBERS; unset, from COMIND_NUM_WORKERS); "
                f"retry in {soonest:.1f} s, when a lease may end, or raise COMIND_MAX_MEMBERS.", retry_after=soonest)
        # Last, so that only registrations that would go ahead spend the bucket: refusals cost next to nothing.
        wait = self._joins.take()
        if wait:
            raise refusals.TooManyJoins(
                f"The ps takes at most {self._joins.rate:.3g} registrations a second (COMIND_MAX_MEMBERS per "
                f"lease), and more came; retry in {wait:.1f} s.", retry_after=wait)
        return None

    def renew(self, member_id: str, peer: bytes | None = None) -> None:
        """Renews a member's lease.

        Raises:
            UnknownMember: its lease ended, or the ps restarted.
            ForeignCertificate: the id belongs to another client certificate.
        """
        self._claim(member_id, peer)
        if not self.rounds.renew(member_id):
            # Ids are 32 characters; a longer one is someone else's text, not to be echoed whole.
            raise refusals.UnknownMember(f"Unknown worker id {member_id[:40]}: its lease ended or the ps "
                                         f"restarted. Join again.")

    def leave(self, member_id: str, peer: bytes | None = None) -> None:
        self._claim(member_id, peer)
        member = self.rounds.leave(member_id)
        if member:
            log.info("Worker %d left; %d live.", member.task_index, len(self.rounds.members))
            self._wake((member.task_index,))
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
            raise refusals.ForeignCertificate("This member id belongs to a worker with another client "
                                              "certificate; join with your own.")

    def _membership_changed(self) -> None:
        self.metrics.workers.set(len(self.rounds.members))
        if self.rounds.asynchronous is not None:
            self.metrics.buffer_size.set(self.rounds.buffer_size())
        if self.rounds.done and not self.rounds.members:
            self.finished.set()
        self._draw()  # the first round's workers may all be in now
        self._poke.set()  # the timers close a round that now has every live worker's update

    # Client sampling ----------------------------------------------------------

    def _draw(self) -> None:
        """Selects the open round's workers, if it may now (:meth:`Rounds.draw`), and wakes them."""
        self._drawn(self.rounds.draw())

    def _drawn(self, selection: Selection | None) -> None:
        if selection is None:
            return
        turns = "" if self.rounds.asynchronous is None else (
            f" (of those not training), {len(self.rounds.selected)} training at once")
        log.info("Round %d selects %s%s.", selection.round, selection.describe(), turns)
        self._wake(selection.selected)

    def _wake(self, tasks: Iterable[int]) -> None:
        """Wakes the calls of these workers that wait for their turn."""
        for task in tasks:
            event = self._held.pop(task, None)
            if event is not None:
                event.set()

    def _turn(self, member_id: str) -> asyncio.Event:
        """What a call waits on for its worker's next model: the next publish, or under client sampling, the
        draw that selects its worker."""
        member = self.rounds.members.get(member_id)
        if not self.rounds.sampling or member is None:
            return self._published
        return self._held.setdefault(member.task_index, asyncio.Event())

    # Updates ------------------------------------------------------------------

    async def receive(self, member_id: str, header: UpdateHeader, data: AsyncIterator[bytes],
                      peer: bytes | None = None) -> UpdateResult:
        """Takes an update: checks its header, reads its bytes from ``data`` (unless it is not needed) and
        folds it into the round, or makes it the initial model.

        Returns:
            What became of it; when not ACCEPTED, ``data`` was not read.

        Raises:
            Refusal: bad input; nothing changed.
        """
        try:
            self.renew(member_id, peer)
            if header.kind is UpdateKind.INITIAL:
                # Before any byte is read: the claim of a model's size is all the ps knows of it yet.
                self._check_chief(member_id, "gives the initial model")
                return await self._initialize(member_id, header, data)
            result = await self._update(member_id, header, data)
        except refusals.Refusal as refusal:
            self.refused_update(refusal, counted=header.kind is UpdateKind.DELTA)  # an initial model is no update
            raise
        self.metrics.updates.labels(result.value).inc()
        if result is UpdateResult.ACCEPTED:
            await self.maybe_close()
        return result

    def refused_update(self, refusal: refusals.Refusal, counted: bool = True) -> None:
        """Logs an update refused (its header unreadable, or by :meth:`receive`), and counts it."""
        if counted:
            self.metrics.updates.labels(refusal.result).inc()
        log.warning("Refused an update: %s", refusal.message)

    async def _initialize(self, member_id: str, header: UpdateHeader, data: AsyncIterator[bytes]) -> UpdateResult:
        if self.model is not None:
            self._check_layout(header.layout)
            return UpdateResult.NOT_NEEDED
        if header.encoding != encodings.FLOAT32:
            raise refusals.InvalidRequest(f"An initial model travels as it is, encoded as {encodings.FLOAT32}. "
                                          f"Received: encoding={header.encoding[:40]!r}")
        nbytes = header.layout.nbytes
        # In a receive slot, as an update: a few at a time, each by its deadline.
        async with self._receiving.hold(nbytes) as deadline:
            async with asyncio.timeout_at(deadline):
                # A buffer of its own: the initial model becomes the global model.
                packed = await self._read(header.layout, data, np.empty(nbytes, np.uint8), member_id)
        async with self._lock:
            if self.model is not None:  # another worker won the race
                self._check_layout(header.layout)
                return UpdateResult.NOT_NEEDED
            if not await self._publish(0, header.layout, packed, self.pipeline.state()):
                raise refusals.NotServing(self.failure)
        log.info("Initialized the global model: %d tensors, %d bytes.", len(header.layout), header.layout.nbytes)
        self._draw()
        await self.maybe_close()  # a Poisson draw may select no one: its round closes at once
        return UpdateResult.ACCEPTED

    def _taken_already(self, member_id: str, header: UpdateHeader) -> bool:
        """Asynchronous rounds: whether this update was taken before (a retry whose receipt was lost).

        Raises:
            InvalidRequest: an update without an id, which a retry could not be told from.
        """
        ids = self.pipeline.update_ids
        if ids is None:
            return False
        if len(header.update_id) != async_rounds.UPDATE_ID_BYTES:
            raise refusals.InvalidRequest(
                f"With asynchronous rounds (COMIND_ROUNDS_MODE=async) every update carries a random id of "
                f"{async_rounds.UPDATE_ID_BYTES} bytes, so that a retry is not applied twice; run the same coMind "
                f"version on the ps and the workers. Received: update_id of {len(header.update_id)} bytes")
        return ids.seen(self.rounds.members[member_id].task_index, header.update_id)

    def _verdict(self, member_id: str, round: int) -> UpdateResult | None:
        """What becomes of an update for ``round`` without reading it; None when it is to be read."""
        verdict = self.rounds.check(member_id, round)
        if verdict is Verdict.UNKNOWN_WORKER:  # its lease ended while its update streamed in
            raise refusals.UnknownMember("This worker's lease ended while its update came in. Join again.")
        if verdict is Verdict.NO_MODEL:
            raise refusals.NoModelYet("The ps holds no model yet: the chief (task 0) must give the initial "
                                      "model first.")
        return _UNREAD[verdict]

    async def _update(self, member_id: str, header: UpdateHeader, data: AsyncIterator[bytes]) -> UpdateResult:
        if self.secure is not None:
            raise refusals.InvalidRequest("This ps aggregates securely: an update goes masked, after the worker's "
                                          "keys (run the same coMind version on the ps and the workers).")
        result = self.check_update(member_id, header)
        if result is not None:
            return result
        encoding = self.pipeline.update_encoding
        if header.encoding != encoding.name:
            raise refusals.InvalidRequest(
                f"This ps takes updates encoded as {encoding.name} (COMIND_UPDATE_ENCODING), as it said when the "
                f"worker joined; run the same coMind version on the ps and the workers. Received: "
                f"encoding={header.encoding[:40]!r}")
        assert self.model is not None  # check_update's layout check needs one
        # From the ps's own layout, which the header's matches: the bytes to read follow from it and the encoding.
        wire = encoding.wire_layout(self.model.layout)
        nbytes = header.layout.nbytes
        async with self._receiving.hold(wire.nbytes) as deadline:
            buffer = self._buffers.take(nbytes)
            try:
                async with asyncio.timeout_at(deadline):
                    if encoding.identity:
                        packed = await self._read(header.layout, data, buffer, member_id)
                    else:
                        encoded = await self._read(wire, data, np.empty(wire.nbytes, np.uint8), member_id)
                        packed = await self._offload(nbytes, self._decode, encoding, encoded, buffer)
                        del encoded
                return await self._commit(member_id, header, packed)
            finally:
                self._buffers.give_back(buffer)

    def receive_slot(self, nbytes: int) -> contextlib.AbstractAsyncContextManager[float]:
        """One of the slots updates are received in (a masked input too: it holds as many bytes); yields the
        receipt's deadline (:class:`comind.transfers.Slots`)."""
        return self._receiving.hold(nbytes)

    def check_update(self, member_id: str, header: UpdateHeader) -> UpdateResult | None:
        """What becomes of an update without reading it (None: read it), once its header is checked.

        Raises:
            Refusal: a header that does not fit the ps's model or claims what it may not.
        """
        result = self._verdict(member_id, header.round)
        if result is UpdateResult.NOT_SELECTED and self._taken_already(member_id, header):
            return UpdateResult.DUPLICATE  # asynchronous rounds: a retry of the update that ended its worker's turn
        if result is not None:
            policy = self.rounds.asynchronous
            if result is UpdateResult.STALE and policy is not None and not self.done:
                log.info("Refused a stale update: trained from version %d, %d versions old, past --max-staleness %d.",
                         header.round - 1, self.rounds.staleness(header.round), policy.max_staleness)
            elif result is UpdateResult.STALE:
                log.info("A stale update for round %d came in after the ps moved on to round %d.", header.round,
                         self.rounds.open_round)
            elif result is UpdateResult.NOT_SELECTED:
                log.info("An update for round %d came from worker %d, which the round did not select.",
                         header.round, self.rounds.members[member_id].task_index)
            return result
        if self._taken_already(member_id, header):
            return UpdateResult.DUPLICATE
        self._check_layout(header.layout)
        if not 1 <= header.num_examples <= self.max_examples_per_update:
            # The count is the worker's own claim, and its weight in the mean: 2**62 would make one update all of it.
            raise refusals.InvalidRequest(
                f"An update must count 1 to {self.max_examples_per_update} examples (COMIND_MAX_EXAMPLES_PER_UPDATE "
                f"on the ps; raise it if a worker's data is that large). Received: "
                f"num_examples={header.num_examples}")
        if not (math.isfinite(header.loss) and math.isfinite(header.accuracy)):
            raise refusals.NotFinite(f"Loss and accuracy must be finite numbers. Received: loss={header.loss}, "
                                     f"accuracy={header.accuracy}")
        try:
            self.evaluations.check(header.federated_eval, header.round)
        except refusals.Refusal:
            self.metrics.federated_eval.reports.labels("rejected").inc()
            raise
        return None

    def _decode(self, encoding: encodings.Encoding, encoded: np.ndarray, out: np.ndarray) -> np.ndarray:
        """An update's encoded bytes decoded into ``out``, and checked as the bytes of one sent as it is are."""
        assert self.model is not None
        layout = self.model.layout
        try:
            encoding.decode(layout, encoded, out)
        except encodings.EncodingError as error:
            raise refusals.InvalidRequest(f"The update does not decode as {encoding.name}: {error}.") from None
        for i, (spec, view) in enumerate(zip(layout.specs, layout.views(out), strict=True)):
            if spec.dtype.kind == "f" and not np.isfinite(view).all():
                raise refusals.NotFinite(f"The model is not finite: tensor {i} ({spec.describe()}) holds NaN or Inf "
                                         f"once decoded from {encoding.name}. Training diverged; lower the learning "
                                         f"rate or clip gradients.")
        return out

    async def _read(self, layout: Layout, data: AsyncIterator[bytes], buffer: np.ndarray,
                    member_id: str) -> np.ndarray:
        """Reads a model's bytes into ``buffer``, as fast as the transfer keeps up with its pace.

        A stream must bring its bytes at :data:`MIN_BYTES_PER_SECOND` on
        average, after :data:`MIN_TRANSFER_SECONDS` of grace, all along, not
        only by the end: one that stalls after a few hundred MB of a claimed
        4 GB is dropped with its buffer within minutes, not the hour its
        claim allows.
        """
        assembler = Assembler(layout, check_finite=True, buffer=buffer)
        loop = asyncio.get_running_loop()
        started = loop.time()
        chunks = aiter(data)
        try:
            # One timer for the whole transfer, moved on as bytes arrive: a timer per chunk cost more than reading
            # a 0.4 MB update (bench/load.py).
            async with asyncio.timeout(None) as behind:
                while True:
                    behind.reschedule(started + transfer_seconds(assembler.received))
                    chunk = await anext(chunks, None)
                    if chunk is None:
                        return assembler.finish()
                    # A large update over a slow link may take longer than a lease: what arrives renews it.
                    self.rounds.renew(member_id)
                    assembler.feed(chunk)
        except TimeoutError:
            raise refusals.TooSlow(
                f"The model's bytes fell behind: {assembler.received} of {layout.nbytes} after "
                f"{loop.time() - started:.0f} s, where the ps expects {MIN_BYTES_PER_SECOND / 1e6:.0f} MB/s "
                f"after {MIN_TRANSFER_SECONDS:.0f} s.") from None
        except tensors.TruncatedStream as error:
            raise refusals.TruncatedStream(f"Truncated model: the {error}.") from None
        except tensors.OversizedStream as error:
            raise refusals.OversizedStream(f"Oversized model: the {error}.") from None
        except tensors.NonFiniteValues as error:
            raise refusals.NotFinite(f"The model is not finite: {error}. Training diverged; lower the learning "
                                     f"rate or clip gradients.") from None
        finally:
            self.metrics.update_bytes.labels("received").inc(assembler.received)
            # A refusal's traceback keeps this frame, and gRPC keeps the refusal a while after the call ends:
            # without this, the buffer of a transfer dropped halfway outlived it (105 MB held for 40 MiB sent).
            del assembler, buffer

    async def _commit(self, member_id: str, header: UpdateHeader, packed: np.ndarray) -> UpdateResult:
        """Folds a fully received, checked update into the round."""
        async with self._lock:
            # The round may have closed while the update streamed in.
            result = self._verdict(member_id, header.round)
            if result is not None:
                return result
            if self._taken_already(member_id, header):  # its twin came in while this one streamed in
                return UpdateResult.DUPLICATE
            assert self.model is not None  # a verdict of ACCEPT needs a model
            if self._round is None:
                self._round = self.pipeline.start_round(self.model.layout, self.model.packed)
            task = self.rounds.members[member_id].task_index  # its lease may end during the await
            weight = self.pipeline.weight(header.num_examples)
            staleness, scale = self._staleness(task, header)
            norm = await self._offload(packed.nbytes, self._round.add, header.layout.views(packed), weight, scale)
            bound = self.pipeline.settings.max_update_norm
            if norm is not None and bound is not None:
                if norm > bound:
                    self.metrics.updates_clipped.inc()
                    log.info("Clipped worker %d's update for round %d: its norm was %.4g, over the bound of %g.",
                             task, header.round, norm, bound)
                else:  # what honest updates look like, for choosing the bound
                    log.debug("Worker %d's update for round %d has norm %.4g.", task, header.round, norm)
            self.rounds.record(member_id)
            self._draw()  # asynchronous rounds with client sampling: the turn that ended passes on
            self._stats += (header.num_examples, header.num_examples * header.loss,
                            header.num_examples * header.accuracy, staleness)
            self.metrics.buffer_updates.set(self.rounds.buffered)
            if header.federated_eval is not None:
                self.evaluations.add(task, header.federated_eval)
                self.metrics.federated_eval.reports.labels("accepted").inc()
        return UpdateResult.ACCEPTED

    def _staleness(self, task: int, header: UpdateHeader) -> tuple[int, float]:
        """Asynchronous rounds: tau and s(tau) of an update about to be taken, whose id is noted; 0 and 1 in
        synchronous ones."""
        policy, ids = self.rounds.asynchronous, self.pipeline.update_ids
        if policy is None or ids is None:
            return 0, 1.0
        staleness = self.rounds.staleness(header.round)
        self.metrics.staleness.observe(staleness)
        ids.take(task, header.update_id)
        return staleness, policy.weight(staleness)

    def _check_layout(self, layout: Layout) -> None:
        assert self.model is not None
        problem = self.model.layout.mismatch(layout)
        if problem:
            raise refusals.InvalidRequest(
                f"The model does not match the ps's global model: {problem}. Every worker must train the same "
                f"architecture (check COMIND_MODEL and the checkpoint directory).")

    # Rounds -------------------------------------------------------------------

    async def maybe_close(self) -> None:
        """Closes the open round if it may close, and the next while it may too: under Poisson sampling a draw
        that selects no one closes its round at once."""
        while await self._close():
            pass

    async def _close(self) -> bool:
        """Closes the open round if it may; whether it did."""
        async with self._lock:
            if self.secure is not None:  # the round closes once its parties' sum is unmasked
                secure_sum = await self.secure.may_close(time.monotonic())
                if secure_sum is None:
                    return False
                self._round = RoundInProgress(secure_sum, None, self.pipeline.privacy)  # privacy: the ledger's
                self._stats = self.secure.survivors_figures()
                for task, report in self.secure.survivors_reports().items():
                    self.evaluations.add(task, report)
                    self.metrics.federated_eval.reports.labels("accepted").inc()
            elif not self.rounds.ready_to_close():
                return False
            assert self.model is not None
            # None for a Poisson round without updates: its release is the noise alone.
            in_progress = self._round or self.pipeline.start_round(self.model.layout, self.model.packed)
            self._name_the_silent()
            self.rounds.begin_close()
            examples, loss, accuracy, staleness = self._stats
            per_example = (loss / examples, accuracy / examples) if examples else (math.nan, math.nan)
            closed = RoundClosed(self.rounds.open_round, in_progress.count, int(examples), *per_example,
                                 *self.rounds.population(), self.rounds.policy.sampling.poisson_rate,
                                 staleness / in_progress.count if self.rounds.asynchronous and in_progress.count
                                 else math.nan, self.rounds.abandoned if self.rounds.asynchronous and
                                 self.rounds.sampling else None)
            model, self._round = self.model, None
            self._stats = np.zeros(4)
            if self.pipeline.update_ids:
                self.pipeline.update_ids.publish()  # saved with the version they make
            evaluation = self.evaluations.close(closed.round)
            packed, state = await self._next_model(closed, in_progress, model)
            if not await self._publish(closed.round, model.layout, packed, state, closed.loss, closed.accuracy,
                                       evaluation):
                return False
            self.last_closed = closed
        self._closed(closed)
        if evaluation is not None:
            self._evaluated(evaluation)
        self._draw()  # the next round's workers, after the line of this one
        return not self.done

    def _closed(self, closed: RoundClosed) -> None:
        """The round's metrics and its line in the log."""
        metrics = self.metrics
        metrics.train_loss.set(closed.loss)
        metrics.train_accuracy.set(closed.accuracy)
        for status, count in (("population", closed.population), ("selected", closed.sampled),
                              ("reported", closed.updates), ("dropped", closed.dropped)):
            metrics.round_workers.labels(status).set(count)
        metrics.sampling_rate.set(closed.sampling_rate)
        sampled = (f", {closed.sampled} of {closed.population} live workers selected (q {closed.sampling_rate:.4g})"
                   if self.rounds.sampling else "")
        if closed.abandoned is not None:
            sampled = (f", {closed.sampled} of {closed.population} live workers training (q "
                       f"{closed.sampling_rate:.4g}), {closed.abandoned} turns ended without an update")
        privacy = self.pipeline.privacy
        spent = f", epsilon {privacy.ledger.epsilon:.4g} at delta {privacy.ledger.delta:g}" if privacy else ""
        stale = "" if math.isnan(closed.staleness) else f", staleness {closed.staleness:.2g} on average"
        log.info("Round %d/%d: %d updates, %d examples, loss %.4f, accuracy %.4f%s%s%s.", closed.round,
                 self.rounds.policy.total_rounds, closed.updates, closed.examples, closed.loss, closed.accuracy,
                 sampled, spent, stale)
        if self.rounds.done:
            log.info("Training is done after round %d; waiting for the workers to leave.", closed.round)

    def _evaluated(self, evaluation: federated_eval.Evaluation) -> None:
        """A federated evaluation's metrics and its line in the log."""
        self.metrics.federated_eval.show(evaluation)
        accuracy, loss = evaluation.distribution("accuracy"), evaluation.distribution("loss")
        log.info("Round %d federated evaluation: %d workers, %d held-out examples; accuracy min %.4f, median %.4f, "
                 "max %.4f, mean %.4f; loss min %.4f, median %.4f, max %.4f, mean %.4f.", evaluation.round,
                 len(evaluation.workers), evaluation.num_examples, accuracy.min, accuracy.median, accuracy.max,
                 accuracy.mean, loss.min, loss.median, loss.max, loss.mean)

    def _name_the_silent(self) -> None:
        """Says which live workers a round closes without, when it closes at its deadline: a worker that renews
        its lease but sends nothing makes every round wait for its deadline."""
        silent = self.rounds.silent_members()
        if silent:
            log.warning("Round %d closes at its deadline without an update from task %s: live, but silent for "
                        "%.0f s. Their logs say why; COMIND_ROUND_TIMEOUT bounds the wait.", self.rounds.open_round,
                        ", ".join(str(t) for t in sorted(silent)), self.rounds.policy.round_timeout)

    async def _next_model(self, closed: RoundClosed, in_progress: RoundInProgress,
                          model: GlobalModel) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The round's new model and stage state; the previous ones if the round's result cannot stand."""
        round = closed.round
        try:
            aggregate = await self._offload(model.layout.nbytes, in_progress.result, closed.sampling_rate)
            packed, state = await self._offload(model.layout.nbytes, self.pipeline.step, model.layout,
                                                model.packed, aggregate)
        except Exception:
            log.exception("Round %d's aggregation failed, so the previous global model stands for the round.",
                          round)
            return model.packed, self.pipeline.state()
        # Finite updates can still sum to Inf: float32 sums overflow when values near
        # the top of the range meet large weights. Such a model would stall every worker.
        if not await self._offload(packed.nbytes, model.layout.finite, packed):
            log.error("Round %d's new model is not finite: updates near the float range's limit overflowed it, "
                      "so the previous global model stands for the round. --max-update-norm or --aggregation "
                      "median keeps such updates out.", round)
            return model.packed, self.pipeline.state()
        self.pipeline.commit(state)
        return packed, self.pipeline.state()

    async def _publish(self, round: int, layout: Layout, packed: np.ndarray, state: dict[str, np.ndarray],
                       train_loss: float = math.nan, train_accuracy: float = math.nan,
                       evaluation: federated_eval.Evaluation | None = None) -> bool:
        """Makes a new global model durable, then visible; False if it could not be saved. Holds ``_lock``."""
        if self.store:
            started = time.perf_counter()
            try:
                await self._offload(layout.nbytes, self.store.save, round, layout, packed, state)
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
        self._end_within_budget(round)
        self._set_model(round, layout, packed, train_loss, train_accuracy, evaluation)
        self.rounds.complete(round)
        self.metrics.buffer_updates.set(self.rounds.buffered)
        now = time.monotonic()
        if round > 0:
            self.metrics.rounds_completed.inc()
            self.metrics.round_duration.observe(now - self._round_opened)
        self._round_opened = now
        waiters, self._published = self._published, asyncio.Event()
        waiters.set()
        self._poke.set()
        if self.rounds.done:
            self._wake(list(self._held))  # every worker takes the final model
            self.training_done.set()
            self._membership_changed()
        return True

    def _set_model(self, round: int, layout: Layout, packed: np.ndarray, train_loss: float = math.nan,
                   train_accuracy: float = math.nan, evaluation: federated_eval.Evaluation | None = None) -> None:
        total = self.rounds.policy.total_rounds
        privacy = self.pipeline.privacy
        epsilon = privacy.ledger.epsilon if privacy else math.nan
        self.model = GlobalModel(round, total, layout, packed, round >= total, train_loss, train_accuracy, epsilon,
                                 self.pipeline.optimizer.learning_rate, evaluation)
        if privacy:
            self.metrics.dp_epsilon.set(epsilon)
            self.metrics.dp_clip.set(privacy.clip)
        self.metrics.round.set(round)
        self.metrics.last_round_time.set_to_current_time()
        self.metrics.training_done.set(self.model.done)
        self.metrics.model_bytes.set(layout.nbytes)

    async def next_model(self, member_id: str, have_round: int, timeout: float) -> GlobalModel | None:
        """The global model for a worker that holds ``have_round``, waiting at most ``timeout`` seconds
        for one; None if none came in time.

        That is the first model newer than ``have_round``, or the final one, or
        at once the ps's own if it is behind ``have_round`` (it resumed from an
        older checkpoint: the worker continues from it). Under client sampling,
        a worker gets a model to train only once a round selects it, so that
        one not selected waits without training: its call stays open, and costs
        the ps nothing but its renewals until then. With asynchronous rounds it
        is the newest model, at once: the worker does not wait for a version
        (under client sampling, once its turn to train comes).
        """
        deadline = time.monotonic() + timeout
        while True:
            model = self.model
            if model is not None and (model.done or (
                    (self.rounds.asynchronous is not None or model.round != have_round)
                    and self.rounds.is_selected(member_id))):
                return model
            try:
                await asyncio.wait_for(self._turn(member_id).wait(), deadline - time.monotonic())
            except TimeoutError:
                return None

    def report_eval(self, member_id: str, round: int, loss: float, accuracy: float,
                    peer: bytes | None = None) -> None:
        """The chief's test of the global model of ``round``, for the eval gauges and the log.

        Any member could claim an accuracy of 1.0 for round 10**9: only the
        chief (task 0) reports, and only of rounds the ps has published.
        """
        self.renew(member_id, peer)
        self._check_chief(member_id, "reports evaluations of the global model")
        if not 0 <= round <= self.round:
            raise refusals.InvalidRequest(f"An evaluation must be of a round the ps has published, 0 to "
                                          f"{self.round}. Received: round={round}")
        if not (math.isfinite(loss) and math.isfinite(accuracy)):
            raise refusals.NotFinite(f"Eval loss and accuracy must be finite. Received: loss={loss}, "
                                     f"accuracy={accuracy}")
        self.metrics.eval_loss.set(loss)
        self.metrics.eval_accuracy.set(accuracy)
        log.info("Round %d evaluation: loss %.4f, accuracy %.4f.", round, loss, accuracy)

    def _check_chief(self, member_id: str, what: str) -> None:
        task = self.rounds.members[member_id].task_index
        if task != 0:
            raise refusals.NotChief(f"Only the chief (task 0) {what}. Received: a call from task {task}")

    def count_sent(self, nbytes: int) -> None:
        self.metrics.update_bytes.labels("sent").inc(nbytes)

    # Time ---------------------------------------------------------------------

    async def run_timers(self) -> None:
        """Ends leases and round deadlines on time: sleeps until the next one or a change.

        An unexpected error is logged with its traceback and the timers go
        on: without them leases and deadlines would stop without a word.
        """
        while True:
            try:
                await self._timers_once()
            except Exception:
                log.exception("The ps's timers failed; retrying in %.0f s.", TIMER_RETRY_SECONDS)
                await asyncio.sleep(TIMER_RETRY_SECONDS)

    async def _timers_once(self) -> None:
        self._poke.clear()
        wait = self.rounds.next_event() - time.monotonic()
        if wait > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), None if math.isinf(wait) else wait)
        self._end_leases()
        self._end_silent_turns()
        self._draw()  # the first round's population is in once its wait ends; async: the free turns
        if self.rounds.overdue():
            log.warning("Round %d passed its deadline with %d of the %d updates it needs (%d workers live); "
                        "waiting another %.0f s.", self.rounds.open_round, len(self.rounds.contributors),
                        self.rounds.policy.min_updates, len(self.rounds.members), self.rounds.policy.round_timeout)
            self.rounds.extend_deadline()
            self._drawn(self.rounds.draw_again())
        await self.maybe_close()

    def _end_leases(self) -> None:
        for member in self.rounds.expire():
            if self.secure is not None:
                self.secure.lease_ended(member.task_index)
            log.warning("Worker %d's lease ended (%s); %d live.", member.task_index,
                        member.description or "no description", len(self.rounds.members))
            self._wake((member.task_index,))
            self._membership_changed()

    def _end_silent_turns(self) -> None:
        silent = self.rounds.end_silent_turns()
        if silent:
            log.warning("Task %s trained for %.0f s (COMIND_ROUND_TIMEOUT) without an update: live, but silent; their "
                        "turn passes to another worker. Their logs say why.", ", ".join(map(str, sorted(silent))),
                        self.rounds.policy.round_timeout)

    async def drain(self) -> None:
        """Waits for a close or checkpoint in progress, so that it lands on disk."""
        async with self._lock:
            pass

    @staticmethod
    async def _offload(nbytes: int, function: Callable[..., T], *args: Any) -> T:
        if nbytes > OFFLOAD_BYTES:
            return await asyncio.to_thread(function, *args)
        return function(*args)

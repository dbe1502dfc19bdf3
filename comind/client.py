"""The worker's side of the protocol, with NumPy only.

A :class:`WorkerClient` joins the ps and turns one federated averaging step
into one call: :meth:`WorkerClient.sync` sends the change of the local
weights from the global model they trained from, and returns the next global
model, both in one ``Round`` call that also keeps the worker's lease. While
the ps is unreachable it retries with jittered exponential backoff; when the
ps restarted (it no longer knows this worker) it joins again. An update is
sent again on every attempt until the ps's receipt for it arrives, so no
failure in the middle of a transfer loses it; and again after joining again,
since a ps that restarted lost the updates of the round it had open.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, TypeVar

import grpc
import numpy as np

from comind import async_rounds, encodings, federated_eval, handshakes, modes
from comind.auth import TlsFiles, call_metadata
from comind.backoff import Backoff
from comind.errors import ModelMismatch, ProtocolError, PsRefusal, PsUnreachable
from comind.metrics import WorkerMetrics
from comind.proto import comind_pb2 as pb
from comind.proto import comind_pb2_grpc as pb_grpc
from comind.protocol import GRPC_OPTIONS, LONG_POLL_SECONDS, RETRY_AFTER_KEY, round_call_seconds, transfer_seconds
from comind.rounds import MIN_LEASE_SECONDS
from comind.tensors import Assembler, Layout, StreamError, chunks

if TYPE_CHECKING:
    from comind.secure_worker import SecureExchange, SecureParameters

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Statuses that mean "the ps is not there right now, or not ready": retried with backoff.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.CANCELLED})

UNARY_TIMEOUT_SECONDS = 10.0
#: The longest gRPC waits before it tries to reach a ps that was away again: well within the shortest lease
#: anyone runs (the ps's default is 10 s).
RECONNECT_BACKOFF_SECONDS = 1.0

#: Renewals go out at least every third of this, whatever lease the ps gives.
MAX_LEASE_SECONDS = 3 * 3600.0

_RECEIPTS = {pb.UPDATE_RESULT_ACCEPTED: "accepted", pb.UPDATE_RESULT_DUPLICATE: "duplicate",
             pb.UPDATE_RESULT_STALE: "stale", pb.UPDATE_RESULT_EARLY: "early",
             pb.UPDATE_RESULT_NOT_NEEDED: "not needed", pb.UPDATE_RESULT_NOT_SELECTED: "not selected"}


@dataclasses.dataclass(frozen=True)
class Membership:
    id: str
    known_round: int   # the newest round the ps is known to hold, in this membership; -1: no model


@dataclasses.dataclass(frozen=True)
class GlobalState:
    weights: list[np.ndarray]
    round: int
    done: bool
    #: The round's example-weighted training figures, as the ps's round log line gives them; NaN where it has none.
    train_loss: float = math.nan
    train_accuracy: float = math.nan
    #: Worker-level DP's epsilon after the round, as the ps's ledger has it; NaN when the ps runs without DP.
    epsilon: float = math.nan
    #: The ps's server optimizer's learning rate in the round; NaN where the ps did not say.
    server_learning_rate: float = math.nan
    #: The federated evaluation the round brought in (of the previous round's model), if one did.
    federated_eval: federated_eval.Evaluation | None = None


@dataclasses.dataclass
class Update:
    """An update on its way to the ps, until the ps's receipt for it arrives."""

    kind: pb.UpdateKind
    round: int
    packed: np.ndarray   # the change (initial: the model), packed in the layout
    num_examples: int = 0
    loss: float = 0.0
    accuracy: float = 0.0
    receipt: str | None = None  # what the ps made of it, once it said
    #: The membership that receipt came in. A ps that no longer knows it may have restarted, and lost the update
    #: with the round it had not closed yet: the receipt then no longer holds (:meth:`unanswered`).
    receipt_member: str | None = None
    #: ``packed`` as it goes on the wire, and its encoding (:mod:`comind.encodings`); an initial model as it is.
    encoding: str = encodings.FLOAT32
    wire: np.ndarray | None = None
    #: This worker's test of the model it trained from, when the ps asked for one.
    federated_eval: federated_eval.Report | None = None
    #: The same on every attempt, so that a ps in asynchronous rounds knows a retry of an update it took.
    update_id: bytes = dataclasses.field(default_factory=lambda: secrets.token_bytes(async_rounds.UPDATE_ID_BYTES))

    def unanswered(self, member: Membership) -> bool:
        """Whether the ps has yet to say what it made of this update, as ``member``.

        A receipt from an earlier membership is void: this worker joined again because the ps no longer knew it,
        after a restart (which resumes from the last closed round's checkpoint, without the updates the open
        round had taken) or after its lease ended. Only sending the update again tells them apart: the same ps
        calls it a duplicate (by task index, or by update id in asynchronous rounds), a new one takes it.
        """
        if self.receipt is not None and self.receipt_member != member.id:
            log.info("Sending our update for round %d again: the ps that said %r of it no longer knows this "
                     "worker, and may have restarted without it.", self.round, self.receipt)
            self.receipt = None
        return self.receipt is None

    def header(self, layout: Layout) -> pb.UpdateHeader:
        header = pb.UpdateHeader(kind=self.kind, round=self.round, num_examples=self.num_examples, loss=self.loss,
                                 accuracy=self.accuracy, tensors=layout.to_proto(), encoding=self.encoding,
                                 update_id=self.update_id)
        if self.federated_eval is not None:
            header.federated_eval.CopyFrom(federated_eval.to_proto(self.federated_eval))
        return header

    def encoded(self, layout: Layout, encoder: encodings.Encoder) -> np.ndarray:
        """The bytes to send: a delta encoded as the ps said once (the same on every attempt), or again should
        the ps now say otherwise (it restarted with another encoding); an initial model as it is."""
        if self.kind == pb.UPDATE_KIND_INITIAL:
            return self.packed
        if self.wire is None or self.encoding != encoder.encoding.name:
            self.wire, self.encoding = encoder.encode(layout, self.packed), encoder.encoding.name
        return self.wire


def delta(layout: Layout, weights: np.ndarray, base: np.ndarray) -> np.ndarray:
    """``weights - base`` for floating-point tensors, packed; other tensors (counters, seeds) as they are."""
    change = weights.copy()
    for out, reference in zip(layout.views(change), layout.views(base), strict=True):
        if out.dtype.kind == "f":
            np.subtract(out, reference, out=out)
    return change


_MODES = {pb.TRAINING_MODE_FEDERATED: modes.FEDERATED, pb.TRAINING_MODE_DISTRIBUTED: modes.DISTRIBUTED}
_ROUNDS_MODES = {pb.ROUNDS_MODE_SYNC: async_rounds.SYNC, pb.ROUNDS_MODE_ASYNC: async_rounds.ASYNC}


def read_model(messages: Iterator[pb.PsMessage], expected: Layout,
               on_receipt: Callable[[pb.Receipt], None] = lambda receipt: None,
               ) -> tuple[GlobalState, np.ndarray] | None:
    """Decodes the ps's side of a Round call: a receipt (if an update was sent), then the global model.

    Returns:
        The model, and the buffer its weights are views of; None when the
        call waited its longest and the ps had no newer one yet.

    Raises:
        ModelMismatch: the ps's model differs from ``expected`` in dtype or shape.
        ProtocolError: the answer breaks the protocol; nothing is allocated
            beyond ``expected``'s size whatever its header claims.
    """
    first = None
    for message in messages:
        if message.HasField("receipt"):
            on_receipt(message.receipt)
        if message.HasField("model"):
            first = message
            break
        if message.data:
            raise ProtocolError("The ps sent model data before a model header.")
    if first is None:
        raise ProtocolError("The ps ended a round call without a model.")
    header = first.model
    if not header.ready:
        return None
    try:
        layout = Layout.from_proto(header.tensors, max_bytes=1 << 62)
        encoding = encodings.parse(header.encoding)
    except ValueError as error:
        raise ProtocolError(f"The ps sent a model header this worker cannot read: {error}") from None
    problem = layout.mismatch(expected)
    if problem:
        raise ModelMismatch(f"This worker's model does not match the ps's global model: {problem} (as "
                            "the ps has it). Every worker must train the architecture the ps holds: "
                            "check COMIND_MODEL, COMIND_DATASET and the ps's checkpoint directory.")
    # The bytes follow from the worker's own layout (which the header's matches) and the encoding.
    assembler = Assembler(encoding.wire_layout(expected))
    try:
        assembler.feed(first.data)
        for message in messages:
            if message.HasField("receipt") or message.HasField("model"):
                raise ProtocolError("The ps sent something other than model data inside a model.")
            assembler.feed(message.data)
        packed = assembler.finish()
    except StreamError as error:
        raise ProtocolError(f"The ps sent a broken model: the {error}.") from None
    if not encoding.identity:
        encoded, packed = packed, np.empty(layout.nbytes, np.uint8)
        try:
            encoding.decode(expected, encoded, packed)
        except encodings.EncodingError as error:
            raise ProtocolError(f"The ps sent a model that does not decode as {encoding.name}: {error}.") from None
    epsilon = header.epsilon if header.HasField("epsilon") else math.nan
    learning_rate = header.server_learning_rate if header.HasField("server_learning_rate") else math.nan
    return GlobalState(layout.views(packed), header.round, header.done, header.train_loss,
                       header.train_accuracy, epsilon, learning_rate, _evaluation(header)), packed


def _evaluation(header: pb.ModelHeader) -> federated_eval.Evaluation | None:
    """The federated evaluation a model header carries, if any."""
    if not header.HasField("federated_eval"):
        return None
    result = header.federated_eval
    return federated_eval.Evaluation(result.round, {task: federated_eval.from_proto(report)
                                                    for task, report in sorted(result.workers.items())})


class WorkerClient:
    """One worker's connection to the ps.

    Args:
        address: ``host:port`` of the ps.
        task_index: this worker's index (sharding, logs).
        is_chief: whether this worker provides the initial model; by
            default the worker with task index 0.
        token: the shared token, if the ps requires one.
        tls: certificate files; without them the channel is plain text.
        unreachable_timeout: seconds to keep retrying a ps that does not
            answer before giving up with :class:`PsUnreachable`.
    """

    def __init__(self, address: str, *, task_index: int = 0, is_chief: bool | None = None, token: str | None = None,
                 tls: TlsFiles = TlsFiles(), description: str = "", backoff: Backoff = Backoff(),
                 unreachable_timeout: float = 600.0, metrics: WorkerMetrics | None = None):
        self.address = address
        self.task_index = task_index
        self.is_chief = task_index == 0 if is_chief is None else is_chief
        self.description = description
        self.round = -1  # the round of the global model this worker holds
        self.total_rounds: int | None = None
        self.replicas_to_aggregate: int | None = None  # None: every live worker
        self.mode = modes.FEDERATED  # what an update is: the ps's mode, known once joined (comind.modes)
        #: Whether a sync waits for the round to close (sync) or returns the newest model at once (async), as the
        #: ps said at join.
        self.rounds_mode = async_rounds.SYNC
        #: Every this many rounds, the ps asks each worker to test the global model (comind.federated_eval); 0: never.
        self.federated_eval_every = 0
        #: How updates go to the ps, as it said at join; its error feedback, if any, lives in this process only.
        self.encoder = encodings.Encoder(encodings.Float32())
        #: Secure aggregation's parameters, when the ps said at join that it aggregates securely.
        self.secure_aggregation: SecureParameters | None = None
        self._metadata = call_metadata(token)
        options = [*GRPC_OPTIONS, ("grpc.keepalive_time_ms", 30000),
                   # gRPC's own reconnect back-off grows to 2 minutes; a ps back from an outage waits one lease
                   # for its workers before it closes a round without them.
                   ("grpc.max_reconnect_backoff_ms", int(RECONNECT_BACKOFF_SECONDS * 1000))]
        self._channel = (grpc.secure_channel(address, tls.channel_credentials(), options=options)
                         if tls.enabled else grpc.insecure_channel(address, options=options))
        self._stub = pb_grpc.ParameterServerStub(self._channel)
        self._tls = tls
        self._backoff = backoff
        self._unreachable_timeout = unreachable_timeout
        self._metrics = metrics
        self._layout: Layout | None = None
        self._global: np.ndarray | None = None  # the global model this worker holds, packed
        self._lock = threading.Lock()
        self._member_id: str | None = None
        # Names this process to the ps: should a Join's reply be lost, joining again gets the same membership.
        self._instance = secrets.token_hex(16)
        self._known_round = -1
        self._lease = 10.0
        self._calls_hold_lease = False  # what the ps said at join
        self._long_poll = LONG_POLL_SECONDS  # likewise
        self._calls_open = 0
        self._last_contact = time.monotonic()
        self._closed = threading.Event()
        self._heartbeats: threading.Thread | None = None

    # Public API ---------------------------------------------------------------

    def join(self, weights: Sequence[np.ndarray], names: Sequence[str] | None = None) -> GlobalState:
        """Joins and returns the global model to start from.

        The chief offers ``weights`` as the initial model; the ps keeps it
        unless it already holds one (from a checkpoint). Other workers only
        use ``weights`` to check that their model matches the ps's.
        """
        layout = self._layout = Layout.of(weights, names)
        initial = Update(pb.UPDATE_KIND_INITIAL, 0, layout.pack(weights)) if self.is_chief else None
        state = self._retrying("joining", lambda member: self._round_call(member, initial, initial))
        self._start_heartbeats()
        return state

    def connect(self) -> None:
        """Joins the ps, if this worker has not yet, to learn what it asks of workers (:attr:`mode`,
        :attr:`federated_eval_every`) before preparing data; :meth:`join` then continues this membership."""
        self._retrying("joining", lambda member: member)
        self._start_heartbeats()  # the data may take longer to prepare than the lease lasts

    def sync(self, weights: Sequence[np.ndarray], num_examples: int, loss: float = 0.0,
             accuracy: float = 0.0, change: Sequence[np.ndarray] | None = None,
             evaluation: federated_eval.Report | None = None) -> GlobalState:
        """Sends the change of the local weights for the next round and returns the new global model.

        Blocks until the round closes (with asynchronous rounds, returns the
        newest model at once). If the round closed without this update (it
        came too late), the update is dropped and the newest global model is
        returned.

        Args:
            weights: the model after local training, from the last global model.
            num_examples: this worker's training examples, the update's weight in an
                example-weighted mean.
            loss, accuracy: the local training figures, for the ps's round log.
            change: the update itself, tensor by tensor, when it is not ``weights`` minus the
                global model (distributed mode sends minus a gradient, exactly: a subtraction
                of weights would round it); integer tensors as values.
            evaluation: this worker's test of the global model it trained from, when the ps asked
                for one (:attr:`federated_eval_every`); it goes up with the update.
        """
        if self._layout is None or self._global is None:
            raise RuntimeError("Call join() before sync(): the worker needs the first global model.")
        layout = self._layout
        packed = self._packed(weights, "weights")
        changed = delta(layout, packed, self._global) if change is None else self._packed(change, "change")
        target = self.round + 1
        update = Update(pb.UPDATE_KIND_DELTA, target, changed, int(num_examples), float(loss), float(accuracy),
                        federated_eval=evaluation)
        # Should the ps have lost every model (a restart without checkpoints), the chief starts it again from this.
        restart = Update(pb.UPDATE_KIND_INITIAL, 0, packed) if self.is_chief else None
        started = time.perf_counter()
        state = self._retrying(f"the update for round {target}",
                               lambda member: self._round_call(member, update, restart))
        if self._metrics:
            self._metrics.sync_duration.observe(time.perf_counter() - started)
        return state

    def _packed(self, tensors: Sequence[np.ndarray], name: str) -> np.ndarray:
        assert self._layout is not None
        problem = self._layout.mismatch(Layout.of(tensors))
        if problem:
            raise ModelMismatch(f"What sync() was given as {name} does not match the model given to join(): "
                                f"{problem}.")
        return self._layout.pack(tensors)

    def report_eval(self, round: int, loss: float, accuracy: float) -> None:
        """Reports the chief's evaluation of the global model of ``round``."""
        def attempt(member: Membership) -> bool:
            self._stub.ReportEval(pb.EvalReport(member_id=member.id, round=round, loss=loss, accuracy=accuracy),
                                  timeout=UNARY_TIMEOUT_SECONDS, metadata=self._metadata)
            return True
        self._retrying("an evaluation report", attempt)

    def close(self) -> None:
        """Leaves the ps (best effort) and closes the connection."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._heartbeats:
            self._heartbeats.join()
        with self._lock:
            member_id = self._member_id
        if member_id:
            try:
                self._stub.Leave(pb.LeaveRequest(member_id=member_id), timeout=2.0, metadata=self._metadata)
            except grpc.RpcError as error:
                log.info("Could not say goodbye to the ps (%s); its lease will end.", error.code().name)
        self._channel.close()

    def __enter__(self) -> WorkerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Calls --------------------------------------------------------------------

    def _membership(self) -> Membership:
        """This worker's member id, joining first if the ps does not know it."""
        with self._lock:
            if self._member_id is None:
                reply = self._stub.Join(pb.JoinRequest(task_index=self.task_index, description=self.description,
                                                       instance=self._instance),
                                        timeout=UNARY_TIMEOUT_SECONDS, metadata=self._metadata)
                if not MIN_LEASE_SECONDS <= reply.lease_seconds < math.inf:
                    raise ProtocolError(f"The ps gave a lease of {reply.lease_seconds} s; a lease must be a "
                                        f"finite number of seconds, at least {MIN_LEASE_SECONDS}.")
                if not 0 <= reply.long_poll_seconds < math.inf:
                    raise ProtocolError(f"The ps gave a long poll of {reply.long_poll_seconds} s; it must be a "
                                        f"finite number of seconds.")
                # A longer lease needs no more frequent renewal, and would overflow threading's waits.
                self._member_id, self._lease = reply.member_id, min(reply.lease_seconds, MAX_LEASE_SECONDS)
                self._calls_hold_lease = reply.calls_hold_lease
                # 0 from a ps that predates it; as long as a lease at most, for the same reason.
                self._long_poll = min(reply.long_poll_seconds, MAX_LEASE_SECONDS) or LONG_POLL_SECONDS
                self._known_round = reply.round
                self.total_rounds = reply.total_rounds
                self.replicas_to_aggregate = reply.replicas_to_aggregate or None
                if reply.mode not in _MODES or reply.rounds_mode not in _ROUNDS_MODES:
                    raise ProtocolError(f"The ps trains in a mode this worker does not know ({reply.mode}, rounds "
                                        f"{reply.rounds_mode}); run the same coMind version on the ps and the "
                                        f"workers.")
                self.mode, self.rounds_mode = _MODES[reply.mode], _ROUNDS_MODES[reply.rounds_mode]
                self.federated_eval_every = reply.federated_eval_every
                try:
                    encoding = encodings.parse(reply.update_encoding)
                except ValueError as error:
                    raise ProtocolError(f"The ps wants updates encoded in a way this worker does not know ({error}); "
                                        "run the same coMind version on the ps and the workers.") from None
                if encoding.name != self.encoder.encoding.name:
                    log.info("The ps takes updates encoded as %s.", encoding.name)
                    self.encoder = encodings.Encoder(encoding)
                self._secure_parameters(reply)
                log.info("Joined the ps at %s (its round %d%s).", self.address, reply.round,
                         ", asynchronous rounds" if self.rounds_mode == async_rounds.ASYNC else "")
            return Membership(self._member_id, self._known_round)

    def _secure_parameters(self, reply: pb.JoinReply) -> None:
        if not reply.HasField("secure_aggregation"):
            self.secure_aggregation = None
            return
        from comind.secure_worker import SecureParameters  # with the secagg extra only

        if self.secure_aggregation is None:
            log.info("The ps aggregates securely: this worker's updates go masked, and the ps learns only each "
                     "round's sum.")
        self.secure_aggregation = SecureParameters.of(reply)

    def _secure_exchange(self, send: Update | None, outbox: queue.Queue[pb.WorkerMessage | None]
                         ) -> SecureExchange | None:
        """The call's part in secure aggregation's stages, when the ps aggregates securely and it carries a delta."""
        if self.secure_aggregation is None or send is None or send.kind != pb.UPDATE_KIND_DELTA:
            return None
        from comind.secure_worker import SecureExchange

        assert self._layout is not None
        return SecureExchange(self.task_index, send.round, self._layout, send.packed, self.secure_aggregation,
                              outbox.put)

    def _forget_membership(self, member_id: str | None) -> None:
        with self._lock:
            if self._member_id == member_id:
                self._member_id = None

    def _round_call(self, member: Membership, update: Update | None, restart: Update | None) -> GlobalState | None:
        """One Round call: sends ``update`` if the ps has not said what it made of it, and returns the next
        global model (None if the call ended before one existed).

        ``restart`` (the chief's full model) goes instead when the ps holds no model at all.
        """
        assert self._layout is not None
        layout = self._layout
        send = update if update is not None and update.unanswered(member) else None
        if member.known_round < 0:
            # The ps holds no model: a change means nothing to it; the chief starts it from its own model.
            send = restart if restart is not None and restart.unanswered(member) else None
        elif send is not None and send.kind == pb.UPDATE_KIND_INITIAL:
            send = None  # the ps has a model already
        hello = pb.Hello(member_id=member.id, have_round=self.round)
        # Under secure aggregation, the stages' messages (its masked input among them) go up through here.
        outbox: queue.Queue[pb.WorkerMessage | None] = queue.Queue()
        exchange = self._secure_exchange(send, outbox)
        wire = send.encoded(layout, self.encoder) if send is not None and exchange is None else None
        if send is not None:
            hello.update.CopyFrom(send.header(layout))
        if exchange is not None:
            hello.secagg_keys.CopyFrom(exchange.keys)
        finished = threading.Event()  # the call is over: stop renewing

        def requests() -> Iterator[pb.WorkerMessage]:
            # The hello alone first: the ps reads the bytes only once it has room for them, and until then
            # flow control holds them here, not in the ps's memory. (The hello and a 0.4 MB update in one
            # message raised the ps's peak memory with 250 workers from 400 to 500 MB: tests/test_load.py.)
            yield pb.WorkerMessage(hello=hello)
            if send is not None and wire is not None:
                for data in chunks(wire):
                    if send.receipt is not None:  # the ps has said what it made of it: the rest is not needed
                        break
                    yield pb.WorkerMessage(data=data)
                else:
                    yield pb.WorkerMessage(end=True)
            last = waiting_since = time.monotonic()  # the ps's long poll starts about now
            while not finished.is_set():
                try:
                    due = renewal_due(last, waiting_since, self._lease, self._long_poll, self._calls_hold_lease)
                    message = outbox.get(timeout=max(0.0, due - time.monotonic()))
                except queue.Empty:
                    message = pb.WorkerMessage(renewal=True)
                if message is None:  # the call is over
                    return
                yield message
                last = time.monotonic()
                if not message.renewal:  # a secure aggregation stage's: the ps's long poll starts after the last
                    waiting_since = last

        def on_receipt(receipt: pb.Receipt) -> None:
            if send is None or receipt.round != send.round or receipt.result not in _RECEIPTS:
                raise ProtocolError(f"The ps sent a receipt this worker did not ask for: {receipt}.")
            send.receipt, send.receipt_member = _RECEIPTS[receipt.result], member.id
            if send.kind == pb.UPDATE_KIND_INITIAL:
                log.info("The ps %s our initial model.", "took" if send.receipt == "accepted" else
                         "already had a model; ignored")
            elif send.receipt == "duplicate":
                log.info("The ps already had our update for round %d.", send.round)
            elif send.receipt == "stale":
                log.info("Our update for round %d came too late; the ps moved on%s.", send.round,
                         " (training is done, or the update was more than --max-staleness versions old)"
                         if self.rounds_mode == async_rounds.ASYNC else "")
            elif send.receipt == "not selected":
                log.info("The ps did not select this worker for round %d; waiting for a round that does.",
                         send.round)
            elif send.receipt == "early":
                log.warning("The ps is behind our update for round %d (it resumed from an older checkpoint).",
                            send.round)

        timeout = round_call_seconds(wire.nbytes if wire is not None else 0, layout.nbytes, self._long_poll)
        if exchange is not None:
            from comind.secure_worker import STAGES_SECONDS

            timeout += transfer_seconds(layout.nbytes) + STAGES_SECONDS  # its masked input, and the stages
        self._call_opened()
        responses = self._stub.Round(requests(), timeout=timeout, metadata=self._metadata)
        try:
            received = read_model(exchange.answer(responses) if exchange else responses, layout, on_receipt)
        except (ProtocolError, ModelMismatch):
            responses.cancel()
            raise
        finally:
            finished.set()
            outbox.put(None)
            self._call_closed()
        if received is None:
            return None
        state, self._global = received
        if update is not None and update.receipt is None:
            # Not sent (the ps had lost every model): it changes a model the ps no longer has.
            update.receipt = "superseded"
        if 0 <= state.round < self.round:
            log.warning("The ps is back at round %d, behind our %d; continuing from its model.", state.round,
                        self.round)
        self.round = state.round
        with self._lock:
            if self._member_id == member.id:
                self._known_round = state.round
        if self._metrics:
            self._metrics.round.set(state.round)
        return state

    def _retrying(self, what: str, attempt: Callable[[Membership], T | None]) -> T:
        """Runs ``attempt`` as a member until it returns something, or cannot."""
        delays = self._backoff.delays()
        give_up = time.monotonic() + self._unreachable_timeout
        waited_for_task = False
        while True:
            member = None
            try:
                member = self._membership()
                result = attempt(member)
                if result is not None:
                    return result
                continue  # a long poll ended before the round closed: call again
            except grpc.RpcError as error:
                code = error.code()
                if code == grpc.StatusCode.ABORTED and self.secure_aggregation is not None:
                    # Too few parties survived the round's secure aggregation: take part in its next attempt.
                    log.warning("%s Sending %s again.", error.details(), what)
                    continue
                if code == grpc.StatusCode.NOT_FOUND and member is not None:
                    log.warning("The ps no longer knows this worker (%s); joining again.", error.details())
                    self._forget_membership(member.id)
                    continue
                hint = _retry_after(error)
                if code == grpc.StatusCode.ALREADY_EXISTS and hint is not None and not waited_for_task:
                    # This very worker before a restart, whose lease has not ended yet, or another worker given
                    # the same index: after one wait for that lease, only the second holds it still.
                    log.warning("%s Waiting %.1f s, then joining once more.", error.details(), hint)
                    waited_for_task = True
                    self._closed.wait(hint)
                    continue
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED and hint is not None and not self._closed.is_set() \
                        and time.monotonic() + hint < give_up:
                    delay = hint + next(delays)  # jittered, so that refused workers do not come back together
                    log.info("The ps refused to register this worker for now (%s); retrying in %.1f s.",
                             error.details(), delay)
                    self._closed.wait(delay)
                    continue
                if code not in RETRYABLE or self._closed.is_set():
                    raise PsRefusal(what, error.code(), error.details() or "") from None
                details = f"{code.name}: {error.details()}"
                # Retrying cannot change a certificate: say so now, not after the unreachable timeout.
                reason = handshakes.reason_to_stop(self.address, self._tls, details)
                if reason:
                    raise PsUnreachable(reason) from None
                if time.monotonic() > give_up:
                    raise PsUnreachable(
                        f"The ps at {self.address} did not answer for {self._unreachable_timeout:.0f} s "
                        f"({details}). Check that it runs and that COMIND_PS_ADDRESS points to it."
                        f"{handshakes.likely_cause(details)}") from None
                # No slower than the renewals: a restarted ps waits about one lease
                # for its workers to come back before it closes a round without them.
                backoff_delay = min(next(delays), self._lease / 3)
                log.info("The ps is unreachable (%s); retrying %s in %.2f s.%s", details, what, backoff_delay,
                         handshakes.likely_cause(details))
                self._closed.wait(backoff_delay)

    # Lease --------------------------------------------------------------------

    def _call_opened(self) -> None:
        with self._lock:
            self._calls_open += 1

    def _call_closed(self) -> None:
        with self._lock:
            self._calls_open -= 1
            self._last_contact = time.monotonic()

    def _start_heartbeats(self) -> None:
        if self._heartbeats is not None:
            return
        self._heartbeats = threading.Thread(target=self._heartbeat_loop, name="comind-heartbeat", daemon=True)
        self._heartbeats.start()

    def _heartbeat_loop(self) -> None:
        """Renews the lease while local training keeps the worker out of Round calls for long."""
        while not self._closed.wait(self._lease / 3):
            with self._lock:
                member_id = self._member_id
                quiet = self._calls_open == 0 and time.monotonic() - self._last_contact >= self._lease / 3
            if not quiet:
                continue  # an open call renews the lease, and one just ended did
            try:
                self._heartbeat(member_id)
            except Exception as error:  # noqa: BLE001 - this thread must outlive any one failure
                log.warning("Could not renew this worker's lease (%s: %s); trying again in %.1f s.",
                            type(error).__name__, error, self._lease / 3)

    def _heartbeat(self, member_id: str | None) -> None:
        if member_id is None:
            self._membership()
            return
        try:
            self._stub.Heartbeat(pb.HeartbeatRequest(member_id=member_id), timeout=UNARY_TIMEOUT_SECONDS,
                                 metadata=self._metadata)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            # Join again at once, so the ps counts this worker in the current round.
            self._forget_membership(member_id)
            self._membership()
        with self._lock:
            self._last_contact = time.monotonic()


def renewal_due(last_message: float, waiting_since: float, lease: float, long_poll: float,
                calls_hold_lease: bool = True) -> float:
    """When a worker renews its lease (``time.monotonic()``): a third of a lease after its last message, unless
    it waits in a Round call that holds its lease (``calls_hold_lease``, as the ps said at join).

    Then the ps needs none: the renewal is the worker's probe of its own link. Over a connection the ps dropped while
    the link was down, it meets a reset and the worker calls again at once, where gRPC's own pings would take
    30 s. It goes a lease after the call's last message, but not near the end of the ps's long poll, due about
    ``waiting_since + long_poll``: that end (the ps's "not yet") probes the link as well, and a renewal written
    as it comes meets the end of the call. Then the probe waits until the end is a third of a lease late.
    """
    if not calls_hold_lease:
        return last_message + lease / 3
    due, poll_end, margin = last_message + lease, waiting_since + long_poll, lease / 3
    return max(due, poll_end + margin) if due > poll_end - margin else due


def _retry_after(error: grpc.RpcError) -> float | None:
    """The seconds a refusal says to wait before trying again (at most a long lease); None if it says none."""
    metadata: tuple[tuple[str, str], ...] = \
        tuple(error.trailing_metadata() or ()) if isinstance(error, grpc.Call) else ()
    for key, value in metadata:
        if key == RETRY_AFTER_KEY:
            try:
                seconds = float(value)
            except ValueError:
                return None
            return min(seconds, MAX_LEASE_SECONDS) if seconds >= 0 else None
    return None

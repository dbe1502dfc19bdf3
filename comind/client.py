"""The worker's side of the protocol, with NumPy only.

A :class:`WorkerClient` registers with the ps, keeps its lease alive from a
background thread, and turns one federated averaging step into one call:
:meth:`WorkerClient.sync` pushes the local weights and returns the next
global model. While the ps is unreachable it retries with jittered
exponential backoff; when the ps restarted (it no longer knows this worker)
it registers again and re-sends its update if the ps lost it, so a worker
never loses its place.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import grpc
import numpy as np

from comind.auth import TlsFiles, call_metadata
from comind.backoff import Backoff
from comind.errors import ModelMismatch, ProtocolError, PsRefusal, PsUnreachable
from comind.metrics import WorkerMetrics
from comind.proto import comind_pb2 as pb
from comind.proto import comind_pb2_grpc as pb_grpc
from comind.protocol import GRPC_OPTIONS, LONG_POLL_SECONDS
from comind.tensors import Assembler, Layout, LayoutError, StreamError, chunks

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Statuses that mean "the ps is not there right now": retried with backoff.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.CANCELLED})

UNARY_TIMEOUT_SECONDS = 10.0
#: Slowest transfer rate allowed for before a model transfer times out.
MIN_BYTES_PER_SECOND = 20e6
#: Heartbeats go out at least every third of this, whatever lease the ps gives.
MAX_LEASE_SECONDS = 3 * 3600.0


@dataclasses.dataclass(frozen=True)
class Membership:
    id: str
    epoch: int         # registrations so far: a change means the ps forgot us
    known_round: int   # the newest round the ps is known to hold, in this membership


@dataclasses.dataclass(frozen=True)
class GlobalState:
    weights: list[np.ndarray]
    round: int
    done: bool


def read_model(messages: Iterator[pb.ModelChunk], expected: Layout) -> GlobalState | None:
    """Decodes a PullModel answer into the global model; None when the ps had no newer one yet.

    Raises:
        ModelMismatch: the ps's model differs from ``expected`` in dtype or shape.
        ProtocolError: the answer breaks the protocol; nothing is allocated
            beyond ``expected``'s size whatever its header claims.
    """
    first = next(messages, None)
    if first is None or first.WhichOneof("part") != "header":
        raise ProtocolError("The ps's answer to a pull did not start with a model header.")
    header = first.header
    if not header.ready:
        return None
    try:
        layout = Layout.from_proto(header.tensors, max_bytes=1 << 62)
    except LayoutError as error:
        raise ProtocolError(f"The ps sent a model header this worker cannot read: {error}") from None
    problem = layout.mismatch(expected)
    if problem:
        raise ModelMismatch(f"This worker's model does not match the ps's global model: {problem} (as "
                            "the ps has it). Every worker must train the architecture the ps holds: "
                            "check COMIND_MODEL, COMIND_DATASET and the ps's checkpoint directory.")
    assembler = Assembler(layout)
    try:
        for message in messages:
            if message.WhichOneof("part") == "header":
                raise ProtocolError("The ps sent a second model header inside one model.")
            assembler.feed(message.data)
        packed = assembler.finish()
    except StreamError as error:
        raise ProtocolError(f"The ps sent a broken model: the {error}.") from None
    return GlobalState(layout.views(packed), header.round, header.done)


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
        self.round = -1
        self.total_rounds: int | None = None
        self.replicas_to_aggregate: int | None = None  # None: every live worker
        self._metadata = call_metadata(token)
        options = GRPC_OPTIONS + [("grpc.keepalive_time_ms", 30000)]
        self._channel = (grpc.secure_channel(address, tls.channel_credentials(), options=options)
                         if tls.enabled else grpc.insecure_channel(address, options=options))
        self._stub = pb_grpc.ParameterServerStub(self._channel)
        self._backoff = backoff
        self._unreachable_timeout = unreachable_timeout
        self._metrics = metrics
        self._layout: Layout | None = None
        self._lock = threading.Lock()
        self._member_id: str | None = None
        self._epoch = 0
        self._known_round = -1
        self._lease = 10.0
        self._closed = threading.Event()
        self._heartbeats: threading.Thread | None = None

    # Public API ---------------------------------------------------------------

    def join(self, weights: Sequence[np.ndarray], names: Sequence[str] | None = None) -> GlobalState:
        """Registers and returns the global model to start from.

        The chief offers ``weights`` as the initial model; the ps keeps it
        unless it already holds one (from a checkpoint). Other workers only
        use ``weights`` to check that their model matches the ps's.
        """
        self._layout = Layout.of(weights, names)
        packed = self._layout.pack(weights) if self.is_chief else None

        def attempt(member: Membership) -> GlobalState:
            if packed is not None and member.known_round < 0:
                self._initialize(member, packed)
            return self._pull(member, after_round=-1)

        state = self._retrying("joining", attempt)
        self._start_heartbeats()
        return state

    def sync(self, weights: Sequence[np.ndarray], num_examples: int, loss: float = 0.0,
             accuracy: float = 0.0) -> GlobalState:
        """Pushes local weights for the next round and returns the new global model.

        Blocks until the round closes. If the round closed without this
        update (it came too late), the update is dropped and the newest
        global model is returned.
        """
        if self._layout is None:
            raise RuntimeError("Call join() before sync(): the worker needs the first global model.")
        problem = self._layout.mismatch(Layout.of(weights))
        if problem:
            raise ModelMismatch(f"The weights passed to sync() do not match the model given to join(): {problem}.")
        packed = self._layout.pack(weights)
        target = self.round + 1
        header = pb.UpdateHeader(round=target, num_examples=int(num_examples), loss=float(loss),
                                 accuracy=float(accuracy), tensors=self._layout.to_proto())
        pushed_epoch: int | None = None
        started = time.perf_counter()

        def attempt(member: Membership) -> GlobalState:
            nonlocal pushed_epoch
            if pushed_epoch != member.epoch and member.known_round < target:
                # Not pushed yet, or pushed to a ps that restarted and lost it.
                pushed_epoch = member.epoch
                if member.known_round == target - 1:
                    header.member_id = member.id
                    self._push(header, packed)
                else:
                    # The ps restarted from an older checkpoint, or with none at all.
                    log.warning("The ps is back at round %d, behind our %d; continuing from its model.",
                                member.known_round, self.round)
                    if member.known_round < 0 and self.is_chief:
                        self._initialize(member, packed)
                    return self._pull(member, after_round=-1)
            return self._pull(member, after_round=target - 1)

        state = self._retrying(f"the update for round {target}", attempt)
        if self._metrics:
            self._metrics.sync_duration.observe(time.perf_counter() - started)
        return state

    def report_eval(self, round: int, loss: float, accuracy: float) -> None:
        """Reports the chief's evaluation of the global model of ``round``."""
        def attempt(member: Membership) -> None:
            self._stub.ReportEval(pb.EvalReport(member_id=member.id, round=round, loss=loss, accuracy=accuracy),
                                  timeout=UNARY_TIMEOUT_SECONDS, metadata=self._metadata)
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

    def __exit__(self, *exc) -> None:
        self.close()

    # Calls --------------------------------------------------------------------

    def _membership(self) -> Membership:
        """This worker's member id, registering first if the ps does not know it."""
        with self._lock:
            if self._member_id is None:
                reply = self._stub.Register(
                    pb.RegisterRequest(task_index=self.task_index, description=self.description),
                    timeout=UNARY_TIMEOUT_SECONDS, metadata=self._metadata)
                if not 0 < reply.lease_seconds < math.inf:
                    raise ProtocolError(f"The ps gave a lease of {reply.lease_seconds} s; a lease must be a "
                                        "positive, finite number of seconds.")
                # A longer lease needs no rarer heartbeat, and would overflow threading's waits.
                self._member_id, self._lease = reply.member_id, min(reply.lease_seconds, MAX_LEASE_SECONDS)
                self._epoch += 1
                self._known_round = reply.round
                self.total_rounds = reply.total_rounds
                self.replicas_to_aggregate = reply.replicas_to_aggregate or None
                log.info("Registered with the ps at %s (its round %d).", self.address, reply.round)
            return Membership(self._member_id, self._epoch, self._known_round)

    def _forget_membership(self, member_id: str | None) -> None:
        with self._lock:
            if self._member_id == member_id:
                self._member_id = None

    def _transfer_timeout(self) -> float:
        return UNARY_TIMEOUT_SECONDS + self._layout.nbytes / MIN_BYTES_PER_SECOND

    def _stream(self, header: pb.UpdateHeader, packed: np.ndarray):
        yield pb.UpdateChunk(header=header)
        for data in chunks(packed):
            yield pb.UpdateChunk(data=data)

    def _initialize(self, member: Membership, packed: np.ndarray) -> None:
        header = pb.UpdateHeader(member_id=member.id, tensors=self._layout.to_proto())
        reply = self._stub.Initialize(self._stream(header, packed), timeout=self._transfer_timeout(),
                                      metadata=self._metadata)
        log.info("The ps %s our initial model.", "took" if reply.accepted else "already had a model; ignored")

    def _push(self, header: pb.UpdateHeader, packed: np.ndarray) -> None:
        try:
            reply = self._stub.PushUpdate(self._stream(header, packed), timeout=self._transfer_timeout(),
                                          metadata=self._metadata)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.ABORTED:
                raise
            log.info("Update for round %d came too late: %s", header.round, error.details())
            return
        if reply.duplicate:
            log.info("The ps already had our update for round %d.", header.round)

    def _pull(self, member: Membership, after_round: int) -> GlobalState:
        """The first global model newer than ``after_round``; long polls until it exists."""
        request = pb.PullRequest(member_id=member.id, after_round=after_round)
        while True:
            messages = self._stub.PullModel(request, timeout=LONG_POLL_SECONDS + self._transfer_timeout(),
                                            metadata=self._metadata)
            state = read_model(messages, self._layout)
            if state is None:
                continue  # the ps waited a full long poll; ask again
            self.round = state.round
            with self._lock:
                if self._epoch == member.epoch:
                    self._known_round = max(self._known_round, state.round)
            if self._metrics:
                self._metrics.round.set(state.round)
            return state

    def _retrying(self, what: str, attempt: Callable[[Membership], T]) -> T:
        """Runs ``attempt`` as a registered member until it succeeds or cannot."""
        delays = self._backoff.delays()
        give_up = time.monotonic() + self._unreachable_timeout
        while True:
            member = None
            try:
                member = self._membership()
                return attempt(member)
            except grpc.RpcError as error:
                code = error.code()
                if code == grpc.StatusCode.NOT_FOUND and member is not None:
                    log.warning("The ps no longer knows this worker (%s); registering again.", error.details())
                    self._forget_membership(member.id)
                    continue
                if code not in RETRYABLE or self._closed.is_set():
                    raise PsRefusal(what, error.code(), error.details()) from None
                if time.monotonic() > give_up:
                    raise PsUnreachable(
                        f"The ps at {self.address} did not answer for {self._unreachable_timeout:.0f} s "
                        f"({code.name}: {error.details()}). Check that it runs and that COMIND_PS_ADDRESS "
                        f"points to it.") from None
                # No slower than the heartbeat: a restarted ps waits about one lease
                # for its workers to come back before it closes a round without them.
                backoff_delay = min(next(delays), self._lease / 3)
                log.info("The ps is unreachable (%s); retrying %s in %.2f s.", code.name, what, backoff_delay)
                self._closed.wait(backoff_delay)

    # Lease --------------------------------------------------------------------

    def _start_heartbeats(self) -> None:
        self._heartbeats = threading.Thread(target=self._heartbeat_loop, name="comind-heartbeat", daemon=True)
        self._heartbeats.start()

    def _heartbeat_loop(self) -> None:
        while not self._closed.wait(self._lease / 3):
            with self._lock:
                member_id = self._member_id
            try:
                if member_id is None:
                    self._membership()
                else:
                    self._stub.Heartbeat(pb.HeartbeatRequest(member_id=member_id),
                                         timeout=UNARY_TIMEOUT_SECONDS, metadata=self._metadata)
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.NOT_FOUND:
                    self._forget_membership(member_id)
                    # Re-register at once, so the ps counts this worker in the current round.
                    try:
                        self._membership()
                    except grpc.RpcError:
                        pass  # unreachable: the next beat tries again

"""The ps over gRPC: the servicer, the server, and the process's life.

Turns each call into domain calls on :class:`comind.ps.ParameterServer`,
and each :class:`comind.refusals.Refusal` into its status code through one
table, :data:`STATUSES`, so that a client can tell every kind of bad input
apart:

====================  =====================  ===========================
input                 status                 ps state
====================  =====================  ===========================
missing/wrong token   UNAUTHENTICATED        unchanged
unknown worker        NOT_FOUND              unchanged (join again)
another's member id   PERMISSION_DENIED      unchanged (mutual TLS: the id
                                             is bound to its certificate)
dtype, shape, order   INVALID_ARGUMENT       unchanged
NaN or Inf            OUT_OF_RANGE           unchanged
a figure out of its   OUT_OF_RANGE           unchanged
range (an accuracy
past 1)
truncated stream      DATA_LOSS              unchanged
oversized stream      RESOURCE_EXHAUSTED     unchanged
no model yet          FAILED_PRECONDITION    unchanged
initial model from    PERMISSION_DENIED      unchanged (before its bytes
a worker not task 0                          are read)
task index held by a  ALREADY_EXISTS         unchanged (retry once, after
live member                                  the hinted time)
too many members, or  RESOURCE_EXHAUSTED     unchanged (retry after the
registrations                                hinted time)
the ps is busy        UNAVAILABLE            unchanged (retry)
a transfer too slow   DEADLINE_EXCEEDED      unchanged (retry)
stale round           OK, receipt ``STALE``  unchanged; the newest model
                                             follows
duplicate             OK, receipt            unchanged (idempotent)
                      ``DUPLICATE``
from a worker the     OK, receipt            unchanged; the worker's next
round did not select  ``NOT_SELECTED``       model follows once selected
====================  =====================  ===========================

A worker's part in a round is one ``Round`` call: a hello (with its update's
header, if it has one), the update's bytes, a receipt, and the next global
model. While the call is open it holds the worker's lease, and the ps's
keepalive pings watch the link; the worker's renewals probe its own side of
it (``comind.client.renewal_due``).

A refusal that may succeed later carries the seconds to wait in the trailing
metadata :data:`comind.protocol.RETRY_AFTER_KEY`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any, TypeVar

import grpc
import numpy as np

from comind import async_rounds, encodings, federated_eval, modes, refusals
from comind.auth import TlsFiles, TokenInterceptor
from comind.decoding import DecodingInterceptor
from comind.proto import comind_pb2 as pb
from comind.proto import comind_pb2_grpc as pb_grpc
from comind.protocol import GRPC_OPTIONS, LONG_POLL_SECONDS, RETRY_AFTER_KEY, transfer_seconds
from comind.ps import GlobalModel, ParameterServer, UpdateHeader, UpdateKind, UpdateResult
from comind.secagg import errors as secagg_errors
from comind.tensors import Layout, LayoutError, LayoutTooLarge, chunks
from comind.transfers import Slots

log = logging.getLogger(__name__)

T = TypeVar("T")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ParameterServer"].full_name

SERVER_OPTIONS = [
    # gRPC grows each stream's flow-control window to several MB on a fast
    # link; with many workers pushing at once, those windows, not the ps's
    # own buffers, held most of its memory. A fixed 1 MiB window keeps
    # loopback transfers at full speed.
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 1 << 20),
]


def keepalive_options(lease_seconds: float) -> list[tuple[str, int]]:
    """The ps pings each connection a third of a lease after it last heard from it, and ends its calls when no
    answer comes in another third: an open Round call holds its worker's lease (``Rounds.call_open``), so over a
    dead link the call must end about as soon as renewals every third of a lease would have stopped coming."""
    third = max(100, round(lease_seconds * 1000 / 3))
    # Pings without data in between are what a waiting call is: gRPC sends only two such by default. And a ping
    # unanswered ends the connection after ping_timeout (a minute by default), whatever keepalive_timeout says.
    return [("grpc.keepalive_time_ms", third), ("grpc.keepalive_timeout_ms", third),
            ("grpc.http2.ping_timeout_ms", third), ("grpc.http2.max_pings_without_data", 0)]


def pending_call_options(member_limit: int) -> list[tuple[str, int]]:
    """Room in gRPC's queue of calls the ps has not yet taken up for two calls of every member it admits.

    The ps takes up one call at a time on its event loop; a burst arrives faster. When the long polls of thousands
    of waiting workers end together, they all call again at once, and gRPC's default queue (3,000 calls, and past
    1,000 none older than 30 s) cancelled about half of a burst of 8,000 (``tests/test_call_bursts.py``): a
    worker saw CANCELLED, or under grpc.aio, INTERNAL (grpc/grpc#36066). Queued, a call costs a few hundred bytes.
    """
    pending = max(3000, 2 * member_limit)
    return [("grpc.server.max_pending_requests", pending), ("grpc.server.max_pending_requests_hard_limit", pending)]


#: The status of each refusal.
STATUSES: dict[type[refusals.Refusal], grpc.StatusCode] = {
    refusals.UnknownMember: grpc.StatusCode.NOT_FOUND,
    refusals.ForeignCertificate: grpc.StatusCode.PERMISSION_DENIED,
    refusals.NotChief: grpc.StatusCode.PERMISSION_DENIED,
    refusals.TaskTaken: grpc.StatusCode.ALREADY_EXISTS,
    refusals.TooManyMembers: grpc.StatusCode.RESOURCE_EXHAUSTED,
    refusals.TooManyJoins: grpc.StatusCode.RESOURCE_EXHAUSTED,
    refusals.NoModelYet: grpc.StatusCode.FAILED_PRECONDITION,
    refusals.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    refusals.ModelTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    refusals.NotFinite: grpc.StatusCode.OUT_OF_RANGE,
    refusals.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    refusals.TruncatedStream: grpc.StatusCode.DATA_LOSS,
    refusals.OversizedStream: grpc.StatusCode.RESOURCE_EXHAUSTED,
    refusals.Busy: grpc.StatusCode.UNAVAILABLE,
    refusals.TooSlow: grpc.StatusCode.DEADLINE_EXCEEDED,
    refusals.NotServing: grpc.StatusCode.UNAVAILABLE,
    # Secure aggregation (comind/secagg): a message that breaks the protocol; an attempt at a round that failed.
    secagg_errors.SecAggRefusal: grpc.StatusCode.INVALID_ARGUMENT,
    secagg_errors.WrongStage: grpc.StatusCode.FAILED_PRECONDITION,
    secagg_errors.WrongRound: grpc.StatusCode.FAILED_PRECONDITION,
    secagg_errors.NotAParty: grpc.StatusCode.PERMISSION_DENIED,
    secagg_errors.KeyAdvertisedTwice: grpc.StatusCode.ALREADY_EXISTS,
    secagg_errors.DuplicateMessage: grpc.StatusCode.ALREADY_EXISTS,
    secagg_errors.MisaddressedShare: grpc.StatusCode.PERMISSION_DENIED,
    secagg_errors.ForgedShare: grpc.StatusCode.INVALID_ARGUMENT,
    secagg_errors.InvalidMessage: grpc.StatusCode.INVALID_ARGUMENT,
    secagg_errors.RoundFailed: grpc.StatusCode.ABORTED,
}

MODES = {modes.FEDERATED: pb.TRAINING_MODE_FEDERATED, modes.DISTRIBUTED: pb.TRAINING_MODE_DISTRIBUTED}
ROUNDS_MODES = {async_rounds.SYNC: pb.ROUNDS_MODE_SYNC, async_rounds.ASYNC: pb.ROUNDS_MODE_ASYNC}
_KINDS = {pb.UPDATE_KIND_DELTA: UpdateKind.DELTA, pb.UPDATE_KIND_INITIAL: UpdateKind.INITIAL}
_RESULTS = {UpdateResult.ACCEPTED: pb.UPDATE_RESULT_ACCEPTED, UpdateResult.DUPLICATE: pb.UPDATE_RESULT_DUPLICATE,
            UpdateResult.STALE: pb.UPDATE_RESULT_STALE, UpdateResult.EARLY: pb.UPDATE_RESULT_EARLY,
            UpdateResult.NOT_NEEDED: pb.UPDATE_RESULT_NOT_NEEDED,
            UpdateResult.NOT_SELECTED: pb.UPDATE_RESULT_NOT_SELECTED}


class Service(pb_grpc.ParameterServerServicer):
    def __init__(self, ps: ParameterServer, long_poll_seconds: float = LONG_POLL_SECONDS):
        self.ps = ps
        self._long_poll = long_poll_seconds
        # Few sends at once: each holds megabytes of gRPC buffers, and a model
        # goes out faster to one worker after another than to all at once.
        # (Dozens at once saved only about 5% of the ps's CPU with a thousand
        # workers of a 0.4 MB model, and let all their next updates arrive
        # together, buffered by gRPC: up to 250 MB more; bench/load.py.)
        self._sending = Slots(2, "sending")
        self._messages = ModelMessages(ps.pipeline.model_encoding)

    async def Join(self, request: pb.JoinRequest, context: grpc.aio.ServicerContext) -> pb.JoinReply:
        info = await _answer(context, self.ps.join, request.task_index, request.description, _peer(context),
                             request.instance)
        reply = pb.JoinReply(member_id=info.member_id, lease_seconds=info.lease_seconds, round=info.round,
                             total_rounds=info.total_rounds, done=info.done,
                             replicas_to_aggregate=info.replicas_to_aggregate or 0, mode=MODES[info.mode],
                             update_encoding=info.update_encoding, rounds_mode=ROUNDS_MODES[info.rounds_mode],
                             federated_eval_every=info.federated_eval_every, calls_hold_lease=True,
                             long_poll_seconds=self._long_poll)
        secure = info.secure_aggregation
        if secure is not None:
            reply.secure_aggregation.clip_range = secure.clip_range
            if secure.max_update_norm is not None:
                reply.secure_aggregation.max_update_norm = secure.max_update_norm
            if secure.noise is not None:
                reply.secure_aggregation.noise.CopyFrom(pb.SecAggNoise(
                    clip=secure.noise.clip, noise_multiplier=secure.noise.noise_multiplier,
                    expected_updates=secure.noise.expected_updates))
        return reply

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext) -> pb.HeartbeatReply:
        await _answer(context, self.ps.renew, request.member_id, _peer(context))
        return pb.HeartbeatReply(round=self.ps.round, done=self.ps.done)

    async def Leave(self, request: pb.LeaveRequest, context: grpc.aio.ServicerContext) -> pb.Empty:
        await _answer(context, self.ps.leave, request.member_id, _peer(context))
        return pb.Empty()

    async def ReportEval(self, request: pb.EvalReport, context: grpc.aio.ServicerContext) -> pb.Empty:
        await _answer(context, self.ps.report_eval, request.member_id, request.round, request.loss,
                      request.accuracy, _peer(context))
        return pb.Empty()

    async def Round(self, request_iterator: AsyncIterator[pb.WorkerMessage],
                    context: grpc.aio.ServicerContext) -> None:
        try:
            await self._round(_Requests(request_iterator), context)
        except refusals.Refusal as refusal:
            await _abort(context, refusal)

    async def _round(self, requests: _Requests, context: grpc.aio.ServicerContext) -> None:
        peer = _peer(context)
        first = await requests.next()
        if first is None or not first.HasField("hello"):
            raise refusals.InvalidRequest("A Round call must start with a hello message naming the worker.")
        if first.renewal:
            raise refusals.InvalidRequest("A hello's message carries no renewal: the hello itself renews the lease.")
        with self.ps.rounds.call_open(first.hello.member_id):
            await self._call(first, requests, context, peer)

    async def _call(self, first: pb.WorkerMessage, requests: _Requests, context: grpc.aio.ServicerContext,
                    peer: bytes | None) -> None:
        hello = first.hello
        unread = False  # whether the update's bytes are still coming, unread
        if hello.HasField("secagg_keys"):
            await self._secure_round(first, requests, context, peer)
            return
        if hello.HasField("update"):
            try:
                header = self._header(hello.update)
            except refusals.Refusal as refusal:
                self.ps.refused_update(refusal)
                raise
            result = await self.ps.receive(hello.member_id, header, _data(first, requests), peer)
            # At once: a worker stops sending what the ps will not read. (Joining an accepted update's receipt to
            # the model's first message would save a write, but copy the model's bytes for every worker.)
            await context.write(pb.PsMessage(receipt=pb.Receipt(round=header.round, result=_RESULTS[result]))
                                .SerializeToString())
            unread = result is not UpdateResult.ACCEPTED
        else:
            if first.data or first.end:
                raise refusals.InvalidRequest("A hello without an update carries no bytes.")
            self.ps.renew(hello.member_id, peer)
        # From here to the call's end, the worker's renewals keep its lease: while the round is open, and while
        # a large model goes down a slow link.
        renewals = asyncio.ensure_future(self._renewals(requests, hello.member_id, peer, unread))
        try:
            await self._answer(hello, renewals, context)
        finally:
            renewals.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewals

    async def _secure_round(self, first: pb.WorkerMessage, requests: _Requests, context: grpc.aio.ServicerContext,
                            peer: bytes | None) -> None:
        """A Round call under secure aggregation (``secure_calls.py``): its stages, its receipt, its model."""
        from comind import secure_calls  # with the secagg extra only

        hello = first.hello
        if not hello.HasField("update") or first.data or first.end:
            raise refusals.InvalidRequest("A hello with secure aggregation's keys carries an update's header, and its "
                                          "masked bytes come only after the ps's inbox.")
        header = self._header(hello.update)
        result, renewals = await secure_calls.exchange(self.ps, hello, header, requests.next, context, peer)
        try:
            await context.write(pb.PsMessage(receipt=pb.Receipt(round=header.round, result=_RESULTS[result]))
                                .SerializeToString())
            await self._answer(hello, renewals, context)
        finally:
            renewals.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewals

    async def _answer(self, hello: pb.Hello, renewals: asyncio.Future[None],
                      context: grpc.aio.ServicerContext) -> None:
        """Sends the worker's next model, or "not yet" after a long poll; a refusal in ``renewals`` ends it."""
        remaining = context.time_remaining()
        model_bytes = self.ps.model.layout.nbytes if self.ps.model else 0
        wait = self._long_poll if remaining is None else \
            max(0.0, min(self._long_poll, remaining - transfer_seconds(model_bytes)))
        model = await _unless_refused(renewals, self.ps.next_model(hello.member_id, hello.have_round, wait))
        if model is None:
            await context.write(not_ready(self.ps.round))
            return
        async with self._sending.hold(model.layout.nbytes) as deadline:
            async with asyncio.timeout_at(deadline):
                for message, nbytes in self._messages.of(model):
                    _raise_if_refused(renewals)
                    await context.write(message)
                    self.ps.count_sent(nbytes)

    def _header(self, message: pb.UpdateHeader) -> UpdateHeader:
        kind = _KINDS.get(message.kind)
        if kind is None:
            raise refusals.InvalidRequest(f"An update must be a delta or an initial model. Received: "
                                          f"kind={message.kind}")
        try:
            layout = Layout.from_proto(message.tensors, self.ps.max_model_bytes)
        except LayoutTooLarge as error:
            raise refusals.ModelTooLarge(str(error)) from None
        except LayoutError as error:
            raise refusals.InvalidRequest(str(error)) from None
        report = message.federated_eval
        return UpdateHeader(kind, message.round, layout, message.num_examples, message.loss, message.accuracy,
                            message.encoding or encodings.FLOAT32, message.update_id,
                            federated_eval.from_proto(report) if message.HasField("federated_eval") else None)

    async def _renewals(self, requests: _Requests, member_id: str, peer: bytes | None, unread: bool) -> None:
        while (message := await requests.next()) is not None:
            if message.HasField("hello"):
                raise refusals.InvalidRequest("A Round call carries one hello. Received: a second one")
            if unread and not message.renewal:
                continue  # the rest of an update the ps did not need, sent before its receipt arrived
            if not message.renewal or message.data or message.end:
                raise refusals.InvalidRequest("After the hello and the update's bytes, a Round call carries only "
                                              "renewals. Received: more bytes")
            self.ps.renew(member_id, peer)


async def _unless_refused(renewals: asyncio.Future[None], work: Awaitable[T]) -> T:
    """Awaits ``work``, unless ``renewals`` fails first (the worker's lease ended meanwhile): then raises that."""
    task = asyncio.ensure_future(work)
    either: set[asyncio.Future[Any]] = {renewals, task}
    try:
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        _raise_if_refused(renewals)
        return await task
    finally:
        task.cancel()


def _raise_if_refused(renewals: asyncio.Future[None]) -> None:
    """Raises the refusal that ended ``renewals``, if one did; a normal end (the worker half-closed) is fine."""
    if renewals.done() and not renewals.cancelled():
        renewals.result()


class _Requests:
    """A Round call's incoming messages, read one at a time."""

    def __init__(self, iterator: AsyncIterator[pb.WorkerMessage]):
        self._iterator = aiter(iterator)

    async def next(self) -> pb.WorkerMessage | None:
        return await anext(self._iterator, None)


async def _data(first: pb.WorkerMessage, requests: _Requests) -> AsyncIterator[bytes]:
    """An update's bytes: in the hello's message and those after it, up to the one that says ``end``.

    The ps compares their count with its header's before it takes the update
    (too few: truncated; too many: oversized); a call that ends before the
    end is truncated.
    """
    message: pb.WorkerMessage | None = first
    while message is not None:
        if message is not first and (message.HasField("hello") or message.renewal):
            what = "hello" if message.HasField("hello") else "renewal"
            raise refusals.InvalidRequest(f"An update's bytes must follow its hello, up to a message that says end, "
                                          f"before anything else. Received: a {what}")
        if message.data:
            yield message.data
        if message.end:
            return
        message = await requests.next()


class ModelMessages:
    """The messages that carry the newest global model down, serialized.

    A thousand workers receive the same model in a round: serializing its
    messages once, not once per call, saves two copies of the model per
    worker (slicing it into bytes, then serializing those), and the
    allocations that go with them. The server writes these bytes as they are
    (Round has no response serializer).
    """

    #: Models up to this size are serialized once per round; a larger one,
    #: chunk by chunk for each call, so that the ps never holds a second copy of it
    #: (but for its encoded bytes, when it goes down encoded).
    SHARED_MAX_BYTES = 64 << 20

    def __init__(self, encoding: encodings.Encoding | None = None) -> None:
        self._encoding = encoding or encodings.Float32()
        self._model: GlobalModel | None = None
        self._encoded: np.ndarray | None = None
        self._messages: list[tuple[bytes, int]] = []
        self._rng = np.random.default_rng()

    def of(self, model: GlobalModel) -> Iterable[tuple[bytes, int]]:
        """Each message of ``model``, serialized, with the (encoded) model bytes it carries."""
        if model is not self._model or self._encoded is None:
            self._model, self._messages = model, []
            self._encoded = self._encoding.encode(model.layout, model.packed, self._rng)
        if model.layout.nbytes > self.SHARED_MAX_BYTES:
            return _serialize(model, self._encoded, self._encoding)
        if not self._messages:
            self._messages = list(_serialize(model, self._encoded, self._encoding))
        return self._messages


def not_ready(round: int) -> bytes:
    """The last message of a call that waited a whole long poll for a newer model."""
    return pb.PsMessage(model=pb.ModelHeader(ready=False, round=round)).SerializeToString()


def _serialize(model: GlobalModel, encoded: np.ndarray, encoding: encodings.Encoding) -> Iterator[tuple[bytes, int]]:
    """The header with the first chunk, then the other chunks: a model of one chunk is one message."""
    header = pb.ModelHeader(ready=True, round=model.round, done=model.done, total_rounds=model.total_rounds,
                            tensors=model.layout.to_proto(), train_loss=model.train_loss,
                            train_accuracy=model.train_accuracy, encoding="" if encoding.identity else encoding.name)
    if not math.isnan(model.epsilon):
        header.epsilon = model.epsilon
    if not math.isnan(model.server_learning_rate):
        header.server_learning_rate = model.server_learning_rate
    if model.federated_eval is not None:
        header.federated_eval.round = model.federated_eval.round
        for task, report in model.federated_eval.workers.items():
            header.federated_eval.workers[task].CopyFrom(federated_eval.to_proto(report))
    parts = chunks(encoded)
    first = next(parts, b"")
    yield pb.PsMessage(model=header, data=first).SerializeToString(), len(first)
    for data in parts:
        yield pb.PsMessage(data=data).SerializeToString(), len(data)


def _peer(context: grpc.aio.ServicerContext) -> bytes | None:
    """The fingerprint of the caller's client certificate under mutual TLS; None otherwise."""
    certificate = next(iter(context.auth_context().get("x509_pem_cert") or ()), None)
    return hashlib.sha256(certificate).digest() if certificate else None


async def _answer(context: grpc.aio.ServicerContext, function: Callable[..., T], *args: Any) -> T:
    try:
        return function(*args)
    except refusals.Refusal as refusal:
        await _abort(context, refusal)
        raise  # abort raises; this line is for the type checker


async def _abort(context: grpc.aio.ServicerContext, refusal: refusals.Refusal) -> None:
    """Ends the call with the refusal's status and message, and its retry hint, if it has one."""
    hint = () if refusal.retry_after is None else ((RETRY_AFTER_KEY, f"{refusal.retry_after:.3f}"),)
    await context.abort(STATUSES[type(refusal)], refusal.message, hint)


class _Registrations:
    """Stands in for a server to collect the method handlers that the generated code registers."""

    handlers: dict[str, grpc.RpcMethodHandler]

    def add_generic_rpc_handlers(self, generic_handlers: object) -> None:
        pass  # the same handlers as below, looked up by name

    def add_registered_method_handlers(self, service_name: str, handlers: dict) -> None:
        self.handlers = dict(handlers)


def _method_handlers(service: Service) -> dict[str, grpc.RpcMethodHandler]:
    """The generated handlers, except that Round writes bytes serialized in advance
    (:class:`ModelMessages`): without a serializer, gRPC sends them as they are."""
    registrations = _Registrations()
    pb_grpc.add_ParameterServerServicer_to_server(service, registrations)
    round = registrations.handlers["Round"]
    assert round.stream_stream is not None
    registrations.handlers["Round"] = grpc.stream_stream_rpc_method_handler(
        round.stream_stream, request_deserializer=round.request_deserializer)
    return registrations.handlers


def build_server(ps: ParameterServer, listen: str, token: str | None, tls: TlsFiles = TlsFiles(),
                 long_poll_seconds: float = LONG_POLL_SECONDS) -> tuple[grpc.aio.Server, int]:
    """A gRPC server for ``ps`` bound to ``listen``; returns it and the bound port."""
    # The token is checked first: garbage from a stranger is UNAUTHENTICATED.
    interceptors: list[grpc.aio.ServerInterceptor] = \
        [TokenInterceptor(token, on_failure=ps.metrics.auth_failures.inc)] if token else []
    interceptors.append(DecodingInterceptor())
    server = grpc.aio.server(interceptors=interceptors, options=GRPC_OPTIONS + SERVER_OPTIONS +
                             keepalive_options(ps.rounds.policy.lease_seconds) +
                             pending_call_options(ps.rounds.policy.member_limit))
    handlers = _method_handlers(Service(ps, long_poll_seconds))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
    try:
        if tls.enabled:
            port = server.add_secure_port(listen, tls.server_credentials())
        else:
            port = server.add_insecure_port(listen)
    except RuntimeError as error:
        raise ValueError(f"Cannot listen on {listen!r} ({error}): the port may be in use or the address "
                         f"malformed; set COMIND_LISTEN to a free host:port. Received: listen={listen!r}") from None
    return server, port


async def run(ps: ParameterServer, server: grpc.aio.Server, exit_grace_seconds: float, serve: bool = False) -> int:
    """Serves until training is done and the workers left (or a grace period passed), or SIGTERM; with
    ``serve``, until SIGTERM alone. A ps resumed from a final checkpoint is done at once, and waits the grace
    period for the workers that come for the final model.

    Returns the exit status: 1 if a checkpoint could not be written, else 0.
    """
    await server.start()
    timers = asyncio.create_task(ps.run_timers())  # never ends: it logs and survives its own errors
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    stopped = asyncio.create_task(stop.wait())
    finished = asyncio.create_task(ps.finished.wait())
    done = asyncio.create_task(ps.training_done.wait())
    failed = asyncio.create_task(ps.failed.wait())
    await asyncio.wait({stopped, failed} if serve else {stopped, done, failed}, return_when=asyncio.FIRST_COMPLETED)
    if ps.failed.is_set():
        pass  # already said why
    elif not stop.is_set():
        await asyncio.wait({stopped, finished}, timeout=exit_grace_seconds, return_when=asyncio.FIRST_COMPLETED)
        if not finished.done() and ps.rounds.members:
            log.warning("%d workers had not left %.0f s after training ended; exiting anyway.",
                        len(ps.rounds.members), exit_grace_seconds)
    else:
        log.info("Stopping on a signal at round %d.", ps.rounds.round)
    await ps.drain()  # a checkpoint being written lands before the process ends
    await server.stop(grace=1.0)
    for task in (timers, stopped, finished, done, failed):
        task.cancel()
    log.info("The ps stopped at round %d.", ps.rounds.round)
    return 1 if ps.failed.is_set() else 0

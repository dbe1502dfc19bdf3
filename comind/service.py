"""The ps over gRPC: the servicer, the server, and the process's life.

Maps each RPC onto :class:`comind.ps.ParameterServer` and each
:class:`comind.ps.Refusal` onto its status code, so that a client can tell
every kind of bad input apart:

===================  =====================  ===========================
input                status                 ps state
===================  =====================  ===========================
missing/wrong token  UNAUTHENTICATED        unchanged
unknown worker       NOT_FOUND              unchanged (register again)
another's member id  PERMISSION_DENIED      unchanged (mutual TLS: the id
                                            is bound to its certificate)
dtype or shape       INVALID_ARGUMENT       unchanged
NaN or Inf           OUT_OF_RANGE           unchanged
stale round          ABORTED                unchanged (pull and go on)
duplicate            OK, ``duplicate=true`` unchanged (idempotent)
truncated stream     DATA_LOSS              unchanged
oversized stream     RESOURCE_EXHAUSTED     unchanged
===================  =====================  ===========================
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import signal

import grpc
import numpy as np

from comind.auth import TlsFiles, TokenInterceptor
from comind.decoding import DecodingInterceptor
from comind.proto import comind_pb2 as pb
from comind.proto import comind_pb2_grpc as pb_grpc
from comind.protocol import GRPC_OPTIONS, LONG_POLL_SECONDS
from comind.ps import ParameterServer, Refusal
from comind.transfers import BufferPool, ModelMessages, Slots, not_ready
from comind.tensors import Assembler, Layout, NonFiniteValues, OversizedStream, TruncatedStream

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ParameterServer"].full_name

SERVER_OPTIONS = [
    # gRPC grows each stream's flow-control window to several MB on a fast
    # link; with many workers pushing at once, those windows, not the ps's
    # own buffers, held most of its memory. A fixed 1 MiB window keeps
    # loopback transfers at full speed.
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 1 << 20),
]


class Service(pb_grpc.ParameterServerServicer):
    def __init__(self, ps: ParameterServer, max_concurrent_updates: int = 2):
        self.ps = ps
        self._receiving = Slots(max_concurrent_updates, "receiving")
        # Few sends at once: each holds megabytes of gRPC buffers, and a model
        # goes out faster to one worker after another than to all at once.
        # (Dozens at once saved only about 5% of the ps's CPU with a thousand
        # workers of a 0.4 MB model, and let all their next updates arrive
        # together, buffered by gRPC: up to 250 MB more; bench/load.py.)
        self._sending = Slots(2, "sending")
        self._messages = ModelMessages()
        self._buffers = BufferPool(max_concurrent_updates)

    async def Register(self, request, context):
        return self.ps.register(request.task_index, request.description, _peer(context))

    async def Heartbeat(self, request, context):
        return await _answer(context, self.ps.heartbeat, request.member_id, _peer(context))

    async def Leave(self, request, context):
        await _answer(context, self.ps.leave, request.member_id, _peer(context))
        return pb.Empty()

    async def ReportEval(self, request, context):
        await _answer(context, self.ps.report_eval, request.member_id, request.round, request.loss,
                      request.accuracy, _peer(context))
        return pb.Empty()

    async def Initialize(self, request_iterator, context):
        try:
            header = await _read_header(request_iterator)
            layout = self.ps.layout_of(header.tensors)
            if not self.ps.check_initialize(header.member_id, layout, _peer(context)):
                return pb.InitializeReply(accepted=False, round=self.ps.rounds.round)
            async with self._receiving.hold(layout.nbytes) as deadline:
                async with asyncio.timeout_at(deadline):
                    # A buffer of its own: the initial model becomes the global model.
                    packed = await self._receive(request_iterator, layout, np.empty(layout.nbytes, np.uint8))
                return await self.ps.initialize(layout, packed)
        except Refusal as refusal:
            await context.abort(refusal.code, refusal.message)

    async def PushUpdate(self, request_iterator, context):
        try:
            header = await _read_header(request_iterator)
            ticket = self.ps.open_update(header, _peer(context))
            if ticket is None:
                reply = pb.PushReply(round=header.round, duplicate=True)
            else:
                async with self._receiving.hold(ticket.layout.nbytes) as deadline:
                    buffer = self._buffers.take(ticket.layout.nbytes)
                    try:
                        async with asyncio.timeout_at(deadline):
                            packed = await self._receive(request_iterator, ticket.layout, buffer)
                        reply = await self.ps.commit_update(ticket, packed)
                    finally:
                        self._buffers.give_back(buffer)
            self.ps.metrics.updates.labels("duplicate" if reply.duplicate else "accepted").inc()
        except Refusal as refusal:
            self.ps.metrics.updates.labels(refusal.result).inc()
            log.warning("Refused an update: %s", refusal.message)
            await context.abort(refusal.code, refusal.message)
        await self.ps.maybe_close()
        return reply

    async def PullModel(self, request, context):
        try:
            if request.member_id:
                self.ps.heartbeat(request.member_id, _peer(context))
            remaining = context.time_remaining()
            wait = LONG_POLL_SECONDS if remaining is None else max(0.0, min(LONG_POLL_SECONDS, remaining - 1.0))
            model = await self.ps.next_model(request.after_round, wait)
            if model is None:
                await context.write(not_ready(self.ps.rounds.round))
                return
            async with self._sending.hold(model.layout.nbytes) as deadline:
                async with asyncio.timeout_at(deadline):
                    sent = self.ps.metrics.update_bytes.labels("sent")
                    for message, nbytes in self._messages.of(model):
                        await context.write(message)
                        sent.inc(nbytes)
        except Refusal as refusal:
            await context.abort(refusal.code, refusal.message)

    async def _receive(self, request_iterator, layout: Layout, buffer: np.ndarray) -> np.ndarray:
        assembler = Assembler(layout, check_finite=True, buffer=buffer)
        try:
            async for message in request_iterator:
                if message.WhichOneof("part") != "data":
                    raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                                  "Only the first message of a stream may be a header; the rest carry data.")
                assembler.feed(message.data)
            return assembler.finish()
        except TruncatedStream as error:
            raise Refusal(grpc.StatusCode.DATA_LOSS, f"Truncated model: the {error}.") from None
        except OversizedStream as error:
            raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, f"Oversized model: the {error}.") from None
        except NonFiniteValues as error:
            raise Refusal(grpc.StatusCode.OUT_OF_RANGE,
                          f"The model is not finite: {error}. Training diverged; lower the learning "
                          f"rate or clip gradients.") from None
        finally:
            self.ps.metrics.update_bytes.labels("received").inc(assembler.received)


async def _read_header(request_iterator) -> pb.UpdateHeader:
    first = await anext(aiter(request_iterator), None)
    if first is None or first.WhichOneof("part") != "header":
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                      "A model stream must start with a header message naming its tensors.")
    return first.header


def _peer(context) -> bytes | None:
    """The fingerprint of the caller's client certificate under mutual TLS; None otherwise."""
    certificates = context.auth_context().get("x509_pem_cert")
    return hashlib.sha256(certificates[0]).digest() if certificates else None


async def _answer(context, function, *args):
    try:
        return function(*args)
    except Refusal as refusal:
        await context.abort(refusal.code, refusal.message)


class _Registrations:
    """Stands in for a server to collect the method handlers that the generated code registers."""

    handlers: dict[str, grpc.RpcMethodHandler]

    def add_generic_rpc_handlers(self, generic_handlers) -> None:
        pass  # the same handlers as below, looked up by name

    def add_registered_method_handlers(self, service_name: str, handlers: dict) -> None:
        self.handlers = dict(handlers)


def _method_handlers(service: Service) -> dict[str, grpc.RpcMethodHandler]:
    """The generated handlers, except that PullModel writes bytes serialized in advance
    (:class:`comind.transfers.ModelMessages`): without a serializer, gRPC sends them as they are."""
    registrations = _Registrations()
    pb_grpc.add_ParameterServerServicer_to_server(service, registrations)
    pull = registrations.handlers["PullModel"]
    registrations.handlers["PullModel"] = grpc.unary_stream_rpc_method_handler(
        pull.unary_stream, request_deserializer=pull.request_deserializer)
    return registrations.handlers


def build_server(ps: ParameterServer, listen: str, token: str | None, tls: TlsFiles,
                 max_concurrent_updates: int = 2) -> tuple[grpc.aio.Server, int]:
    """A gRPC server for ``ps`` bound to ``listen``; returns it and the bound port."""
    # The token is checked first: garbage from a stranger is UNAUTHENTICATED.
    interceptors = [TokenInterceptor(token, on_failure=ps.metrics.auth_failures.inc)] if token else []
    interceptors.append(DecodingInterceptor())
    server = grpc.aio.server(interceptors=interceptors, options=GRPC_OPTIONS + SERVER_OPTIONS)
    handlers = _method_handlers(Service(ps, max_concurrent_updates))
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


async def run(ps: ParameterServer, server: grpc.aio.Server, exit_grace_seconds: float) -> int:
    """Serves until training is done and the workers left (or a grace period passed), or SIGTERM.

    Returns the exit status: 1 if a checkpoint could not be written, else 0.
    """
    await server.start()
    timers = asyncio.create_task(ps.run_timers())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    stopped = asyncio.create_task(stop.wait())
    finished = asyncio.create_task(ps.finished.wait())
    done = asyncio.create_task(ps.training_done.wait())
    failed = asyncio.create_task(ps.failed.wait())
    await asyncio.wait({stopped, done, failed}, return_when=asyncio.FIRST_COMPLETED)
    if ps.failed.is_set():
        pass  # already said why
    elif not stop.is_set():
        await asyncio.wait({stopped, finished}, timeout=exit_grace_seconds, return_when=asyncio.FIRST_COMPLETED)
        if not finished.done():
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

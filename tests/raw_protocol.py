"""A test client that speaks the raw protocol, so that it can send what ``WorkerClient`` never would.

One ``Round`` call is a list of :class:`comind.proto.comind_pb2.WorkerMessage`:
a hello (with an update's header, if any), the update's bytes, the last of
them marked ``end``, perhaps renewals. :func:`update_messages` builds the
usual ones, the hello in a message of its own (``WorkerClient`` puts the
first bytes with it); the tests change them to make bad input.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import grpc
import numpy as np

from comind.auth import call_metadata
from comind.proto import comind_pb2 as pb
from comind.proto import comind_pb2_grpc as pb_grpc
from comind.tensors import Layout, chunks


@dataclasses.dataclass
class Reply:
    """The ps's side of a Round call."""

    receipt: pb.Receipt | None
    header: pb.ModelHeader | None
    data: bytes

    def weights(self) -> list[np.ndarray]:
        assert self.header is not None and self.header.ready
        return Layout.from_proto(self.header.tensors, max_bytes=1 << 40).views(self.data)


RENEWAL = pb.WorkerMessage(renewal=True)


def update_header(arrays: Sequence[np.ndarray], round: int = 1, *, kind: int = pb.UPDATE_KIND_DELTA,
                  examples: int = 10, loss: float = 0.5, accuracy: float = 0.5,
                  names: Sequence[str] | None = None, update_id: bytes = b"") -> pb.UpdateHeader:
    return pb.UpdateHeader(kind=kind, round=round, num_examples=examples, loss=loss, accuracy=accuracy,
                           tensors=Layout.of(arrays, names).to_proto(), update_id=update_id)


def data_messages(arrays: Sequence[np.ndarray]) -> list[pb.WorkerMessage]:
    """An update's bytes, the last message saying end."""
    messages = [pb.WorkerMessage(data=c) for c in chunks(Layout.of(arrays).pack(arrays))] or [pb.WorkerMessage()]
    messages[-1].end = True
    return messages


def update_messages(member: str, arrays: Sequence[np.ndarray], round: int = 1, *, have_round: int | None = None,
                    **header: object) -> list[pb.WorkerMessage]:
    """A hello carrying an update of ``arrays`` (a change, unless ``kind`` says otherwise), its bytes and their
    end."""
    hello = pb.Hello(member_id=member, have_round=round - 1 if have_round is None else have_round,
                     update=update_header(arrays, round, **header))  # type: ignore[arg-type]
    return [pb.WorkerMessage(hello=hello), *data_messages(arrays)]


class RawClient:
    def __init__(self, address: str, token: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None):
        self.channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
        self.stub = pb_grpc.ParameterServerStub(self.channel)
        self.metadata = call_metadata(token)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def join(self, task: int = 0, description: str = "", instance: str = "") -> str:
        """A member id for ``task``; the same ``instance`` gets the same one back while its lease lasts."""
        request = pb.JoinRequest(task_index=task, description=description, instance=instance)
        return self.stub.Join(request, metadata=self.metadata, timeout=10).member_id

    def call(self, messages: Iterable[pb.WorkerMessage], *, wait_for_model: bool = True,
             timeout: float = 10, metadata: tuple[tuple[str, str], ...] | None = None) -> Reply:
        """One Round call; without ``wait_for_model``, it ends as soon as the receipt is in.

        ``messages`` may be a generator, to send them over time.
        """
        responses = self.stub.Round(iter(messages), timeout=timeout,
                                    metadata=self.metadata if metadata is None else metadata)
        reply = Reply(None, None, b"")
        parts = []
        for message in responses:
            if message.HasField("receipt"):
                reply.receipt = message.receipt
                if not wait_for_model:
                    responses.cancel()
                    break
            if message.HasField("model"):
                reply.header = message.model
            parts.append(message.data)
        reply.data = b"".join(parts)
        return reply

    def initialize(self, member: str, arrays: Sequence[np.ndarray], names: Sequence[str] | None = None) -> Reply:
        return self.call(update_messages(member, arrays, 0, have_round=-1, kind=pb.UPDATE_KIND_INITIAL,
                                         names=names))

    def send(self, member: str, arrays: Sequence[np.ndarray], round: int = 1, **header: object) -> Reply:
        """An update, waiting only for its receipt."""
        return self.call(update_messages(member, arrays, round, **header), wait_for_model=False)

    def model(self, member: str, have_round: int = -1, timeout: float = 10) -> Reply:
        """The ps's model for a worker that holds ``have_round`` (-1: the current one, at once)."""
        return self.call([pb.WorkerMessage(hello=pb.Hello(member_id=member, have_round=have_round))],
                         timeout=timeout)

    def heartbeat(self, member: str) -> pb.HeartbeatReply:
        return self.stub.Heartbeat(pb.HeartbeatRequest(member_id=member), metadata=self.metadata, timeout=10)

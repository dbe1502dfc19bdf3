"""A worker's part in secure aggregation's stages (:mod:`comind.secagg`), within its Round call: its update,
clipped (and, with worker-level differential privacy, noised: :class:`comind.privacy.DistributedNoise`) and
encoded in fixed point, goes up masked; the ps learns only the round's sum."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator

import numpy as np

from comind.errors import ProtocolError
from comind.privacy import DistributedNoise
from comind.proto import comind_pb2 as pb
from comind.robust import clip_update
from comind.secagg import fixed_point
from comind.secagg import wire as secagg_wire
from comind.secagg.client import SecAggClient
from comind.secagg.errors import SecAggRefusal, TooFewSurvivors
from comind.tensors import Layout, chunks

log = logging.getLogger(__name__)

#: A secure round's call waits, beyond a plain one's, for the other parties at each stage: the ps's round
#: deadline bounds that wait; this bounds the call should the ps say nothing at all.
STAGES_SECONDS = 3600.0


@dataclasses.dataclass(frozen=True)
class SecureParameters:
    """What the ps said at join: the encoding's range, the norm bound each worker applies before masking, and the
    DP clip and noise it adds before masking."""

    clip_range: float
    max_update_norm: float | None = None
    noise: DistributedNoise | None = None

    @classmethod
    def of(cls, message: pb.JoinReply) -> SecureParameters | None:
        if not message.HasField("secure_aggregation"):
            return None
        parameters = message.secure_aggregation
        if not parameters.clip_range > 0:
            raise ProtocolError(f"The ps announced secure aggregation with a clipping range of "
                                f"{parameters.clip_range}; it must be positive.")
        norm = parameters.max_update_norm if parameters.HasField("max_update_norm") else None
        noise = None
        if parameters.HasField("noise"):
            sent = parameters.noise
            if not (sent.clip > 0 and sent.expected_updates > 0 and sent.noise_multiplier >= 0):
                raise ProtocolError(f"The ps announced differential privacy's noise with clip {sent.clip}, noise "
                                    f"multiplier {sent.noise_multiplier} and {sent.expected_updates} expected "
                                    f"updates; the clip and the count must be positive, the multiplier not negative.")
            noise = DistributedNoise(sent.noise_multiplier, sent.clip, sent.expected_updates)
        return cls(parameters.clip_range, norm, noise)


class SecureExchange:
    """One Round call's part in the stages: keys in the hello, then an answer to each of the ps's stage messages.

    Args:
        party: this worker's task index.
        round: the round its update is for.
        layout: the model's.
        change: the update, packed (not changed).
        parameters: the ps's.
        send: puts a message on the call's way up.

    Raises:
        RangeExceeded: a value of the update (clipped, if the ps said to) is outside the clipping range.
    """

    def __init__(self, party: int, round: int, layout: Layout, change: np.ndarray, parameters: SecureParameters,
                 send: Callable[[pb.WorkerMessage], None]):
        values = fixed_point.float_values(layout, change)
        if parameters.max_update_norm is not None:
            norm = clip_update([values], parameters.max_update_norm)
            if norm > parameters.max_update_norm:
                log.info("Clipped this worker's update for round %d from norm %.4g to %g before masking.", round,
                         norm, parameters.max_update_norm)
        if parameters.noise is not None:
            # Before the encoding, which rounds the noise's float values; and from the kernel's CSPRNG.
            norm = parameters.noise.noise(values)
            log.debug("Clipped this worker's update for round %d from norm %.4g to %g and added its noise share "
                      "(std %.4g) before masking.", round, norm, parameters.noise.clip, parameters.noise.share_std)
        fixed_point.check_range(values, parameters.clip_range)
        self._values = values
        self._parameters = parameters
        self._send = send
        self._client = SecAggClient(round, party)
        self.keys = secagg_wire.keys_to_proto(self._client.advertise())

    def answer(self, messages: Iterator[pb.PsMessage]) -> Iterator[pb.PsMessage]:
        """``messages`` without the stage messages, each answered on the way."""
        self._client.draw_self_mask(self._values.size)  # while the ps waits for the round's other parties
        for message in messages:
            try:
                if message.HasField("secagg_roster"):
                    roster = secagg_wire.roster(message.secagg_roster)
                    shares = self._client.share_keys(roster)
                    self._send(pb.WorkerMessage(secagg_shares=secagg_wire.shares_to_proto(shares)))
                    # The masks need only the roster: drawn while the other parties share keys, not once their
                    # shares are in, they are off the round's critical path.
                    self._client.premask(fixed_point.encode(self._values, self._parameters.clip_range,
                                                            len(roster.keys), np.random.default_rng()))
                elif message.HasField("secagg_inbox"):
                    self._masked_input(message.secagg_inbox)
                elif message.HasField("secagg_unmask"):
                    reply = self._client.unmask(secagg_wire.unmask_request(message.secagg_unmask))
                    self._send(pb.WorkerMessage(secagg_reveal=secagg_wire.reveal_to_proto(reply)))
                else:
                    yield message
            except (SecAggRefusal, TooFewSurvivors) as error:
                raise ProtocolError(f"The ps's secure-aggregation message breaks the protocol: {error}") from None

    def _masked_input(self, inbox: pb.SecAggShares) -> None:
        masked = self._client.mask(secagg_wire.shares(inbox))
        for data in chunks(masked.view(np.uint8)):
            self._send(pb.WorkerMessage(data=data))
        self._send(pb.WorkerMessage(end=True))

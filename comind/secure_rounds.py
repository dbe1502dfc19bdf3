"""The ps's side of secure aggregation (:mod:`comind.secagg`): one run of the protocol for each attempt at a round,
over the Round calls of its parties (ARCHITECTURE.md, decisions 12 and 13).

A worker's keys come with its update's header, and count as its update in the round's bookkeeping
(``rounds.py``): the round's rules say, as for plain updates, when its parties are in (every live or selected
worker, or its deadline). Then the first stage closes and every party gets the roster; each later stage closes
once every party still in it has sent its part, or its call ended (a dropout), or the round's deadline passed.
The last stage unmasks the sum, and the round closes with the survivors' mean (:class:`SecureSum`).

A stage left with fewer parties than the threshold fails the attempt: its calls end with
:class:`~comind.secagg.errors.RoundFailed`, the previous model stands, nothing of the attempt is published or
persisted, and the round starts again, with new keys. A restarted ps starts the round again too: an attempt
lives in memory only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from comind import federated_eval, refusals
from comind.ps import OFFLOAD_BYTES
from comind.secagg import fixed_point
from comind.secagg.config import SecAggSettings
from comind.secagg.errors import RoundFailed, SecAggRefusal, TooFewSurvivors
from comind.secagg.messages import Advertisement, Roster, SealedShare, UnmaskReply, UnmaskRequest
from comind.secagg.server import SecAggServer
from comind.secagg.stages import Stage
from comind.tensors import Layout

if TYPE_CHECKING:
    from comind.metrics import PsMetrics
    from comind.rounds import Rounds

log = logging.getLogger(__name__)


def check_floating(layout: Layout) -> None:
    """Refuses a model with tensors that are not floating point: their values are not changes, and cannot be
    summed in fixed point."""
    others = [spec.describe() for spec in layout.specs if spec.dtype.kind != "f"]
    if others:
        raise refusals.InvalidRequest(f"Secure aggregation sums floating-point tensors only, and this model has "
                                      f"others: {', '.join(others[:3])}. Train without COMIND_SECURE_AGGREGATION, or "
                                      f"keep counters out of the model's weights.")


class SecureSum:
    """The aggregator stage under secure aggregation: the survivors' unmasked sum, as their mean (every update
    counts once). The ps never adds an update itself: there is none in the clear to add.

    Args:
        layout: the model's.
        total: the unmasked sum of the survivors' encodings, in the ring.
        survivors: how many inputs it sums.
        num_parties: the roster's size, which set the encoding's scale.
        settings: the encoding's range; with distributed DP noise, m, the fixed denominator the sum is divided
            by instead of the survivors (``privacy.py``).
    """

    def __init__(self, layout: Layout, total: np.ndarray, survivors: int, num_parties: int,
                 settings: SecAggSettings):
        self.layout = layout
        self._total = total
        self._parties = num_parties
        self._clip_range = settings.clip_range
        self._denominator = settings.noise.expected_updates if settings.noise else survivors
        self.count = survivors

    def add(self, update: Sequence[np.ndarray], weight: float) -> None:
        raise TypeError("Under secure aggregation the ps never holds an update in the clear: nothing to add.")

    def result(self) -> np.ndarray:
        mean = fixed_point.decode_sum(self._total, self._clip_range, self._parties) / self._denominator
        packed = np.empty(self.layout.nbytes, np.uint8)
        start = 0
        for view in self.layout.views(packed):
            np.copyto(view, mean[start:start + view.size].reshape(view.shape), casting="same_kind")
            start += view.size
        return packed


@dataclasses.dataclass(frozen=True)
class Contribution:
    """What a party's update header says in the clear: its training figures, for the round's log line, and its
    test of the global model when the ps asked for one (checked already), for the round's federated evaluation."""

    num_examples: int
    loss: float
    accuracy: float
    evaluation: federated_eval.Report | None = None


class Attempt:
    """One run of the protocol for a round: the server's state, and the calls of its parties waiting on its stages."""

    def __init__(self, round: int, layout: Layout, settings: SecAggSettings):
        self.round = round
        self.layout = layout
        self.settings = settings
        self.server = SecAggServer(round, None, settings, fixed_point.float_size(layout))
        self.contributions: dict[int, Contribution] = {}
        self.gone: set[int] = set()  # parties whose call ended before their part
        self.failure: str | None = None
        self.inboxes: dict[int, list[SealedShare]] = {}
        self.result: SecureSum | None = None
        self.unmasking = False  # the sum is being unmasked, in a thread
        self._reached = {stage: asyncio.Event() for stage in Stage}
        self._reached[Stage.ADVERTISE].set()

    @property
    def stage(self) -> Stage:
        return self.server.stage

    @property
    def over(self) -> bool:
        return self.failure is not None or self.result is not None

    async def reached(self, stage: Stage) -> None:
        """Waits for the protocol to reach ``stage``. Raises RoundFailed if the attempt failed first."""
        await self._reached[stage].wait()
        if self.failure is not None:
            raise RoundFailed(self.failure)

    def roster(self) -> Roster:
        assert self.server.roster is not None
        return self.server.roster

    def request(self) -> UnmaskRequest:
        assert self.server.request is not None
        return self.server.request

    def moved_on(self) -> None:
        self._reached[self.stage].set()

    def fail(self, reason: str) -> None:
        self.failure = reason
        self.server.fail()
        for event in self._reached.values():
            event.set()


class SecureRounds:
    """Secure aggregation on the ps: the attempt at the open round, and the rules that move it on.

    Args:
        settings: threshold, neighbours, clipping range.
        metrics: the ps's.
        rounds: the ps's round bookkeeping.

    Every method that may move the attempt on is followed, by its caller, by the ps's ``maybe_close``: the round
    closes there once its sum is unmasked.
    """

    def __init__(self, settings: SecAggSettings, metrics: PsMetrics, rounds: Rounds):
        self.settings = settings
        self.metrics = metrics
        self.rounds = rounds
        self.attempt: Attempt | None = None

    # The parties' messages --------------------------------------------------------------------------------------

    def advertise(self, layout: Layout, member_id: str, party: int, header: Contribution,
                  ad: Advertisement) -> Attempt:
        """A party's keys for the open round, checked and taken; its update counts in the round from here.

        Raises:
            Refusal: a model that is not all floating point; a key advertised twice (and the rest of
                :mod:`comind.secagg.errors`).
        """
        check_floating(layout)
        attempt = self.attempt
        if attempt is None or attempt.round != ad.round or attempt.over:
            attempt = Attempt(ad.round, layout, self.settings)
        self._counted(attempt.server.advertise, ad)
        self.attempt = attempt
        attempt.contributions[party] = header
        self.rounds.record(member_id)
        return attempt

    async def share(self, attempt: Attempt, party: int, shares: list[SealedShare]) -> None:
        self._counted(attempt.server.share, party, shares)
        await self._advance(attempt)

    async def masked_input(self, attempt: Attempt, party: int, masked: np.ndarray) -> None:
        self._counted(attempt.server.masked_input, party, attempt.round, masked)
        await self._advance(attempt)

    async def unmask(self, attempt: Attempt, reply: UnmaskReply) -> None:
        if attempt.unmasking:
            raise refusals.InvalidRequest("The round's sum is being unmasked: no more shares are taken.")
        self._counted(attempt.server.unmask, reply)
        await self._advance(attempt)

    async def call_ended(self, attempt: Attempt, party: int) -> None:
        """A party's call ended before its part in the attempt did: it dropped out."""
        if attempt.over or party in attempt.gone:
            return
        attempt.gone.add(party)
        log.info("Worker %d dropped out of round %d's secure aggregation at its stage '%s'.", party, attempt.round,
                 attempt.stage.value)
        await self._advance(attempt)

    def lease_ended(self, party: int) -> None:
        """A party's lease ended: its call will end too, or has; the timers close a stage left waiting for it."""
        if self.attempt is not None and not self.attempt.over:
            self.attempt.gone.add(party)

    # The round's rules --------------------------------------------------------------------------------------------

    async def may_close(self, now: float) -> SecureSum | None:
        """The open round's unmasked sum once there is one; until then, moves the attempt on where it may:
        closes the advertisements once the round's parties are in (its quorum or deadline, ``rounds.py``), and
        any stage at the round's deadline."""
        attempt = self.attempt
        if attempt is None or attempt.round != self.rounds.open_round:
            return None
        if attempt.result is not None:
            return attempt.result
        if attempt.over or attempt.unmasking:
            return None
        await self._advance(attempt)  # a party whose lease ended may have been the last one waited for
        if attempt.over or attempt.unmasking:
            return attempt.result
        if attempt.stage is Stage.ADVERTISE:
            if self.rounds.ready_to_close():
                self.rounds.begin_close()     # later keys are for a round that has its parties: stale
                self.rounds.extend_deadline()  # the stages to come have a round timeout
                await self._next_stage(attempt)
        elif now >= self.rounds.deadline:
            log.warning("Round %d's deadline passed at secure aggregation's stage '%s', waiting for task %s; going "
                        "on without them.", attempt.round, attempt.stage.value,
                        ", ".join(map(str, sorted(attempt.server.pending()))))
            await self._next_stage(attempt)
        return attempt.result

    async def _advance(self, attempt: Attempt) -> None:
        """Closes the attempt's stage if every party still in it has sent its part."""
        if not attempt.over and not attempt.unmasking and attempt.stage is not Stage.ADVERTISE \
                and attempt.server.pending() <= attempt.gone:
            await self._next_stage(attempt)

    async def _next_stage(self, attempt: Attempt) -> None:
        server, stage = attempt.server, attempt.stage
        try:
            if stage is Stage.ADVERTISE:
                server.close_advertising()
            elif stage is Stage.SHARE:
                attempt.inboxes = server.close_sharing()
            elif stage is Stage.MASKED_INPUT:
                server.close_masking()
            else:
                await self._unmask(attempt)
                return
        except TooFewSurvivors as error:
            self._fail(attempt, stage, str(error))
            return
        attempt.moved_on()
        if attempt.stage is not Stage.ADVERTISE:
            await self._advance(attempt)  # the parties still in may all have gone already

    async def _unmask(self, attempt: Attempt) -> None:
        attempt.unmasking = True
        started = time.perf_counter()
        try:
            # Seconds of keystream for a large model and many parties: in a thread, so that calls go on meanwhile
            # (below OFFLOAD_BYTES, the hop costs more than it saves).
            if attempt.server.size * 4 > OFFLOAD_BYTES:
                total, survivors = await asyncio.to_thread(attempt.server.finish)
            else:
                total, survivors = attempt.server.finish()
        except TooFewSurvivors as error:
            self._fail(attempt, Stage.UNMASK, str(error))
            return
        finally:
            attempt.unmasking = False
        request = attempt.request()
        recovered = len(request.dropped) + len(request.survivors - attempt.server.revealed)
        self.metrics.secagg_dropouts_recovered.inc(recovered)
        self.metrics.secagg_rounds.labels("aggregated").inc()
        log.info("Round %d's sum of %d masked inputs unmasked in %.2f s (%d parties, %d dropped out and recovered).",
                 attempt.round, survivors, time.perf_counter() - started, len(attempt.roster().keys), recovered)
        attempt.result = SecureSum(attempt.layout, total, survivors, len(attempt.roster().keys), self.settings)
        self.metrics.updates.labels("accepted").inc(survivors)
        attempt.moved_on()

    def survivors_figures(self) -> np.ndarray:
        """Examples, and examples times loss and accuracy, summed over the parties whose updates the open round's
        sum holds, and their staleness (none): what the round's log line gives."""
        assert self.attempt is not None
        figures = [self.attempt.contributions[p] for p in self.attempt.request().survivors]
        return np.array([sum(c.num_examples for c in figures), sum(c.num_examples * c.loss for c in figures),
                         sum(c.num_examples * c.accuracy for c in figures), 0.0], np.float64)  # no staleness: sync

    def survivors_reports(self) -> dict[int, federated_eval.Report]:
        """The federated-evaluation reports of the parties whose updates the open round's sum holds, by task: those
        of an update the round took, as with plain updates."""
        assert self.attempt is not None
        contributions = self.attempt.contributions
        return {party: report for party in self.attempt.request().survivors
                if (report := contributions[party].evaluation) is not None}

    def _fail(self, attempt: Attempt, stage: Stage, reason: str) -> None:
        message = (f"Round {attempt.round}'s secure aggregation failed at its stage '{stage.value}': "
                   f"{reason} The previous model stands; the round starts again.")
        log.warning(message)
        self.metrics.secagg_rounds.labels("failed").inc()
        attempt.fail(message)
        if self.rounds.open_round == attempt.round:
            self.rounds.complete(self.rounds.round)  # the same round, open again, its parties to come anew

    def _counted(self, function: Callable[..., None], *args: object) -> None:
        try:
            function(*args)
        except SecAggRefusal as refusal:
            self.metrics.secagg_refusals.labels(_snake(type(refusal).__name__)).inc()
            log.warning("Refused a secure-aggregation message: %s", refusal.message)
            raise


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(name))



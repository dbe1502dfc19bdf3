"""The ps's side of a round of secure aggregation: it relays keys and shares, sums masked inputs, and
removes the masks with the survivors' shares, learning only the sum (Bonawitz et al. 2017; SecAgg+'s graph,
Bell et al. 2020).

Driven stage by stage: parties' messages in, then ``close_*`` when all are in or the stage's time is up.
A refused message leaves the state as it was; a stage that closes with too few parties raises
:class:`TooFewSurvivors` and the round is over (``FAILED``): nothing of it is unmasked.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import numpy as np

from comind.secagg import primitives
from comind.secagg.client import check_round
from comind.secagg.config import SecAggSettings
from comind.secagg.errors import (
    DuplicateMessage,
    ForgedShare,
    InvalidMessage,
    KeyAdvertisedTwice,
    MisaddressedShare,
    NotAParty,
    TooFewSurvivors,
)
from comind.secagg.fixed_point import RING_DTYPE
from comind.secagg.messages import (
    Advertisement,
    Roster,
    SealedShare,
    UnmaskReply,
    UnmaskRequest,
    pair_context,
    pair_sign,
    share_context,
)
from comind.secagg.stages import Stage, expect

_COMMITMENT_BYTES = 32


class SecAggServer:
    """Args:
        round: the round.
        parties: the workers invited to it (their task indices); None: whoever the caller lets advertise.
        settings: threshold, graph degree and clipping range.
        size: ring elements in a masked input (parameters of the model's floating-point tensors).
    """

    def __init__(self, round: int, parties: Iterable[int] | None, settings: SecAggSettings, size: int):
        self.round = round
        self.invited = None if parties is None else frozenset(parties)
        self.settings = settings
        self.size = size
        self.stage = Stage.ADVERTISE
        self._keys: dict[int, tuple[bytes, bytes]] = {}
        self.roster: Roster | None = None
        self._sent: dict[int, list[SealedShare]] = {}  # by sender
        self._commitments: dict[tuple[int, int], tuple[bytes, bytes]] = {}  # (owner, holder): (key, seed)
        self._sum: np.ndarray | None = None
        self._masked: set[int] = set()
        self.request: UnmaskRequest | None = None
        self._revealed: dict[int, UnmaskReply] = {}

    # Stage 1 ------------------------------------------------------------------

    def advertise(self, ad: Advertisement) -> None:
        expect(self.stage, Stage.ADVERTISE, "An advertisement of keys")
        check_round(ad.round, self.round, "The advertisement")
        if self.invited is not None and ad.party not in self.invited:
            raise NotAParty(f"Party {ad.party} is not one of round {self.round}'s.")
        if ad.party in self._keys:
            raise KeyAdvertisedTwice(f"Party {ad.party} advertised its keys a second time in round {self.round}.")
        if len(ad.cipher_key) != primitives.KEY_BYTES or len(ad.mask_key) != primitives.KEY_BYTES:
            raise InvalidMessage(f"Public keys are {primitives.KEY_BYTES} bytes (X25519). Received: "
                                 f"{len(ad.cipher_key)} and {len(ad.mask_key)} bytes")
        taken = {key for pair in self._keys.values() for key in pair}
        if ad.cipher_key == ad.mask_key or {ad.cipher_key, ad.mask_key} & taken:
            raise KeyAdvertisedTwice(f"Party {ad.party} advertised a public key that is already advertised.")
        self._keys[ad.party] = ad.cipher_key, ad.mask_key

    def close_advertising(self) -> Roster:
        """The roster every party shares keys with. Raises TooFewSurvivors."""
        expect(self.stage, Stage.ADVERTISE, "Closing the advertisements")
        n = len(self._keys)
        degree = self.settings.degree(max(n, 2))
        threshold = self.settings.shares_needed(degree + 1)
        self._require(n, threshold, "advertised keys")
        self.roster = Roster(self.round, dict(self._keys), os.urandom(32), degree, threshold)
        self.stage = Stage.SHARE
        return self.roster

    # Stage 2 ------------------------------------------------------------------

    def share(self, party: int, shares: list[SealedShare]) -> None:
        """``party``'s sealed shares, one for each of its share holders (itself included)."""
        expect(self.stage, Stage.SHARE, "Shares of keys")
        roster = self._roster()
        if party not in roster.keys:
            raise NotAParty(f"Party {party} did not advertise keys in round {self.round}.")
        if party in self._sent:
            raise DuplicateMessage(f"Party {party} sent its shares a second time in round {self.round}.")
        for share in shares:
            check_round(share.round, self.round, "A share")
            if share.sender != party:
                raise MisaddressedShare(f"Party {party} sent a share in party {share.sender}'s name.")
            if len(share.key_commitment) != _COMMITMENT_BYTES or len(share.seed_commitment) != _COMMITMENT_BYTES:
                raise InvalidMessage(f"A share's commitments are {_COMMITMENT_BYTES} bytes each.")
        recipients = sorted(share.recipient for share in shares)
        if recipients != list(roster.holders(party)):
            raise MisaddressedShare(f"Party {party} must send one share to each of {list(roster.holders(party))}. "
                                    f"Received: shares for {recipients}")
        self._sent[party] = list(shares)

    def close_sharing(self) -> dict[int, list[SealedShare]]:
        """Each party's inbox: the shares sent to it by parties that shared. Raises TooFewSurvivors."""
        expect(self.stage, Stage.SHARE, "Closing the shares")
        roster = self._roster()
        self._require(len(self._sent), roster.threshold, "shared keys")
        inboxes: dict[int, list[SealedShare]] = {party: [] for party in self._sent}
        for sender, shares in self._sent.items():
            for share in shares:
                if share.recipient in inboxes:
                    inboxes[share.recipient].append(share)
                    self._commitments[sender, share.recipient] = share.key_commitment, share.seed_commitment
        self.stage = Stage.MASKED_INPUT
        return inboxes

    # Stage 3 ------------------------------------------------------------------

    def masked_input(self, party: int, round: int, masked: np.ndarray) -> None:
        """Adds ``party``'s masked input to the round's sum; it is uniformly random to the ps."""
        expect(self.stage, Stage.MASKED_INPUT, "A masked input")
        check_round(round, self.round, "The masked input")
        if party not in self._sent:
            raise NotAParty(f"Party {party} did not share keys in round {self.round}, so its input cannot be "
                            f"unmasked.")
        if party in self._masked:
            raise DuplicateMessage(f"Party {party} sent its masked input a second time in round {self.round}.")
        if masked.dtype != RING_DTYPE or masked.shape != (self.size,):
            raise InvalidMessage(f"A masked input is {self.size} little-endian uint32. Received: {masked.dtype} "
                                 f"{masked.shape}")
        if self._sum is None:
            self._sum = np.zeros(self.size, RING_DTYPE)
        np.add(self._sum, masked, out=self._sum)
        self._masked.add(party)

    def close_masking(self) -> UnmaskRequest:
        """Who survived and who dropped, for the survivors to reveal shares. Raises TooFewSurvivors."""
        expect(self.stage, Stage.MASKED_INPUT, "Closing the masked inputs")
        self._require(len(self._masked), self._roster().threshold, "sent masked inputs")
        self.request = UnmaskRequest(self.round, frozenset(self._masked), frozenset(self._sent) - self._masked)
        self.stage = Stage.UNMASK
        return self.request

    # Stage 4 ------------------------------------------------------------------

    def unmask(self, reply: UnmaskReply) -> None:
        """A survivor's shares, each checked against the commitment its owner made."""
        expect(self.stage, Stage.UNMASK, "Shares for unmasking")
        check_round(reply.round, self.round, "The unmask reply")
        request = self._request()
        if reply.party not in request.survivors:
            raise NotAParty(f"Party {reply.party} sent no masked input in round {self.round}.")
        if reply.party in self._revealed:
            raise DuplicateMessage(f"Party {reply.party} sent its unmask shares a second time.")
        for owners, shares, index in ((request.survivors, reply.seed_shares, 1),
                                      (request.dropped, reply.key_shares, 0)):
            for owner, share in shares.items():
                committed = self._commitments.get((owner, reply.party))
                if owner not in owners or committed is None:
                    raise MisaddressedShare(f"Party {reply.party} revealed a share of party {owner}'s "
                                            f"{'seed' if index else 'mask key'}, which it was not asked for or "
                                            f"does not hold.")
                context = share_context(self.round, owner, reply.party) + (b"seed" if index else b"key")
                if primitives.commitment(context, share) != committed[index]:
                    raise ForgedShare(f"Party {reply.party}'s share of party {owner}'s secret is not the one "
                                      f"party {owner} committed to.")
        self._revealed[reply.party] = reply

    def finish(self) -> tuple[np.ndarray, int]:
        """The sum of the survivors' encoded inputs, unmasked, and how many they are. Raises TooFewSurvivors."""
        expect(self.stage, Stage.UNMASK, "Unmasking")
        request, roster = self._request(), self._roster()
        self._require(len(self._revealed), roster.threshold, "revealed shares")
        assert self._sum is not None
        total = self._sum.copy()
        seeds = {owner: self._rebuild(owner, lambda reply: reply.seed_shares) for owner in request.survivors}
        keys = {owner: self._rebuild(owner, lambda reply: reply.key_shares) for owner in request.dropped}
        masks = primitives.Masks(self.size)
        for seed in seeds.values():
            masks.apply(total, seed, -1)
        for owner, raw in keys.items():
            private = primitives.private_key(raw)
            if primitives.public_bytes(private) != roster.keys[owner][1]:
                raise TooFewSurvivors(f"Party {owner}'s mask key did not rebuild from its shares.")
            for other in roster.graph[owner] & request.survivors:  # the survivors that masked with it
                pair = primitives.agree(private, roster.keys[other][1], pair_context(self.round, other, owner))
                masks.apply(total, pair, -pair_sign(other, owner))
        self.stage = Stage.DONE
        return total, len(request.survivors)

    def fail(self) -> None:
        self.stage = Stage.FAILED

    @property
    def revealed(self) -> frozenset[int]:
        """The survivors whose unmask shares are in."""
        return frozenset(self._revealed)

    def pending(self) -> frozenset[int]:
        """The parties the current stage still waits for."""
        if self.stage is Stage.SHARE:
            return frozenset(self._roster().keys) - self._sent.keys()
        if self.stage is Stage.MASKED_INPUT:
            return frozenset(self._sent) - self._masked
        if self.stage is Stage.UNMASK:
            return self._request().survivors - self._revealed.keys()
        return frozenset()

    # ---------------------------------------------------------------------------

    def _rebuild(self, owner: int, pick: Callable[[UnmaskReply], dict[int, bytes]]) -> bytes:
        roster = self._roster()
        holders = roster.holders(owner)
        shares = {holders.index(party): pick(reply)[owner] for party, reply in self._revealed.items()
                  if owner in pick(reply)}
        if len(shares) < roster.threshold:
            self.stage = Stage.FAILED
            raise TooFewSurvivors(f"Party {owner}'s secret has {len(shares)} shares revealed, under the threshold "
                                  f"of {roster.threshold}: round {self.round} cannot be unmasked.")
        # The lowest holders' shares, not the first revealed: the same holders round after round, whose Lagrange
        # coefficients primitives.combine has made already.
        return primitives.combine(dict(sorted(shares.items())[:roster.threshold]))

    def _require(self, count: int, threshold: int, what: str) -> None:
        if count < max(2, threshold):
            self.stage = Stage.FAILED
            raise TooFewSurvivors(f"Only {count} parties {what} in round {self.round}, under the threshold of "
                                  f"{max(2, threshold)}: the round cannot be aggregated securely.")

    def _roster(self) -> Roster:
        assert self.roster is not None
        return self.roster

    def _request(self) -> UnmaskRequest:
        assert self.request is not None
        return self.request

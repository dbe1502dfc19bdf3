"""A worker's side of a round of secure aggregation (Bonawitz et al. 2017, with SecAgg+'s graph).

One object per round, driven by the ps's messages: :meth:`advertise`, then :meth:`share_keys` with the
ps's roster, :meth:`mask` with the shares the ps relayed, :meth:`unmask` with the ps's list of survivors. A worker
draws its masks ahead, while it waits for the others: its self mask before the roster (:meth:`draw_self_mask`),
its pairwise masks once it has sent its shares (:meth:`premask`).
Each method checks the whole message before it changes anything, so a refused one leaves the party as it was.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from comind.secagg import primitives
from comind.secagg.config import minimum_threshold
from comind.secagg.errors import (
    DuplicateMessage,
    InvalidMessage,
    KeyAdvertisedTwice,
    MisaddressedShare,
    NotAParty,
    TooFewSurvivors,
    WrongRound,
)
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

_SHARE = primitives.SECRET_BYTES


def share_key(private: X25519PrivateKey, peer_public: bytes, round: int, a: int, b: int) -> bytes:
    """The AEAD key of the shares between ``a`` and ``b`` in ``round``, the same from either side."""
    return primitives.agree(private, peer_public, b"share" + pair_context(round, a, b))


def check_round(round: int, expected: int, what: str) -> None:
    if round != expected:
        raise WrongRound(f"{what} is for round {round}, and this is round {expected}: replayed, or from another "
                         f"round. Received: round={round}")


class SecAggClient:
    """Args:
        round: the round this party masks an update for.
        party: its id in the round (its task index).
    """

    def __init__(self, round: int, party: int):
        self.round = round
        self.party = party
        self.stage = Stage.ADVERTISE
        self._cipher_key = primitives.new_private_key()
        self._mask_key = primitives.new_private_key()
        self._seed = primitives.new_seed()
        self._roster: Roster | None = None
        self._share_keys: dict[int, bytes] = {}  # by share holder: the AEAD key of the shares to and from it
        self._self_mask: np.ndarray | None = None
        self._premasked: np.ndarray | None = None
        # By owner: this party's shares of the owner's mask key and self-mask seed (its own included).
        self._shares: dict[int, tuple[bytes, bytes]] = {}

    @property
    def roster(self) -> Roster:
        assert self._roster is not None, "no roster before the share-keys stage"
        return self._roster

    def advertise(self) -> Advertisement:
        expect(self.stage, Stage.ADVERTISE, "Advertising keys")
        self.stage = Stage.SHARE
        return Advertisement(self.round, self.party, primitives.public_bytes(self._cipher_key),
                             primitives.public_bytes(self._mask_key))

    def share_keys(self, roster: Roster) -> list[SealedShare]:
        """Shares of this party's mask key and self-mask seed, sealed to each of its share holders."""
        expect(self.stage, Stage.SHARE, "A roster")
        check_round(roster.round, self.round, "The roster")
        mine = (primitives.public_bytes(self._cipher_key), primitives.public_bytes(self._mask_key))
        if roster.keys.get(self.party) != mine:
            raise NotAParty(f"The roster does not hold party {self.party}'s keys as it advertised them.")
        keys = [key for pair in roster.keys.values() for key in pair]
        if len(set(keys)) != len(keys):
            raise KeyAdvertisedTwice("The roster holds one public key twice: a party copied another's keys.")
        group = min(roster.degree, len(roster.keys) - 1) + 1
        if not minimum_threshold(group) <= roster.threshold <= group or len(roster.keys) < 2:
            raise InvalidMessage(f"A roster of {len(roster.keys)} parties with share groups of {group} needs a "
                                 f"threshold from {minimum_threshold(group)} to {group}, so that no minority "
                                 f"rebuilds a secret. Received: threshold={roster.threshold}")
        holders = roster.holders(self.party)
        key_shares = primitives.split(primitives.private_bytes(self._mask_key), roster.threshold, len(holders))
        seed_shares = primitives.split(self._seed, roster.threshold, len(holders))
        sealed = []
        for holder, key_share, seed_share in zip(holders, key_shares, seed_shares, strict=True):
            context = share_context(self.round, self.party, holder)
            secret = self._share_keys[holder] = share_key(self._cipher_key, roster.keys[holder][0], self.round,
                                                           self.party, holder)
            sealed.append(SealedShare(self.round, self.party, holder,
                                      primitives.seal(secret, key_share + seed_share, context),
                                      primitives.commitment(context + b"key", key_share),
                                      primitives.commitment(context + b"seed", seed_share)))
        self._roster = roster
        self.stage = Stage.MASKED_INPUT
        return sealed

    def draw_self_mask(self, size: int) -> None:
        """Draws this party's self mask for an input of ``size`` ring elements ahead of :meth:`premask`: it needs
        nothing from the other parties, so a worker draws it while it waits for the roster."""
        self._self_mask = np.zeros(size, np.dtype("<u4"))
        primitives.Masks(size).apply(self._self_mask, self._seed, 1)

    def premask(self, encoded: np.ndarray) -> None:
        """Masks ``encoded`` (ring elements, :mod:`fixed_point`) ahead of the inbox, with this party's self mask and
        a pairwise mask with every neighbour in the roster: the masks, most of the stage's work, need only the
        roster, so a worker draws them while the other parties still share keys. :meth:`mask` then takes out the
        masks of the neighbours whose shares did not come (they dropped out before sharing)."""
        expect(self.stage, Stage.MASKED_INPUT, "An input to mask")
        encoded = np.asarray(encoded)
        if encoded.dtype != np.dtype("<u4") or encoded.ndim != 1:
            raise ValueError(f"A masked input is a flat uint32 array. Received: {encoded.dtype} {encoded.shape}")
        if self._self_mask is None or self._self_mask.size != encoded.size:
            self.draw_self_mask(encoded.size)
        assert self._self_mask is not None
        masked, self._self_mask = np.add(encoded, self._self_mask), None
        masks = primitives.Masks(masked.size)
        for other in self.roster.graph[self.party]:
            masks.apply(masked, self._pair_key(other), pair_sign(self.party, other))
        self._premasked = masked

    def mask(self, inbox: Sequence[SealedShare]) -> np.ndarray:
        """The input :meth:`premask` took, masked with this party's self mask and a pairwise mask with each
        neighbour whose shares came in ``inbox`` (those that went on to the masked input)."""
        expect(self.stage, Stage.MASKED_INPUT, "Relayed shares")
        if self._premasked is None:
            raise ValueError("Nothing to mask: premask the encoded input first.")
        roster = self.roster
        received: dict[int, tuple[bytes, bytes]] = {}
        holders_of_mine = roster.holders(self.party)
        for share in inbox:
            check_round(share.round, self.round, "A share")
            if share.recipient != self.party:
                raise MisaddressedShare(f"A share for party {share.recipient} came to party {self.party}.")
            if share.sender not in holders_of_mine:  # the graph is symmetric: senders are those we share with
                raise MisaddressedShare(f"A share came from party {share.sender}, not a neighbour of party "
                                        f"{self.party}.")
            if share.sender in received:
                raise DuplicateMessage(f"A second share from party {share.sender}: a replay.")
            context = share_context(self.round, share.sender, self.party)
            # The key it sealed with is the one this party sealed its own shares to it with (share_key).
            plain = primitives.open_sealed(self._share_keys[share.sender], share.sealed, context)
            if len(plain) != 2 * _SHARE:
                raise InvalidMessage(f"A share must be {2 * _SHARE} bytes. Received: {len(plain)} bytes")
            key_share, seed_share = plain[:_SHARE], plain[_SHARE:]
            if (primitives.commitment(context + b"key", key_share) != share.key_commitment
                    or primitives.commitment(context + b"seed", seed_share) != share.seed_commitment):
                raise InvalidMessage(f"Party {share.sender}'s shares do not match its commitments.")
            received[share.sender] = key_share, seed_share
        if self.party not in received:
            raise InvalidMessage(f"Party {self.party}'s share of its own secrets did not come back.")
        if len(received) < roster.threshold:
            raise TooFewSurvivors(f"Only {len(received)} of party {self.party}'s share holders shared keys, under "
                                  f"the threshold of {roster.threshold}.")
        masked = self._premasked
        # Rare: a neighbour that dropped out between the roster and its shares. (A mask buffer only then.)
        if dropped := roster.graph[self.party] - received.keys():
            masks = primitives.Masks(masked.size)
            for other in dropped:
                masks.apply(masked, self._pair_key(other), -pair_sign(self.party, other))
        self._premasked = None
        self._shares = received
        self.stage = Stage.UNMASK
        return masked

    def _pair_key(self, other: int) -> bytes:
        """The key of the pairwise mask this party and ``other`` share."""
        return primitives.agree(self._mask_key, self.roster.keys[other][1], pair_context(self.round, self.party,
                                                                                         other))

    def unmask(self, request: UnmaskRequest) -> UnmaskReply:
        """Shares of the survivors' self-mask seeds and of the dropped parties' mask keys; never both of one
        party, and only once a round, so that the ps cannot unmask anyone's input alone."""
        expect(self.stage, Stage.UNMASK, "An unmask request")
        check_round(request.round, self.round, "The unmask request")
        if request.survivors & request.dropped:
            raise InvalidMessage(f"The unmask request names parties both survivors and dropped "
                                 f"({sorted(request.survivors & request.dropped)}): it would unmask them.")
        if self.party not in request.survivors:
            raise NotAParty(f"The unmask request does not count party {self.party}, which sent its masked input.")
        if len(request.survivors) < max(2, self.roster.threshold):
            raise TooFewSurvivors(f"Only {len(request.survivors)} parties survived, under the threshold of "
                                  f"{self.roster.threshold}: unmasking would reveal too little of a sum.")
        reply = UnmaskReply(self.round, self.party,
                            {o: s[1] for o, s in self._shares.items() if o in request.survivors},
                            {o: s[0] for o, s in self._shares.items() if o in request.dropped})
        self.stage = Stage.DONE
        return reply

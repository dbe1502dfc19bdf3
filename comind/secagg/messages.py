"""What the parties of a round of secure aggregation and the ps send each other (the wire carries them in
``comind.proto``'s ``SecAgg*`` messages)."""

from __future__ import annotations

import dataclasses
import functools
import struct

from comind.secagg import graph


@dataclasses.dataclass(frozen=True)
class Advertisement:
    """Stage 1: a party's two public keys, one to encrypt shares to it, one for pairwise masks."""

    round: int
    party: int
    cipher_key: bytes
    mask_key: bytes


@dataclasses.dataclass(frozen=True)
class Roster:
    """The ps's answer to stage 1: who advertised which keys, and the round's graph and threshold."""

    round: int
    keys: dict[int, tuple[bytes, bytes]]  # party: (cipher key, mask key)
    seed: bytes   # the graph's
    degree: int   # k
    threshold: int  # t, of each party's degree + 1 share holders

    @property
    def parties(self) -> tuple[int, ...]:
        return tuple(sorted(self.keys))

    @functools.cached_property
    def graph(self) -> dict[int, frozenset[int]]:
        return graph.neighbours(self.parties, self.degree, self.seed)

    def holders(self, owner: int) -> tuple[int, ...]:
        """Who holds shares of ``owner``'s secrets, in the order of their Shamir indices."""
        return tuple(sorted(self.graph[owner] | {owner}))


@dataclasses.dataclass(frozen=True)
class SealedShare:
    """Stage 2: the shares of ``sender``'s two secrets for ``recipient``, sealed to it; the ps relays it.

    The commitments (:func:`primitives.commitment`) let the ps check the shares revealed at unmasking.
    """

    round: int
    sender: int
    recipient: int
    sealed: bytes
    key_commitment: bytes
    seed_commitment: bytes


@dataclasses.dataclass(frozen=True)
class UnmaskRequest:
    """Stage 4: who sent a masked input (their self-mask seeds are rebuilt) and who shared keys but did not
    (their mask keys are rebuilt)."""

    round: int
    survivors: frozenset[int]
    dropped: frozenset[int]


@dataclasses.dataclass(frozen=True)
class UnmaskReply:
    """A survivor's shares: of the self-mask seeds of survivors, of the mask keys of the dropped, by owner."""

    round: int
    party: int
    seed_shares: dict[int, bytes]
    key_shares: dict[int, bytes]


def share_context(round: int, sender: int, recipient: int) -> bytes:
    """What binds a share to its round, sender and recipient (AEAD associated data, commitments, KDF info)."""
    return b"comind-secagg/v1" + struct.pack("<qqq", round, sender, recipient)


def pair_context(round: int, a: int, b: int) -> bytes:
    """The KDF info of a pairwise mask, the same from either side."""
    return b"comind-secagg/mask" + struct.pack("<qqq", round, min(a, b), max(a, b))


def pair_sign(party: int, other: int) -> int:
    """+1 if ``party`` adds the mask it shares with ``other``, -1 if it subtracts it: the two cancel."""
    return 1 if party < other else -1


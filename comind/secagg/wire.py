"""Secure aggregation's messages (:mod:`comind.secagg.messages`) to and from ``comind.proto``'s ``SecAgg*``."""

from __future__ import annotations

from comind.proto import comind_pb2 as pb
from comind.secagg.messages import Advertisement, Roster, SealedShare, UnmaskReply, UnmaskRequest


def keys_to_proto(ad: Advertisement) -> pb.SecAggKeys:
    return pb.SecAggKeys(cipher_key=ad.cipher_key, mask_key=ad.mask_key)


def advertisement(round: int, party: int, keys: pb.SecAggKeys) -> Advertisement:
    return Advertisement(round, party, keys.cipher_key, keys.mask_key)


def roster_to_proto(roster: Roster) -> pb.SecAggRoster:
    return pb.SecAggRoster(round=roster.round, graph_seed=roster.seed, degree=roster.degree,
                           threshold=roster.threshold,
                           parties=[pb.SecAggParty(task_index=p, keys=pb.SecAggKeys(cipher_key=c, mask_key=m))
                                    for p, (c, m) in sorted(roster.keys.items())])


def roster(message: pb.SecAggRoster) -> Roster:
    return Roster(message.round, {p.task_index: (p.keys.cipher_key, p.keys.mask_key) for p in message.parties},
                  message.graph_seed, message.degree, message.threshold)


def shares_to_proto(shares: list[SealedShare]) -> pb.SecAggShares:
    return pb.SecAggShares(shares=[pb.SecAggShare(round=s.round, sender=s.sender, recipient=s.recipient,
                                                  sealed=s.sealed, key_commitment=s.key_commitment,
                                                  seed_commitment=s.seed_commitment) for s in shares])


def shares(message: pb.SecAggShares) -> list[SealedShare]:
    return [SealedShare(s.round, s.sender, s.recipient, s.sealed, s.key_commitment, s.seed_commitment)
            for s in message.shares]


def unmask_to_proto(request: UnmaskRequest) -> pb.SecAggUnmask:
    return pb.SecAggUnmask(round=request.round, survivors=sorted(request.survivors), dropped=sorted(request.dropped))


def unmask_request(message: pb.SecAggUnmask) -> UnmaskRequest:
    return UnmaskRequest(message.round, frozenset(message.survivors), frozenset(message.dropped))


def reveal_to_proto(reply: UnmaskReply) -> pb.SecAggReveal:
    return pb.SecAggReveal(
        round=reply.round,
        seed_shares=[pb.SecAggRevealed(owner=o, share=s) for o, s in sorted(reply.seed_shares.items())],
        key_shares=[pb.SecAggRevealed(owner=o, share=s) for o, s in sorted(reply.key_shares.items())])


def reveal(party: int, message: pb.SecAggReveal) -> UnmaskReply:
    return UnmaskReply(message.round, party, {r.owner: r.share for r in message.seed_shares},
                       {r.owner: r.share for r in message.key_shares})

"""Secure aggregation's protocol, in process: the unmasked sum is exact with dropouts at every stage, a
masked input looks uniform, and each hostile message is refused with state unchanged."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

from comind.secagg import fixed_point, graph, primitives
from comind.secagg.client import SecAggClient
from comind.secagg.config import SecAggSettings
from comind.secagg.errors import (
    DuplicateMessage,
    ForgedShare,
    InvalidMessage,
    KeyAdvertisedTwice,
    MisaddressedShare,
    NotAParty,
    RangeExceeded,
    TooFewSurvivors,
    WrongRound,
    WrongStage,
)
from comind.secagg.messages import UnmaskRequest
from comind.secagg.server import SecAggServer
from comind.secagg.stages import Stage

SIZE = 257
STAGES = ("advertise", "share", "masked_input", "unmask")


def encoded_inputs(parties: list[int], seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {p: rng.integers(0, 2**32, SIZE, dtype=np.uint32) for p in parties}


def run_round(n: int, drop: dict[str, set[int]] | None = None, settings: SecAggSettings | None = None,
              round: int = 7) -> tuple[np.ndarray, int, dict[int, np.ndarray], SecAggServer]:
    """One round among parties 0 .. n - 1 in process; ``drop[stage]``: who vanishes before sending at it.

    As workers do, each party draws its self mask before the roster, masks its input once it has sent its shares,
    with a pairwise mask for every neighbour in the roster, and takes out, once its inbox comes, those of the
    neighbours that dropped before sharing."""
    drop = drop or {}
    parties = list(range(n))
    clients = {p: SecAggClient(round, p) for p in parties}
    server = SecAggServer(round, parties, settings or SecAggSettings(), SIZE)
    inputs = encoded_inputs(parties)

    def alive(stage: str) -> list[int]:
        gone = set().union(*(drop.get(s, set()) for s in STAGES[:STAGES.index(stage) + 1]))
        return [p for p in parties if p not in gone]

    for p in alive("advertise"):
        server.advertise(clients[p].advertise())
        clients[p].draw_self_mask(SIZE)
    roster = server.close_advertising()
    for p in alive("share"):
        server.share(p, clients[p].share_keys(roster))
        clients[p].premask(inputs[p])
    inboxes = server.close_sharing()
    for p in alive("masked_input"):
        server.masked_input(p, round, clients[p].mask(inboxes[p]))
    request = server.close_masking()
    for p in alive("unmask"):
        server.unmask(clients[p].unmask(request))
    total, survivors = server.finish()
    return total, survivors, {p: inputs[p] for p in request.survivors}, server


def ring_sum(values: list[np.ndarray]) -> np.ndarray:
    return np.sum(values, axis=0, dtype=np.uint64).astype(np.uint32)


@pytest.mark.parametrize("n", [3, 10])
@pytest.mark.parametrize("stage", STAGES)
def test_the_unmasked_sum_is_exact_with_dropouts(n, stage):
    settings = SecAggSettings()
    t = settings.shares_needed(n)
    assert t == n // 2 + 1
    for dropped in (0, 1, n - t):
        gone = set(range(n - dropped, n))
        total, survivors, inputs, _ = run_round(n, {stage: gone})
        # Those that dropped before their masked input are out of the sum; after it, they are in.
        expected = n - dropped if stage != "unmask" else n
        assert survivors == expected == len(inputs)
        np.testing.assert_array_equal(total, ring_sum(list(inputs.values())))


def test_a_sparse_graph_with_twenty_parties_sums_exactly():
    settings = SecAggSettings(neighbours=6)
    total, survivors, inputs, server = run_round(20, {"masked_input": {3, 11}, "unmask": {5}}, settings)
    assert server.roster is not None and server.roster.degree == 6 and server.roster.threshold == 4
    assert all(len(ns) == 6 for ns in server.roster.graph.values())
    assert survivors == 18
    np.testing.assert_array_equal(total, ring_sum(list(inputs.values())))


def test_the_graph_is_k_regular_symmetric_and_fixed_by_the_seed():
    parties = list(range(40))
    a = graph.neighbours(parties, 8, b"s" * 32)
    assert a == graph.neighbours(list(reversed(parties)), 8, b"s" * 32)
    assert a != graph.neighbours(parties, 8, b"t" * 32)
    assert all(len(ns) == 8 and p not in ns and all(p in a[q] for q in ns) for p, ns in a.items())
    assert graph.default_degree(10) == 9 and graph.default_degree(1000) == 30


@pytest.mark.parametrize("n", [3, 10])
def test_too_few_survivors_fail_cleanly(n):
    t = SecAggSettings().shares_needed(n)
    with pytest.raises(TooFewSurvivors):
        run_round(n, {"masked_input": set(range(t - 1, n))})
    with pytest.raises(TooFewSurvivors):
        run_round(n, {"unmask": set(range(t - 1, n))})


def test_fixed_point_sums_never_wrap_and_round_without_bias():
    n, c = 64, 1.0
    values = np.full((n, 1000), c)
    rng = np.random.default_rng(1)
    total = ring_sum([fixed_point.encode(v, c, n, rng) for v in values])
    assert fixed_point.decode_sum(total, c, n) == pytest.approx(n * c, rel=1e-6)
    total = ring_sum([fixed_point.encode(-v, c, n, rng) for v in values])
    assert fixed_point.decode_sum(total, c, n) == pytest.approx(-n * c, rel=1e-6)
    # Stochastic rounding: the mean of many encodings of a value between two steps is the value.
    step = 1 / fixed_point.scale(c, n)
    x = np.full(200_000, 0.3 * step)
    assert fixed_point.decode_sum(fixed_point.encode(x, c, n, rng), c, n).mean() == pytest.approx(0.3 * step,
                                                                                                 rel=0.02)
    with pytest.raises(RangeExceeded, match="COMIND_SECAGG_CLIP_RANGE"):
        fixed_point.encode(np.array([0.5, -1.5]), c, n, rng)
    with pytest.raises(RangeExceeded):
        fixed_point.encode(np.array([np.nan]), c, n, rng)


def test_a_masked_input_alone_looks_uniform():
    """Chi-square over 256 bins of the top byte: a masked input of zeros is the sum of ChaCha20 streams."""
    from scipy.stats import chisquare  # dp-accounting's dependency, installed with the tests

    round, parties = 3, [0, 1, 2]
    clients = {p: SecAggClient(round, p) for p in parties}
    server = SecAggServer(round, parties, SecAggSettings(), 100_000)
    for p in parties:
        server.advertise(clients[p].advertise())
    roster = server.close_advertising()
    for p in parties:
        server.share(p, clients[p].share_keys(roster))
    inboxes = server.close_sharing()
    clients[0].premask(np.zeros(100_000, np.uint32))
    masked = clients[0].mask(inboxes[0])
    counts = np.bincount(masked >> 24, minlength=256)
    assert chisquare(counts).pvalue > 1e-3
    assert chisquare(np.bincount(masked & 0xFF, minlength=256)).pvalue > 1e-3


def test_shamir_shares_of_long_secrets():
    secret = primitives.new_seed()
    shares = primitives.split(secret, 3, 5)
    assert primitives.combine({0: shares[0], 2: shares[2], 4: shares[4]}) == secret
    assert primitives.combine({0: shares[0], 1: shares[1]}) != secret


def test_shamir_combine_matches_pycryptodomes_for_every_set_of_holders():
    """combine's cached Lagrange coefficients give what pycryptodome's own Shamir.combine gives, piece by piece."""
    import itertools

    from Crypto.Protocol.SecretSharing import Shamir

    secret = primitives.new_seed()
    shares = primitives.split(secret, 3, 6)
    for holders in itertools.combinations(range(6), 3):
        picked = {h: shares[h] for h in holders}
        theirs = b"".join(Shamir.combine([(h + 1, picked[h][i:i + 16]) for h in holders]) for i in (0, 16))
        assert primitives.combine(picked) == theirs == secret


def test_combines_products_by_table_are_pycryptodomes_field_products():
    """combine multiplies by a coefficient with tables of its products (linear over GF(2)): the same as pycryptodome's
    GF(2^128) multiplication, for random elements and those at the edges (zero, one, the top bit, all bits)."""
    import os

    from Crypto.Protocol.SecretSharing import _Element

    edges = [0, 1, 1 << 127, (1 << 128) - 1]
    randoms = [int.from_bytes(os.urandom(16), "big") for _ in range(50)]
    for c in edges + randoms[:10]:
        tables = primitives._product_tables(c)
        for y in edges + randoms:
            assert primitives._times(tables, y) == int(_Element(c) * _Element(y))


# Hostile peers ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    server: SecAggServer
    clients: dict[int, SecAggClient]
    roster: object = None
    sent: dict[int, list] = dataclasses.field(default_factory=dict)
    inboxes: dict[int, list] = dataclasses.field(default_factory=dict)


def staged(until: str, n: int = 4, round: int = 5) -> Setup:
    parties = list(range(n))
    setup = Setup(SecAggServer(round, parties, SecAggSettings(), SIZE), {p: SecAggClient(round, p) for p in parties})
    ads = {p: setup.clients[p].advertise() for p in parties}
    if until == "advertise":
        setup.sent = ads  # type: ignore[assignment]
        return setup
    for ad in ads.values():
        setup.server.advertise(ad)
    setup.roster = setup.server.close_advertising()
    setup.sent = {p: setup.clients[p].share_keys(setup.roster) for p in parties}  # type: ignore[arg-type]
    if until == "share":
        return setup
    for p in parties:
        setup.server.share(p, setup.sent[p])
    setup.inboxes = setup.server.close_sharing()
    return setup


def refused(error: type[Exception], target: object, call, *args) -> None:
    """``call(*args)`` raises ``error`` and leaves ``target``'s state as it was."""
    before = copy.deepcopy(vars(target))
    with pytest.raises(error):
        call(*args)
    after = vars(target)
    assert before.keys() == after.keys()
    for key in before:
        if isinstance(before[key], np.ndarray):
            np.testing.assert_array_equal(before[key], after[key])
        elif key not in ("_cipher_key", "_mask_key"):  # key objects compare by identity
            assert before[key] == after[key], key


def test_the_ps_refuses_a_key_advertised_twice_or_copied():
    setup = staged("advertise")
    server, ads = setup.server, setup.sent
    server.advertise(ads[0])
    refused(KeyAdvertisedTwice, server, server.advertise, ads[0])
    refused(KeyAdvertisedTwice, server, server.advertise, dataclasses.replace(ads[1], mask_key=ads[0].mask_key))
    refused(WrongRound, server, server.advertise, dataclasses.replace(ads[1], round=4))
    refused(NotAParty, server, server.advertise, dataclasses.replace(ads[1], party=9))
    refused(InvalidMessage, server, server.advertise, dataclasses.replace(ads[1], cipher_key=b"x"))
    refused(WrongStage, server, server.share, 0, [])


def test_the_ps_refuses_shares_misaddressed_replayed_or_of_another_round():
    setup = staged("share")
    server, sent = setup.server, setup.sent
    server.share(0, sent[0])
    refused(DuplicateMessage, server, server.share, 0, sent[0])
    refused(MisaddressedShare, server, server.share, 1, sent[2])  # in another's name
    refused(MisaddressedShare, server, server.share, 1, sent[1][1:])  # one holder left out
    refused(WrongRound, server, server.share, 1, [dataclasses.replace(s, round=4) for s in sent[1]])


def test_a_worker_refuses_shares_forged_replayed_or_meant_for_another():
    setup = staged("masked_input")
    client, inbox = setup.clients[1], setup.inboxes[1]
    client.premask(np.zeros(SIZE, np.uint32))
    other = setup.inboxes[2][0]
    refused(MisaddressedShare, client, client.mask, [*inbox, other])
    refused(DuplicateMessage, client, client.mask, [*inbox, inbox[0]])
    refused(WrongRound, client, client.mask, [dataclasses.replace(inbox[0], round=4), *inbox[1:]])
    tampered = dataclasses.replace(inbox[0], sealed=inbox[0].sealed[:-1] + bytes([inbox[0].sealed[-1] ^ 1]))
    refused(ForgedShare, client, client.mask, [tampered, *inbox[1:]])
    # A share sealed in an earlier round, under that round's keys, does not open in this one.
    earlier = staged("masked_input", round=4).inboxes[1][0]
    refused(ForgedShare, client, client.mask, [dataclasses.replace(earlier, round=5), *inbox[1:]])
    client.mask(inbox)


def test_the_ps_refuses_masked_inputs_and_unmask_shares_that_break_the_protocol():
    setup = staged("masked_input")
    server, clients, inboxes = setup.server, setup.clients, setup.inboxes
    for p in range(4):
        clients[p].premask(np.zeros(SIZE, np.uint32))
    masked = {p: clients[p].mask(inboxes[p]) for p in range(4)}
    refused(WrongRound, server, server.masked_input, 0, 4, masked[0])
    refused(InvalidMessage, server, server.masked_input, 0, 5, masked[0][:-1])
    for p in range(3):  # party 3 drops
        server.masked_input(p, 5, masked[p])
    refused(DuplicateMessage, server, server.masked_input, 0, 5, masked[0])
    request = server.close_masking()
    replies = {p: clients[p].unmask(request) for p in range(3)}
    # A forged share: another value than its owner committed to.
    forged = dataclasses.replace(replies[0], seed_shares={**replies[0].seed_shares, 1: bytes(32)})
    refused(ForgedShare, server, server.unmask, forged)
    # A share of what was not asked: the mask key of a survivor would unmask its input.
    greedy = dataclasses.replace(replies[0], key_shares={1: replies[0].seed_shares[1]})
    refused(MisaddressedShare, server, server.unmask, greedy)
    refused(NotAParty, server, server.unmask, dataclasses.replace(replies[0], party=3))
    server.unmask(replies[0])
    refused(DuplicateMessage, server, server.unmask, replies[0])
    server.unmask(replies[1])
    server.unmask(replies[2])
    total, survivors = server.finish()
    assert survivors == 3 and not total.any()
    assert server.stage is Stage.DONE


def test_a_worker_reveals_shares_once_and_never_both_of_one_party():
    setup = staged("masked_input")
    client = setup.clients[0]
    client.premask(np.zeros(SIZE, np.uint32))
    client.mask(setup.inboxes[0])

    both = UnmaskRequest(5, frozenset({0, 1, 2}), frozenset({2, 3}))
    refused(InvalidMessage, client, client.unmask, both)
    refused(TooFewSurvivors, client, client.unmask, UnmaskRequest(5, frozenset({0}), frozenset({1, 2, 3})))
    client.unmask(UnmaskRequest(5, frozenset({0, 1, 2}), frozenset({3})))
    refused(WrongStage, client, client.unmask, UnmaskRequest(5, frozenset({0, 1}), frozenset({2, 3})))


def test_every_refusal_has_its_pre_created_metric_label():
    from comind.metrics import SECAGG_REFUSALS
    from comind.secagg import errors
    from comind.secure_rounds import _snake

    refusals = {_snake(cls.__name__) for cls in vars(errors).values()
                if isinstance(cls, type) and issubclass(cls, errors.SecAggRefusal) and cls is not errors.SecAggRefusal}
    assert refusals == set(SECAGG_REFUSALS)


def test_a_worker_clips_before_masking_and_refuses_values_outside_the_range():
    from comind.secure_worker import SecureExchange, SecureParameters
    from comind.tensors import Layout

    layout = Layout.of([np.zeros((2, 3), np.float32), np.zeros(2, np.float32)])
    change = layout.pack([np.full((2, 3), 3.0, np.float32), np.full(2, 4.0, np.float32)])
    exchange = SecureExchange(0, 1, layout, change, SecureParameters(4.0, max_update_norm=1.0), lambda m: None)
    assert np.linalg.norm(exchange._values) == pytest.approx(1.0)
    assert np.allclose(layout.views(change)[0], 3.0)  # the update itself is not changed
    with pytest.raises(RangeExceeded, match="COMIND_SECAGG_CLIP_RANGE"):
        SecureExchange(0, 1, layout, change, SecureParameters(3.5), lambda m: None)

"""The encode stage (comind/encodings.py): bytes, unbiasedness, error feedback, the ps's decoding and refusals.

Training with each encoding, a `comind local` run each, is bench/encodings.py; here a NumPy softmax regression on
the digits trains through each encoding in a second.
"""

from __future__ import annotations

import asyncio
import re

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from comind import encodings, refusals, settings
from comind.client import Update, WorkerClient
from comind.datasets import load
from comind.encodings import Encoder, EncodingError
from comind.errors import PsRefusal
from comind.pipeline import PipelineSettings, ServerPipeline
from comind.proto import comind_pb2 as pb
from comind.ps import UpdateHeader, UpdateKind, UpdateResult
from comind.tensors import Layout, chunks
from test_cluster import run_clients
from test_ps import INITIAL, LAYOUT, make_ps, model_values, never_read

#: The basic model on the digits (Dense 64 -> 128 -> 10), the model the accuracy figures are for.
DIGITS_MODEL = Layout.of([np.zeros((64, 128), np.float32), np.zeros(128, np.float32),
                          np.zeros((128, 10), np.float32), np.zeros(10, np.float32)])
#: bench/load.py's 0.4 MB model.
LOAD_MODEL = Layout.of([np.zeros((250, 400), np.float32), np.zeros(400, np.float32)])


def roundtrip(encoding: encodings.Encoding, layout: Layout, arrays, seed: int = 0) -> list[np.ndarray]:
    wire = encoding.encode(layout, layout.pack(arrays), np.random.default_rng(seed))
    assert wire.nbytes == encoding.wire_layout(layout).nbytes
    out = np.empty(layout.nbytes, np.uint8)
    encoding.decode(layout, wire, out)
    return layout.views(out)


@pytest.mark.parametrize("name, at_most", [("float32", 1.0), ("float16", 0.5001), ("bfloat16", 0.5001),
                                           ("int8", 0.2503), ("topk:0.01", 0.0201)])
@pytest.mark.parametrize("layout", [DIGITS_MODEL, LOAD_MODEL], ids=["digits", "load"])
def test_bytes_on_the_wire_relative_to_float32(name, at_most, layout):
    assert encodings.parse(name).wire_layout(layout).nbytes / layout.nbytes <= at_most


def test_integer_tensors_travel_as_they_are_with_every_encoding():
    arrays = [np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3), np.ones(3, np.float32),
              np.array([2**40 + 3], np.int64)]
    for name in ("float32", "float16", "bfloat16", "int8", "topk:0.5"):
        decoded = roundtrip(encodings.parse(name), LAYOUT, arrays)
        assert decoded[2][0] == 2**40 + 3
        if not name.startswith("topk"):
            np.testing.assert_allclose(decoded[1], 1.0, atol=1e-2 if name == "int8" else 0)


def test_the_int8_quantizer_is_unbiased_over_10000_draws():
    """One tensor of 10,000 copies of the same 256 values: every block holds the same values, so each copy is an
    independent draw of the quantizer on them."""
    rng = np.random.default_rng(1)
    values = (rng.normal(size=256) * np.logspace(-3, 0, 256)).astype(np.float32)
    layout = Layout.of([np.zeros((10_000, 256), np.float32)])
    [draws] = roundtrip(encodings.Int8(), layout, [np.tile(values, (10_000, 1))], seed=2)
    assert np.abs(draws.mean(axis=0) - values).max() < 1e-3
    assert len(np.unique(draws[:, 0])) == 2  # rounded stochastically to the two nearest levels


def test_int8_values_are_a_level_of_their_block_and_zeros_stay_zero():
    arrays = [np.zeros((4, 3), np.float32), np.full(3, 0.5, np.float32), np.array([1], np.int64)]
    kernel, bias, _ = roundtrip(encodings.Int8(), LAYOUT, arrays)
    np.testing.assert_array_equal(kernel, 0)
    np.testing.assert_allclose(bias, 0.5, rtol=1e-6)  # the largest value of its block is exact


def test_bfloat16_rounds_to_nearest_even_and_keeps_nan_and_infinity():
    half = 2.0 ** -8
    values = np.array([1.0, 1 + half, 1 + 3 * half, 1 + 2 * half + half / 2, -2.5, np.inf, -np.inf, np.nan, 0.0],
                      np.float32)
    expected = [1.0, 1.0, 1 + 4 * half, 1 + 2 * half, -2.5, np.inf, -np.inf, np.nan, 0.0]
    np.testing.assert_array_equal(encodings.from_bfloat16(encodings.to_bfloat16(values)), expected)


def test_float16_saturates_beyond_its_range():
    arrays = [np.full((4, 3), 1e6, np.float32), np.full(3, -1e6, np.float32), np.array([1], np.int64)]
    kernel, bias, _ = roundtrip(encodings.Float16(), LAYOUT, arrays)
    assert (kernel == 65504).all() and (bias == -65504).all()


def test_topk_sends_the_largest_magnitudes_of_each_tensor():
    kernel = (np.arange(12) * np.where(np.arange(12) % 2, -1, 1)).astype(np.float32).reshape(4, 3)
    decoded_kernel, decoded_bias, _ = roundtrip(encodings.parse("topk:0.25"), LAYOUT,
                                                [kernel, np.array([0, 5, 1], np.float32), np.array([1], np.int64)])
    np.testing.assert_array_equal(decoded_kernel.reshape(-1), [0] * 9 + [9 * -1, 10, -11])
    np.testing.assert_array_equal(decoded_bias, [0, 5, 0])  # at least one value of every tensor


def test_error_feedback_loses_nothing_sent_plus_residual_is_the_sum_of_the_deltas():
    rng = np.random.default_rng(3)
    encoder = Encoder(encodings.parse("topk:0.1"), seed=0)
    layout = DIGITS_MODEL
    total_sent = np.zeros(sum(s.size for s in layout.specs))
    total_deltas = np.zeros_like(total_sent)
    for _ in range(30):
        # Multiples of 2**-10 below 2**10: every sum here is exact in float32 and float64 alike.
        deltas = [(rng.integers(-2**12, 2**12, size=s.shape) / 2**10).astype(np.float32) for s in layout.specs]
        wire = encoder.encode(layout, layout.pack(deltas))
        sent = np.empty(layout.nbytes, np.uint8)
        encoder.encoding.decode(layout, wire, sent)
        total_sent += np.concatenate([v.reshape(-1) for v in layout.views(sent)])
        total_deltas += np.concatenate([d.reshape(-1) for d in deltas])
    assert encoder.residual is not None
    residual = np.concatenate([v.reshape(-1) for v in layout.views(encoder.residual)])
    np.testing.assert_array_equal(total_sent + residual, total_deltas)
    assert np.count_nonzero(residual) > 0


def test_each_round_of_error_feedback_splits_delta_plus_residual_into_sent_and_residual_exactly():
    rng = np.random.default_rng(4)
    encoder = Encoder(encodings.parse("topk:0.05"), seed=0)
    for _ in range(3):
        before = np.zeros(LAYOUT.nbytes, np.uint8) if encoder.residual is None else encoder.residual.copy()
        arrays = [rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32),
                  np.array([7], np.int64)]
        wire = encoder.encode(LAYOUT, LAYOUT.pack(arrays))
        sent = np.empty(LAYOUT.nbytes, np.uint8)
        encoder.encoding.decode(LAYOUT, wire, sent)
        for i in (0, 1):
            np.testing.assert_array_equal(LAYOUT.views(sent)[i] + LAYOUT.views(encoder.residual)[i],
                                          arrays[i] + LAYOUT.views(before)[i])
        assert LAYOUT.views(sent)[2][0] == 7  # a counter is sent as it is, and never kept back


@pytest.mark.parametrize("indices, problem", [([2, 1], "rise strictly"), ([1, 1], "rise strictly"),
                                              ([0, 12], "below the tensor's 12"), ([-1, 3], "from 0")])
def test_topk_indices_out_of_range_or_repeated_do_not_decode(indices, problem):
    encoding = encodings.parse("topk:0.2")
    wire = encoding.wire_layout(LAYOUT)
    parts = [np.array(indices, np.int32), np.ones(2, np.float32), np.array([0], np.int32), np.ones(1, np.float32),
             np.array([1], np.int64)]
    with pytest.raises(EncodingError, match=problem):
        encoding.decode(LAYOUT, wire.pack(parts), np.empty(LAYOUT.nbytes, np.uint8))


@pytest.mark.parametrize("text, name", [("", "float32"), ("int8", "int8"), ("topk:0.01", "topk:0.01"),
                                        ("topk:1", "topk:1.0"), ("topk:.5", "topk:0.5")])
def test_encodings_by_name(text, name):
    assert encodings.parse(text).name == name


@pytest.mark.parametrize("text", ["int4", "topk", "topk:0", "topk:1.5", "topk:nan", "topk:inf", "topk:x", "int8:2",
                                  "float16:"])
def test_the_update_encoding_setting_refuses_what_is_no_encoding(text):
    [option] = [o for o in settings.OPTIONS if o.name == "update_encoding"]
    with pytest.raises(ValueError, match=r"COMIND_UPDATE_ENCODING must be one of float32, float16, bfloat16, int8, "
                                         r"topk:FRACTION, FRACTION above 0 and at most 1. Received"):
        option.convert(text, "COMIND_UPDATE_ENCODING")
    assert option.convert("topk:0.010", "COMIND_UPDATE_ENCODING") == "topk:0.01"


# --- The ps decodes, then validates ------------------------------------------------------------------


def encoded_ps(name: str, registry: CollectorRegistry | None = None):
    return make_ps(registry, pipeline=ServerPipeline(PipelineSettings(update_encoding=name)))


async def initialized(ps) -> list[str]:
    joined = [ps.join(task, f"worker {task}") for task in range(2)]
    assert {info.update_encoding for info in joined} == {ps.pipeline.update_encoding.name}  # what the ps announces
    members = [info.member_id for info in joined]
    header = UpdateHeader(UpdateKind.INITIAL, 0, LAYOUT)
    assert await ps.receive(members[0], header, bytes_of(LAYOUT.pack(INITIAL))) is UpdateResult.ACCEPTED
    return members


async def bytes_of(buffer: np.ndarray):
    for chunk in chunks(buffer, chunk_bytes=16):
        yield chunk


def update(value: float, counter: int = 5) -> np.ndarray:
    return LAYOUT.pack([np.full((4, 3), value, np.float32), np.full(3, value, np.float32), np.array([counter])])


@pytest.mark.parametrize("name", ["float16", "bfloat16", "int8", "topk:1"])
def test_the_ps_decodes_each_encoding_and_counts_the_encoded_bytes(name):
    registry = CollectorRegistry()

    async def scenario():
        ps = encoded_ps(name, registry)
        a, b = await initialized(ps)
        for member, value in ((a, 1.0), (b, 3.0)):
            encoder = Encoder(ps.pipeline.update_encoding, seed=0)
            header = UpdateHeader(UpdateKind.DELTA, 1, LAYOUT, 10, encoding=encoder.encoding.name)
            assert await ps.receive(member, header, bytes_of(encoder.encode(LAYOUT, update(value)))) \
                is UpdateResult.ACCEPTED
        return ps

    ps = asyncio.run(scenario())
    kernel, bias, counter = model_values(ps)
    np.testing.assert_allclose(kernel, 2.0, rtol=1e-6)
    np.testing.assert_allclose(bias, 2.0, rtol=1e-6)
    assert counter[0] == 5
    received = registry.get_sample_value("comind_update_bytes_total", {"direction": "received"})
    assert received == LAYOUT.nbytes + 2 * ps.pipeline.update_encoding.wire_layout(ps.model.layout).nbytes


@pytest.mark.parametrize("sent", ["float32", "float16", "topk:0.5"])
def test_an_update_in_another_encoding_than_announced_is_refused_before_its_bytes_are_read(sent):
    async def scenario():
        ps = encoded_ps("int8")
        a, _ = await initialized(ps)
        header = UpdateHeader(UpdateKind.DELTA, 1, LAYOUT, 10, encoding=sent)
        with pytest.raises(refusals.InvalidRequest, match=f"This ps takes updates encoded as int8 .* Received: "
                                                          f"encoding='{sent}'"):
            await ps.receive(a, header, never_read())

    asyncio.run(scenario())


def test_an_initial_model_must_travel_as_it_is():
    async def scenario():
        ps = encoded_ps("int8")
        member = ps.join(0, "chief").member_id
        header = UpdateHeader(UpdateKind.INITIAL, 0, LAYOUT, encoding="int8")
        with pytest.raises(refusals.InvalidRequest, match="An initial model travels as it is"):
            await ps.receive(member, header, never_read())

    asyncio.run(scenario())


@pytest.mark.parametrize("name, spoil, refusal", [
    ("int8", lambda parts: parts[3].fill(np.nan), refusals.NotFinite),            # a scale
    ("int8", lambda parts: parts[3].fill(3e38), refusals.NotFinite),              # 127 x 3e38 overflows
    ("bfloat16", lambda parts: parts[0].fill(0x7F80), refusals.NotFinite),        # +Inf
    ("float16", lambda parts: parts[1].fill(np.inf), refusals.NotFinite),
    ("topk:0.5", lambda parts: parts[0].fill(3), refusals.InvalidRequest),        # repeated indices
    ("topk:0.5", lambda parts: parts[2].fill(-5), refusals.InvalidRequest),       # below 0
])
def test_an_encoded_update_that_decodes_to_nothing_valid_is_refused_and_changes_nothing(name, spoil, refusal):
    async def scenario():
        ps = encoded_ps(name)
        a, _ = await initialized(ps)
        encoding = ps.pipeline.update_encoding
        wire = encoding.wire_layout(LAYOUT)
        encoded = Encoder(encoding, seed=0).encode(LAYOUT, update(1.0))
        parts = [view.copy() for view in wire.views(encoded)]
        spoil(parts)
        header = UpdateHeader(UpdateKind.DELTA, 1, LAYOUT, 10, encoding=encoding.name)
        with pytest.raises(refusal):
            await ps.receive(a, header, bytes_of(wire.pack(parts)))
        return ps

    ps = asyncio.run(scenario())
    np.testing.assert_array_equal(model_values(ps)[0], 0)
    assert ps.rounds.contributors == set()


@pytest.mark.parametrize("extra", [-1, 1])
def test_an_encoded_update_of_the_wrong_size_is_refused(extra):
    async def scenario():
        ps = encoded_ps("int8")
        a, _ = await initialized(ps)
        encoded = Encoder(ps.pipeline.update_encoding, seed=0).encode(LAYOUT, update(1.0)).tobytes()
        stream = encoded[:extra] if extra < 0 else encoded + bytes(extra)
        header = UpdateHeader(UpdateKind.DELTA, 1, LAYOUT, 10, encoding="int8")
        with pytest.raises((refusals.TruncatedStream, refusals.OversizedStream)):
            await ps.receive(a, header, bytes_of(np.frombuffer(stream, np.uint8)))

    asyncio.run(scenario())


# --- Training through each encoding ----------------------------------------------------------------------


def federated_softmax_regression(name: str, rounds: int = 15, workers: int = 2, steps: int = 20) -> float:
    """FedAvg of a softmax regression on the digits (NumPy, full-batch gradient steps on each worker's shard),
    every update through ``name``: the test accuracy after ``rounds``."""
    data = load("digits")
    x = data.x_train.reshape(len(data.x_train), -1).astype(np.float32)
    x_test = data.x_test.reshape(len(data.x_test), -1).astype(np.float32)
    classes = data.num_classes
    layout = Layout.of([np.zeros((x.shape[1], classes), np.float32), np.zeros(classes, np.float32)])
    weights, bias = np.zeros((x.shape[1], classes), np.float32), np.zeros(classes, np.float32)
    shards = np.array_split(np.arange(len(x)), workers)
    encoders = [Encoder(encodings.parse(name), seed=task) for task in range(workers)]
    for _ in range(rounds):
        total = [np.zeros_like(weights), np.zeros_like(bias)]
        for shard, encoder in zip(shards, encoders, strict=True):
            w, b = weights.copy(), bias.copy()
            onehot = np.eye(classes, dtype=np.float32)[data.y_train[shard]]
            for _ in range(steps):
                logits = x[shard] @ w + b
                p = np.exp(logits - logits.max(axis=1, keepdims=True))
                p /= p.sum(axis=1, keepdims=True)
                grad = (p - onehot) / len(shard)
                w -= 0.5 * x[shard].T @ grad
                b -= 0.5 * grad.sum(axis=0)
            wire = encoder.encode(layout, layout.pack([w - weights, b - bias]))
            decoded = np.empty(layout.nbytes, np.uint8)
            encoder.encoding.decode(layout, wire, decoded)
            for t, view in zip(total, layout.views(decoded), strict=True):
                t += view / workers
        weights, bias = weights + total[0], bias + total[1]
    return float(((x_test @ weights + bias).argmax(axis=1) == data.y_test).mean())


def test_training_through_16_bit_and_int8_encodings_reaches_float32s_accuracy_within_half_a_point():
    reference = federated_softmax_regression("float32")
    assert reference > 0.9
    for name in ("float16", "bfloat16", "int8"):
        assert federated_softmax_regression(name) >= reference - 0.005, name
    assert federated_softmax_regression("topk:0.1") > reference - 0.03  # error feedback keeps top-k close


# --- Over gRPC: a ps process and WorkerClients -----------------------------------------------------------


def test_workers_send_what_the_ps_announces_and_decode_a_float16_model(start_ps):
    ps = start_ps("--num-workers", "2", "--rounds", "3", "--exit-grace", "5", "--update-encoding", "topk:0.5",
                  "--model-encoding", "float16")
    histories = run_clients(ps.address, [50, 150])
    assert ps.wait() == 0
    assert "Updates come in as topk:0.5; the model goes down as float16." in ps.log()
    for task in histories:
        for round, weights in histories[task]["received"].items():
            for w in weights:
                assert w.dtype == np.float32
                if round > 0:  # the chief's initial model went up as it is; every later one came down as float16
                    np.testing.assert_array_equal(w.astype(np.float16).astype(np.float32), w)
    assert len(re.findall(r"Round \d+/3: 2 updates", ps.log())) == 3


def test_a_worker_that_sends_another_encoding_than_announced_is_refused_with_invalid_argument(start_ps):
    ps = start_ps("--num-workers", "1", "--rounds", "3", "--update-encoding", "int8")
    with WorkerClient(ps.address, task_index=0) as client:
        state = client.join([np.zeros((4, 3), np.float32)])
        assert client.encoder.encoding.name == "int8"
        client.encoder = Encoder(encodings.Float16())
        with pytest.raises(PsRefusal, match=r"This ps takes updates encoded as int8 .* Received: "
                                            r"encoding='float16' \(status INVALID_ARGUMENT\)"):
            client.sync([w + 1 for w in state.weights], num_examples=10)


def test_an_update_is_encoded_once_for_every_attempt_and_again_only_for_another_encoding():
    """Retries send the same bytes (a stochastic rounding drawn again, or error feedback counted twice, would not
    be the update the worker meant); a ps restarted with another encoding gets the update in that one."""
    update = Update(pb.UPDATE_KIND_DELTA, 1, LAYOUT.pack([np.full((4, 3), 0.3, np.float32), np.ones(3, np.float32),
                                                          np.array([1], np.int64)]))
    int8 = Encoder(encodings.Int8(), seed=0)
    first = update.encoded(LAYOUT, int8)
    assert update.encoded(LAYOUT, int8) is first and update.header(LAYOUT).encoding == "int8"
    again = update.encoded(LAYOUT, Encoder(encodings.Float16()))
    assert again.nbytes == encodings.Float16().wire_layout(LAYOUT).nbytes and update.encoding == "float16"
    initial = Update(pb.UPDATE_KIND_INITIAL, 0, update.packed)
    assert initial.encoded(LAYOUT, int8) is update.packed and initial.header(LAYOUT).encoding == "float32"

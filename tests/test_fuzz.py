"""Fuzzing every decoder of untrusted input: it decodes, or it raises its own clear error.

Untrusted input reaches coMind from the network (tensor specs, update and
model streams, raw protobuf bytes), from files (checkpoints, data sets, the
token file) and from the environment (flags, COMIND_* variables,
TF_CONFIG). For each decoder, Hypothesis generates hostile input and checks
that the result is either valid or the decoder's documented error: never
another exception type, never a hang, never memory in proportion to a size
that was claimed rather than sent. See tests/fuzzing.py for the profiles
and scripts/fuzz for a longer run; tests/test_fuzz_network.py does the same
through a real ps.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import itertools
import json
import threading
import tracemalloc
import types
import zipfile

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as npst
from numpy.lib import format as npy

from comind import auth, cli, cluster_spec, config, datasets, encodings, settings
from comind.checkpoint import CheckpointStore
from comind.client import WorkerClient, read_model
from comind.encodings import EncodingError
from comind.errors import ModelMismatch, ProtocolError
from comind.npz import NpzError, NpzFile
from comind.proto import comind_pb2 as pb
from comind.rounds import MIN_LEASE_SECONDS
from comind.tensors import (
    ALLOWED_DTYPES,
    MAX_DIMS,
    MAX_TENSORS,
    Assembler,
    Layout,
    LayoutError,
    NonFiniteValues,
    OversizedStream,
    TruncatedStream,
)
from fuzzing import DTYPE_NAMES, INT64, TENSOR_SPECS

#: An error message quotes what it got, but never a whole hostile input.
MAX_MESSAGE_CHARS = 2000


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """One folder for the files every example writes (Hypothesis reruns a test, not its fixtures)."""
    return tmp_path_factory.mktemp("fuzz")


@contextlib.contextmanager
def memory_at_most(limit: int):
    """Fails if the block ever held more than ``limit`` bytes (NumPy reports its arrays to tracemalloc)."""
    tracemalloc.start()
    try:
        yield
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < limit, f"held {peak} bytes at once"


# --- Tensor specs and streams from the wire ------------------------------------------------------


def check_layout(layout: Layout, max_bytes: int) -> None:
    assert layout.nbytes <= max_bytes
    for spec in layout.specs:
        assert spec.dtype.name in ALLOWED_DTYPES and spec.dtype.byteorder in "<|="
        assert len(spec.shape) <= MAX_DIMS and min(spec.shape, default=0) >= 0
    views = layout.views(np.zeros(layout.nbytes, np.uint8))  # NumPy accepts every shape
    assert [v.shape for v in views] == [s.shape for s in layout.specs]


@given(st.lists(TENSOR_SPECS, max_size=5), st.integers(0, 1 << 16))
@example([pb.TensorSpec(name="x", dtype="float32", shape=[0, 1 << 61])], 1 << 16)  # NumPy: "array is too big"
@example([pb.TensorSpec(name="x", dtype="uint8", shape=[1] * 65)], 1 << 16)       # beyond NumPy's dimensions
@example([pb.TensorSpec(name="x" * 10**6, dtype="float32\0" * 10**5, shape=[1])], 1 << 16)  # echoed whole
def test_wire_specs_become_a_usable_layout_or_a_layout_error(messages, max_bytes):
    try:
        layout = Layout.from_proto(messages, max_bytes)
    except LayoutError as error:
        assert len(str(error)) < MAX_MESSAGE_CHARS
        return
    check_layout(layout, max_bytes)


def test_a_header_of_too_many_tensors_is_refused():
    with pytest.raises(LayoutError, match=f"at most {MAX_TENSORS} tensors"):
        Layout.from_proto([pb.TensorSpec(dtype="bool")] * (MAX_TENSORS + 1), max_bytes=1 << 20)


#: Every message of the protocol, each a decoder of untrusted bytes (the ps's of the worker's, and back).
MESSAGE_TYPES = [pb.DESCRIPTOR.message_types_by_name[name]._concrete_class
                 for name in sorted(pb.DESCRIPTOR.message_types_by_name)]


def specs_in(message) -> list:
    """The tensor specs a decoded message carries: an update's header in a hello, or a model's header."""
    if isinstance(message, pb.WorkerMessage) and message.HasField("hello"):
        message = message.hello
    if isinstance(message, pb.PsMessage) and message.HasField("model"):
        message = message.model
    if isinstance(message, pb.Hello) and message.HasField("update"):
        message = message.update
    return list(message.tensors) if isinstance(message, (pb.UpdateHeader, pb.ModelHeader)) else []


@given(st.binary(max_size=200))
@example(bytes.fromhex("0a08 1a06 3204 0a02 fffe"))  # a hello's update header whose tensor name is not UTF-8
@example(bytes.fromhex("1206 2a04 0a02 fffe"))       # a model header's, likewise
@example(bytes.fromhex("0a08 1a06 3204 1202 fffe"))  # a dtype that is not UTF-8
@example(bytes.fromhex("0a06 1a04 3202 18ff"))       # a shape cut short in its varint
def test_raw_bytes_parse_or_raise_decode_error_and_headers_become_layouts(raw):
    assert {t.__name__ for t in MESSAGE_TYPES} >= {"WorkerMessage", "PsMessage", "Hello", "UpdateHeader",
                                                    "ModelHeader", "Receipt", "JoinRequest", "JoinReply"}
    for message_type in MESSAGE_TYPES:
        try:
            message = message_type.FromString(raw)
        except DecodeError:
            continue
        with contextlib.suppress(LayoutError):
            check_layout(Layout.from_proto(specs_in(message), 1 << 16), 1 << 16)


ARRAYS = st.lists(npst.arrays(st.sampled_from(["<f4", ">f8", "<f2", "<i8", "|u1", "|b1"]),
                              npst.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)),
                  min_size=1, max_size=4).map(
    lambda arrays: [np.array(np.nan_to_num(a), a.dtype) for a in arrays])  # finite to start


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (taken modulo its length), as chunks may arrive."""
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@given(ARRAYS, st.lists(st.integers(0, 1 << 12), max_size=6), st.integers(-8, 8), st.data())
def test_assembler_rebuilds_any_stream_or_names_what_is_wrong(arrays, cuts, change, data):
    """Streams are cut anywhere, truncated, extended, or carry NaN/Inf; each has its own error."""
    layout = Layout.of(arrays)
    packed = layout.pack(arrays).tobytes()
    stream = packed[:max(len(packed) + change, 0)] if change < 0 else packed + bytes(change)
    change = len(stream) - len(packed)
    floats = [i for i, spec in enumerate(layout.specs) if spec.dtype.kind == "f" and spec.size]
    poisoned = floats and data.draw(st.booleans())
    if poisoned:
        index = data.draw(st.sampled_from(floats))
        spoiled = [a.copy() for a in arrays]
        spoiled[index].reshape(-1)[data.draw(st.integers(0, spoiled[index].size - 1))] = np.nan
        stream = layout.pack(spoiled).tobytes()[:len(stream)] + stream[len(packed):]
    assembler = Assembler(layout, check_finite=True)
    try:
        for chunk in split(stream, cuts):
            assembler.feed(chunk)
        result = assembler.finish()
    except NonFiniteValues:
        assert poisoned
    except TruncatedStream:
        assert change < 0
    except OversizedStream:
        assert change > 0
    else:
        assert change == 0 and not poisoned and result.tobytes() == packed


EXPECTED = Layout.of([np.zeros((2, 3), np.float32), np.zeros(4, np.int64)])
EXPECTED_BYTES = EXPECTED.pack([np.ones((2, 3), np.float32), np.arange(4)]).tobytes()

MODEL_HEADERS = st.builds(
    pb.ModelHeader, ready=st.booleans(), round=INT64, done=st.booleans(), total_rounds=INT64,
    tensors=st.one_of(st.just(EXPECTED.to_proto()), st.lists(TENSOR_SPECS, max_size=3)))
#: Results the protocol names, and numbers it does not (proto3 enums keep unknown values).
RECEIPTS = st.builds(pb.Receipt, round=st.one_of(st.integers(-1, 2), INT64),
                     result=st.one_of(st.sampled_from(pb.UpdateResult.values()),
                                      st.integers(-(1 << 31), (1 << 31) - 1)))
PS_MESSAGES = st.one_of(
    st.builds(pb.PsMessage, receipt=RECEIPTS),
    st.builds(pb.PsMessage, model=MODEL_HEADERS),
    st.builds(pb.PsMessage, data=st.one_of(st.binary(max_size=64), st.just(EXPECTED_BYTES))),
    st.builds(pb.PsMessage, receipt=st.one_of(RECEIPTS, st.none()), model=MODEL_HEADERS,
              data=st.one_of(st.binary(max_size=64), st.just(EXPECTED_BYTES))),
    st.just(pb.PsMessage()))
GOOD_MODEL = [pb.PsMessage(model=pb.ModelHeader(ready=True, tensors=EXPECTED.to_proto())),
              pb.PsMessage(data=EXPECTED_BYTES)]
ACCEPTED = pb.PsMessage(receipt=pb.Receipt(round=0, result=pb.UPDATE_RESULT_ACCEPTED))


@given(st.lists(PS_MESSAGES, max_size=5))
@example([])  # the ps ended the call without a word
@example([pb.PsMessage(data=EXPECTED_BYTES)])  # no header: a worker must not ask again at once, for ever
@example([*GOOD_MODEL, pb.PsMessage(model=pb.ModelHeader(ready=True))])  # a second header inside the model
@example([ACCEPTED, ACCEPTED, *GOOD_MODEL])
@example([*GOOD_MODEL[:1], ACCEPTED, *GOOD_MODEL[1:]])  # a receipt inside the model
@example([ACCEPTED])  # a receipt, and no model
@example([pb.PsMessage(receipt=ACCEPTED.receipt, model=GOOD_MODEL[0].model, data=EXPECTED_BYTES)])  # all in one
def test_a_round_call_answered_by_a_hostile_ps_decodes_or_is_refused(messages):
    receipts: list[pb.Receipt] = []
    try:
        received = read_model(iter(messages), EXPECTED, receipts.append)
    except (ModelMismatch, ProtocolError) as error:
        assert len(str(error)) < MAX_MESSAGE_CHARS
        return
    header = next(i for i, m in enumerate(messages) if m.HasField("model"))  # or read_model would have refused
    assert receipts == [m.receipt for m in messages[:header + 1] if m.HasField("receipt")]
    assert not any(m.data for m in messages[:header])
    if received is None:
        assert not messages[header].model.ready
        return
    state, packed = received
    assert (state.round, state.done) == (messages[header].model.round, messages[header].model.done)
    assert EXPECTED.mismatch(Layout.of(state.weights)) is None
    assert packed.tobytes() == EXPECTED.pack(state.weights).tobytes() == b"".join(m.data for m in messages[header:])


#: Encodings the ps may announce or a peer may claim: every one, and names that are none.
ENCODING_NAMES = st.one_of(st.sampled_from(["float32", "float16", "bfloat16", "int8", "topk:0.5", "topk:0.01",
                                            "topk:1"]),
                           st.sampled_from(["", "int4", "topk", "topk:0", "topk:nan", "topk:-1", "float16:2"]),
                           st.text(max_size=12))


def encoded_bytes(layout: Layout, encoding: encodings.Encoding, data) -> bytes:
    """An update of ``layout`` encoded as ``encoding``: its bytes as a worker makes them, mutated, or any bytes of
    the right count."""
    size = encoding.wire_layout(layout).nbytes
    honest = encoding.encode(layout, np.zeros(layout.nbytes, np.uint8), np.random.default_rng(0)).tobytes()
    return data.draw(st.one_of(
        st.binary(min_size=size, max_size=size),
        st.builds(lambda mutations: bytes(_mutated(honest, mutations)) if honest else honest,
                  st.lists(st.tuples(st.integers(0, max(size - 1, 0)), st.integers(0, 255)), max_size=4))))


@given(ARRAYS, ENCODING_NAMES, st.data())
def test_every_decoder_decodes_any_bytes_of_its_size_or_raises_encoding_error(arrays, name, data):
    """What the ps reads of an update is exactly the count the layout and the encoding give; whatever those bytes
    hold, the decoder gives an update of the layout (the ps then checks it is finite) or an EncodingError."""
    try:
        encoding = encodings.parse(name)
    except ValueError as error:
        assert "Received" in str(error) or "must be one of" in str(error)
        return
    layout = Layout.of(arrays)
    assert encoding.wire_layout(layout).nbytes <= 3 * layout.nbytes + 4 * (1 + len(layout))
    wire = np.frombuffer(encoded_bytes(layout, encoding, data), np.uint8)
    out = np.empty(layout.nbytes, np.uint8)
    try:
        encoding.decode(layout, wire, out)
    except EncodingError as error:
        assert name.startswith("topk") and len(str(error)) < MAX_MESSAGE_CHARS
        return
    for spec, view in zip(layout.specs, layout.views(out), strict=True):
        assert view.shape == spec.shape and view.dtype == spec.dtype


@given(ENCODING_NAMES, st.lists(st.binary(max_size=80), max_size=3), st.booleans())
def test_an_encoded_model_from_a_hostile_ps_decodes_or_is_refused(name, data, right_size):
    """A model header may name any encoding, and carry any bytes under it."""
    try:
        size = encodings.parse(name).wire_layout(EXPECTED).nbytes
    except ValueError:
        size = EXPECTED.nbytes
    if right_size:
        data = [bytes(size)] if not data else [b"".join(data).ljust(size, b"\1")[:size]]
    messages = [pb.PsMessage(model=pb.ModelHeader(ready=True, tensors=EXPECTED.to_proto(), encoding=name)),
                *(pb.PsMessage(data=chunk) for chunk in data)]
    try:
        received = read_model(iter(messages), EXPECTED)
    except ProtocolError as error:
        assert len(str(error)) < MAX_MESSAGE_CHARS
        return
    assert received is not None
    state, packed = received
    assert packed.nbytes == EXPECTED.nbytes and EXPECTED.mismatch(Layout.of(state.weights)) is None


class HostilePs:
    """A stand-in stub whose first Round call answers with ``answers``, and later ones with GOOD_MODEL."""

    def __init__(self, answers: list[pb.PsMessage], lease: float = 30.0):
        self.answers = answers
        self.lease = lease
        self.hellos: list[pb.Hello] = []

    def Join(self, request, **kwargs) -> pb.JoinReply:
        return pb.JoinReply(member_id="m", lease_seconds=self.lease, round=-1, total_rounds=3)

    def Round(self, requests, **kwargs):
        first = next(requests)
        assert first.HasField("hello")
        self.hellos.append(first.hello)
        return _Responses(self.answers if len(self.hellos) == 1 else GOOD_MODEL)

    def Leave(self, request, **kwargs) -> pb.Empty:
        return pb.Empty()


class _Responses:
    """A Round call's answers, as gRPC's client gives them: an iterator that can be cancelled."""

    def __init__(self, messages: list[pb.PsMessage]):
        self._messages = iter(messages)

    def __iter__(self):
        return self

    def __next__(self) -> pb.PsMessage:
        return next(self._messages)

    def cancel(self) -> None:
        pass


@given(st.lists(PS_MESSAGES, max_size=5))
@example([pb.PsMessage(receipt=pb.Receipt(round=5, result=pb.UPDATE_RESULT_ACCEPTED)), *GOOD_MODEL])  # not ours
@example([pb.PsMessage(receipt=pb.Receipt(round=0, result=99)), *GOOD_MODEL])  # a result no version knows
@example([pb.PsMessage(model=pb.ModelHeader(ready=False))])  # not yet: the chief calls again
def test_a_worker_joining_a_hostile_ps_gets_a_model_or_a_protocol_error(messages):
    """The chief's whole join: its initial model up, the ps's answers down, and another call if they say
    "not yet"."""
    client = WorkerClient("localhost:1", task_index=0)
    client._stub = ps = HostilePs(messages)
    try:
        state = client.join([np.zeros((2, 3), np.float32), np.zeros(4, np.int64)])
    except (ModelMismatch, ProtocolError) as error:
        assert len(str(error)) < MAX_MESSAGE_CHARS
        return
    finally:
        client.close()
    assert ps.hellos[0].update.kind == pb.UPDATE_KIND_INITIAL
    assert EXPECTED.mismatch(Layout.of(state.weights)) is None and client.round == state.round


@given(st.floats())
@example(float("nan"))
@example(-1.0)     # a heartbeat loop with no pause
@example(1e12)     # threading's waits overflow beyond about 9e9 s
@example(5e-324)   # positive, but a third of it is 0: a heartbeat loop with no pause
def test_a_lease_from_a_hostile_ps_is_used_or_refused(lease):
    client = WorkerClient("localhost:1")  # connects at the first call, which the stand-in stub answers
    client._stub = types.SimpleNamespace(
        Join=lambda *args, **kwargs: pb.JoinReply(member_id="m", lease_seconds=lease),
        Leave=lambda *args, **kwargs: pb.Empty())
    try:
        client._membership()
    except ProtocolError:
        assert not MIN_LEASE_SECONDS <= lease < float("inf")
    else:
        assert 0 < client._lease / 3 < threading.TIMEOUT_MAX
    finally:
        client.close()


def test_a_model_stream_claiming_a_huge_model_allocates_nothing():
    header = pb.ModelHeader(ready=True, tensors=[pb.TensorSpec(dtype="float64", shape=[1 << 27])])  # 1 GiB
    with memory_at_most(1 << 20), pytest.raises(ModelMismatch):
        read_model(iter([pb.PsMessage(model=header)]), EXPECTED)


# --- Files: .npz (checkpoints, data sets), IDX and CIFAR-10 batches --------------------------------


def npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def npy_member(header: dict, payload: bytes = b"") -> bytes:
    """A version 1 .npy member whose header is any dictionary (NumPy's writer takes only sane ones)."""
    text = repr(header).encode() + b"\n"
    return npy.magic(1, 0) + len(text).to_bytes(2, "little") + text + payload


def zipped(members: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def read_all(path) -> list[np.ndarray]:
    with NpzFile(path) as archive:
        return [archive.read(name) for name in archive.names]


GOOD_NPZ = npz_bytes(a=np.arange(10, dtype=np.float32), b=np.array(["x", "yz"]), c=np.int64(3))

MUTATIONS = st.lists(st.tuples(st.integers(0, len(GOOD_NPZ) - 1), st.integers(0, 255)), max_size=4)

HOSTILE_NPY_HEADERS = st.fixed_dictionaries({
    "descr": st.one_of(DTYPE_NAMES, st.sampled_from(["|O", "<U0", "|S0", "|V0", [("a", "<f4", (1 << 40,))]])),
    "fortran_order": st.booleans(),
    "shape": st.lists(st.one_of(st.integers(0, 4), INT64), max_size=4).map(tuple)})


@given(st.one_of(
    st.binary(max_size=300),
    st.builds(lambda mutations, cut: bytes(_mutated(GOOD_NPZ, mutations))[:cut], MUTATIONS,
              st.integers(0, len(GOOD_NPZ))),
    st.builds(lambda header, payload, method: zipped({"x.npy": npy_member(header, payload)}, method),
              HOSTILE_NPY_HEADERS, st.binary(max_size=64), st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED,
                                                                          zipfile.ZIP_BZIP2])),
    st.builds(lambda text: zipped({"x.npy": b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text}),
              st.binary(max_size=100)),
))
@example(zipped({"x.npy": npy_member({"descr": "<f8", "fortran_order": False, "shape": (1 << 50,)})}))
@example(zipped({"x.npy": npy_member({"descr": "|S0", "fortran_order": False, "shape": (1 << 62,)})}))
@example(zipped({"x.npy": npy_member({"descr": "|O", "fortran_order": False, "shape": (1,)}, b"\x80\x04N.")}))
@example(np.lib.format.magic(1, 0) + b"not an archive")  # a .npy file named .npz
def test_an_npz_file_reads_or_raises_npz_error(scratch, contents):
    path = scratch / "any.npz"
    path.write_bytes(contents)
    try:
        arrays = read_all(path)
    except NpzError as error:
        assert str(path) in str(error)
        return
    assert all(not a.dtype.hasobject for a in arrays)


def _mutated(data: bytes, mutations) -> bytearray:
    changed = bytearray(data)
    for position, value in mutations:
        changed[position] = value
    return changed


def test_an_npz_file_claiming_a_huge_array_is_refused_before_any_allocation(scratch):
    path = scratch / "bomb.npz"
    path.write_bytes(zipped({"x.npy": npy_member({"descr": "<f4", "fortran_order": False, "shape": (1 << 28,)})},
                            zipfile.ZIP_DEFLATED))
    with memory_at_most(1 << 20), pytest.raises(NpzError, match=r"claims a float32 array of shape \(268435456,\)"):
        read_all(path)


CHECKPOINT_ARRAYS = npst.arrays(
    st.one_of(npst.scalar_dtypes(), npst.unicode_string_dtypes(), npst.array_dtypes(), st.just(np.dtype(">f4"))),
    npst.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=3))


@given(st.fixed_dictionaries({}, optional={"round": CHECKPOINT_ARRAYS, "names": CHECKPOINT_ARRAYS,
                                           "tensor_00000": CHECKPOINT_ARRAYS, "tensor_00001": CHECKPOINT_ARRAYS}))
@example({"round": np.float64(np.inf), "names": np.array(["a"]), "tensor_00000": np.zeros(1)})
@example({"round": np.arange(2), "names": np.array(["a"]), "tensor_00000": np.zeros(1)})
@example({"round": np.int64(1), "names": np.array("a"), "tensor_00000": np.zeros(1)})
@example({"round": np.int64(1), "names": np.array(["a", "b"]), "tensor_00000": np.zeros(1, ">f4"),
          "tensor_00001": np.ones((2, 2), np.uint8)})
@pytest.mark.filterwarnings("ignore:Stored array in format")  # field names beyond Latin-1: .npy version 3
def test_a_damaged_checkpoint_is_read_or_refused_with_a_clear_error(scratch, arrays):
    folder = scratch / "checkpoints"
    folder.mkdir(exist_ok=True)
    (folder / "round-000000001.npz").write_bytes(npz_bytes(**arrays))
    try:
        checkpoint = CheckpointStore(folder).latest()
    except ValueError as error:  # the only checkpoint is unreadable: the ps refuses to start
        assert f"None of the 1 checkpoints in {folder} is readable" in str(error)
        return
    assert checkpoint is not None
    assert checkpoint.round == 1 and checkpoint.packed.nbytes == checkpoint.layout.nbytes
    assert [s.name for s in checkpoint.layout.specs] == [str(n) for n in arrays["names"]]


def test_a_file_named_with_other_scripts_digits_is_no_checkpoint(tmp_path):
    (tmp_path / "round-٠٠٠٠٠٠٠٠٩.npz").write_bytes(b"")
    assert CheckpointStore(tmp_path).rounds() == []


DATA_ARRAYS = npst.arrays(
    st.one_of(npst.integer_dtypes(), npst.unsigned_integer_dtypes(), npst.floating_dtypes(), npst.boolean_dtypes(),
              npst.unicode_string_dtypes()),
    npst.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3))


@given(st.fixed_dictionaries({key: DATA_ARRAYS for key in datasets.NPZ_KEYS}))
@example({"x_train": np.zeros((2, 1)), "y_train": np.array([0, 10**12]),  # a name per class: 10**12 names
          "x_test": np.zeros((1, 1)), "y_test": np.array([0])})
@example({"x_train": np.zeros((2, 0)), "y_train": np.array([0, 1]), "x_test": np.zeros((1, 0)),
          "y_test": np.array([0])})
def test_a_users_npz_data_set_loads_or_says_what_is_wrong(scratch, arrays):
    path = scratch / "data.npz"
    path.write_bytes(npz_bytes(**arrays))
    try:
        data = datasets.load(str(path))
    except ValueError as error:
        assert str(path) in str(error)
        return
    assert data.num_classes <= datasets.MAX_CLASSES and 0 not in data.input_shape
    assert data.y_train.ndim == 1 and len(data.x_train) == len(data.y_train) > 0


IDX_MAGICS = st.sampled_from([datasets._IDX_LABELS_MAGIC, datasets._IDX_IMAGES_MAGIC])


@given(IDX_MAGICS, st.one_of(
    st.binary(max_size=64),
    st.builds(lambda magic, dims, data: magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims) + data,
              IDX_MAGICS, st.lists(st.integers(0, (1 << 32) - 1), max_size=4), st.binary(max_size=64))),
    st.booleans(), st.one_of(st.none(), st.integers(0, 100)))
@example(datasets._IDX_IMAGES_MAGIC, bytes.fromhex("00000803 00000000 a8000000 c30c3100"), False, None)  # 0 x huge
def test_an_idx_file_reads_or_raises_value_error(scratch, magic, contents, compress, cut):
    """Files of either magic, gzipped or not, whole or cut anywhere (``cut``)."""
    path = scratch / "images-idx.gz"
    path.write_bytes((gzip.compress(contents) if compress else contents)[:cut])
    try:
        array = datasets._read_idx(path, magic)
    except ValueError as error:
        assert str(path) in str(error)
        return
    assert array.dtype == np.uint8 and array.ndim == magic & 0xFF


@given(st.integers(0, 3), st.binary(max_size=8), st.integers(0, 255))
def test_a_cifar_batch_reads_or_raises_value_error(scratch, records, tail, label):
    path = scratch / "data_batch.bin"
    path.write_bytes((bytes([label]) + bytes(datasets._CIFAR_RECORD - 1)) * records + tail)
    try:
        images, labels = datasets._read_cifar_batch(path)
    except ValueError as error:
        assert str(path) in str(error)
        return
    assert images.shape == (records, 32, 32, 3) and labels.max() < 10


# --- Settings: flags, COMIND_* variables, TF_CONFIG, the token file ---------------------------------

SETTING_TEXT = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["1", "0", "-1", "2.5", "inf", "-inf", "nan", "1e999", "0x10", " 5 ", "1_000", "٣", "²",
                     "9" * 5000, "host:2222", "host:٢٢٢٢", "host:99999", "[::1]:80", ":80", "host:", "a:b:c",
                     "basic", "my_module:build", "digits", "mine.npz", "ps", "worker", "median"]))


def check_value(option: config.Option, value) -> None:
    if option.choices:
        assert value in option.choices
    elif option.parse in (config.positive_int, config.non_negative_int):
        assert isinstance(value, int) and value >= (option.parse is config.positive_int)
    elif option.parse is config.positive_float:
        assert 0 < value < float("inf")
    elif option.parse is config.address:
        port = value.rpartition(":")[2]
        assert port.isascii() and 0 <= int(port) <= 65535


@given(st.sampled_from(settings.OPTIONS), SETTING_TEXT)
def test_every_option_parses_a_value_or_says_what_it_expected(option, text):
    try:
        value = option.convert(text, option.env)
    except ValueError as error:
        assert f"{option.env} must be" in str(error) and "Received" in str(error)
        return
    check_value(option, value)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=12)
TF_CONFIGS = st.one_of(
    st.text(max_size=40),
    JSON.map(json.dumps),
    st.builds(lambda cluster, task: json.dumps({"cluster": cluster, "task": task}),
              st.dictionaries(st.sampled_from(["ps", "worker", "chief", "master", "evaluator"]),
                              st.one_of(st.lists(SETTING_TEXT, max_size=3),
                                        st.dictionaries(SETTING_TEXT, SETTING_TEXT, max_size=2), JSON), max_size=3),
              st.one_of(JSON, st.fixed_dictionaries({
                  "type": st.one_of(st.sampled_from(["ps", "worker", "chief"]), JSON),
                  "index": st.one_of(st.integers(-2, 3), JSON)}))),
)


@given(TF_CONFIGS)
@example("[" * 100_000)                               # json.loads: RecursionError
@example("1" * 5000)                                  # json.loads: ValueError, not JSONDecodeError
@example('{"cluster": {"ps": ["a:1"]}, "task": "ps"}')  # a task that is not an object
@example('{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": true}}')
def test_tf_config_gives_settings_or_a_value_error(text):
    try:
        cluster = cluster_spec.from_tf_config(text)
    except ValueError as error:
        assert "TF_CONFIG" in str(error)
        return
    assert cluster.get("role") in (None, "ps", "worker")
    assert cluster.get("task_index", 0) >= 0 and cluster.get("num_workers", 1) >= 1


@given(st.one_of(st.none(), st.sampled_from(["ps", "worker"])), st.one_of(st.none(), st.integers(-3, 3)),
       st.one_of(st.none(), SETTING_TEXT), st.one_of(st.none(), SETTING_TEXT))
@example("worker", -1, "ps:1", "w:1")  # argparse takes any int: a negative index fell through
@example("ps", -1, "ps:1,ps2:1", None)  # ... and picked the last ps's port
def test_the_original_flags_give_settings_or_a_value_error(job_name, task_index, ps_hosts, worker_hosts):
    try:
        cluster = cluster_spec.from_original_flags(job_name, task_index, ps_hosts, worker_hosts)
    except ValueError as error:
        assert "Received: --job_name" in str(error)
        return
    assert cluster.get("task_index", 0) >= 0


ENVIRONMENTS = st.dictionaries(
    st.sampled_from([o.env for o in settings.OPTIONS] + ["TF_CONFIG"]), st.one_of(SETTING_TEXT, TF_CONFIGS), max_size=6)


@given(st.sampled_from(["ps", "worker", "run", "health", "train", "local"]), ENVIRONMENTS)
def test_the_environment_gives_settings_or_a_value_error(command, environ):
    """Variables and TF_CONFIG together, as `comind run` reads them in a container."""
    flags = cli._parser().parse_args([command])
    try:
        loaded = cli._load(flags, environ)
    except ValueError as error:
        assert "Received" in str(error)
        return
    for part in (loaded.ps, loaded.worker) if isinstance(loaded, settings.LocalSettings) else (loaded,):
        for option in settings.OPTIONS:
            if getattr(part, option.name, None) is not None:
                check_value(option, getattr(part, option.name))


@given(st.one_of(st.binary(max_size=80), st.text(max_size=40).map(str.encode)))
@example(b"\xff\xfe")            # not UTF-8
@example(b"t\xc3\xb6ken\n")     # UTF-8, not ASCII: gRPC refuses it in a header (INTERNAL)
@example(b"to\nken")            # a line break inside
@example(b"t" * 5000)           # longer than a header may be
def test_a_token_file_gives_a_sendable_token_or_a_value_error(scratch, contents):
    path = scratch / "token"
    path.write_bytes(contents)
    try:
        token = auth.load_token(None, str(path))
    except ValueError as error:
        assert "token" in str(error) and "Received" in str(error)
        return
    assert token and token.isascii() and token.isprintable() and len(token) <= auth.MAX_TOKEN_BYTES

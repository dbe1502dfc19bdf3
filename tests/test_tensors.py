import numpy as np
import pytest

from comind.proto import comind_pb2 as pb
from comind.tensors import Assembler, Layout, LayoutError, NonFiniteValues, OversizedStream, TruncatedStream, chunks

ARRAYS = [np.arange(12, dtype=np.float32).reshape(3, 4), np.array([1, 2, 3], dtype=np.int64),
          np.zeros((0, 5), np.float16), np.array([0.5], dtype=">f8")]


def test_pack_and_views_round_trip_in_little_endian():
    layout = Layout.of(ARRAYS)
    packed = layout.pack(ARRAYS)
    assert packed.nbytes == layout.nbytes == 48 + 24 + 0 + 8
    for view, array in zip(layout.views(packed), ARRAYS, strict=True):
        assert view.dtype.byteorder in "<|=" and view.shape == array.shape
        np.testing.assert_array_equal(view, array)
    assert packed[-8:].tobytes() == np.array([0.5], "<f8").tobytes()


def test_proto_round_trip_and_mismatch():
    layout = Layout.of(ARRAYS, ["a", "b", "c", "d"])
    again = Layout.from_proto(layout.to_proto(), max_bytes=1000)
    assert again == layout and [s.name for s in again.specs] == ["a", "b", "c", "d"]
    other = Layout.of([ARRAYS[0].T, *ARRAYS[1:]])
    assert "tensor 0 is" in layout.mismatch(other) and "[4, 3]" in layout.mismatch(other)
    assert layout.mismatch(Layout.of(ARRAYS[:2])) == "expected 4 tensors, got 2"


@pytest.mark.parametrize("spec, words", [
    (pb.TensorSpec(name="x", dtype="object", shape=[1]), "dtype"),
    (pb.TensorSpec(name="x", dtype="float32", shape=[-1]), "negative"),
    (pb.TensorSpec(name="x", dtype="float32", shape=[1000, 1000]), "larger"),
])
def test_untrusted_specs_are_refused(spec, words):
    with pytest.raises(LayoutError, match=words):
        Layout.from_proto([spec], max_bytes=1 << 20)


def test_unsendable_dtype_is_refused_with_the_name():
    with pytest.raises(LayoutError, match=r"'w'.*complex64"):
        Layout.of([np.zeros(2, np.complex64)], ["w"])


@pytest.mark.parametrize("chunk_bytes", [1, 3, 7, 1 << 20])
def test_assembler_rebuilds_any_chunking(chunk_bytes):
    layout = Layout.of(ARRAYS)
    assembler = Assembler(layout, check_finite=True)
    for data in chunks(layout.pack(ARRAYS), chunk_bytes):
        assembler.feed(data)
    np.testing.assert_array_equal(layout.views(assembler.finish())[0], ARRAYS[0])


@pytest.mark.parametrize("chunk_bytes", [1, 5, 64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_assembler_finds_non_finite_values_wherever_chunks_split(chunk_bytes, bad):
    arrays = [a.copy() for a in ARRAYS]
    arrays[3][0] = bad  # the very last element of the stream
    layout = Layout.of(arrays)
    assembler = Assembler(layout, check_finite=True)
    with pytest.raises(NonFiniteValues, match="tensor 3"):
        for data in chunks(layout.pack(arrays), chunk_bytes):
            assembler.feed(data)


def test_assembler_refuses_short_and_long_streams():
    layout = Layout.of(ARRAYS)
    packed = layout.pack(ARRAYS).tobytes()
    short = Assembler(layout)
    short.feed(packed[:-1])
    with pytest.raises(TruncatedStream, match="79 of the 80"):
        short.finish()
    long = Assembler(layout)
    with pytest.raises(OversizedStream):
        long.feed(packed + b"\0")

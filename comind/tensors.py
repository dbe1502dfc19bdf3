"""Models as packed tensors: the layout both ends of the wire agree on.

A model is an ordered list of tensors. On the wire, and in the ps's memory,
its tensors are packed back to back as little-endian bytes with no padding;
a :class:`Layout` (one :class:`TensorSpec` per tensor) says where each one
starts. Keeping a model in one flat buffer makes streaming it a matter of
slicing, and lets the ps hold exactly one allocation per model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import numpy as np

from comind.proto import comind_pb2 as pb

#: Bytes per streamed chunk: far below gRPC's 4 MiB message limit, large
#: enough that per-message overhead is negligible.
CHUNK_BYTES = 1 << 20

#: Dtypes a model may use. Everything else (object, strings, structured
#: dtypes) is refused: the ps must never be asked to interpret arbitrary bytes.
ALLOWED_DTYPES = frozenset(
    ["float16", "float32", "float64", "int8", "int16", "int32", "int64",
     "uint8", "uint16", "uint32", "uint64", "bool"]
)


#: Limits on a layout from the wire, far above any Keras model's, that keep
#: what a header can make the ps hold in proportion to the header: a
#: checkpoint stores names as fixed-width text, as long as the longest.
MAX_TENSORS = 1 << 16
MAX_NAME_CHARS = 512
#: NumPy 1.x's limit; NumPy 2 allows 64.
MAX_DIMS = 32


class LayoutError(ValueError):
    """A tensor spec is malformed, or two layouts disagree."""


class LayoutTooLarge(LayoutError):
    """A layout that declares more bytes than the reader accepts."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype  # always little-endian
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)  # exact for any size; np.prod is slow on every update's header

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def describe(self) -> str:
        return f"{self.name or '<unnamed>'} {self.dtype.name}{list(self.shape)}"


def _le(dtype: np.dtype) -> np.dtype:
    return dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype


class Layout:
    """The specs of a model's tensors and their byte offsets in the packed form."""

    def __init__(self, specs: Sequence[TensorSpec]):
        self.specs = tuple(specs)
        offsets = [0]
        for spec in self.specs:
            offsets.append(offsets[-1] + spec.nbytes)
        self.offsets = tuple(offsets[:-1])
        self.nbytes = offsets[-1]

    def __len__(self) -> int:
        return len(self.specs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and self.mismatch(other) is None

    def __hash__(self) -> int:
        return hash(tuple((s.dtype, s.shape) for s in self.specs))

    @classmethod
    def of(cls, arrays: Sequence[np.ndarray], names: Sequence[str] | None = None) -> Layout:
        names = list(names) if names is not None else [f"tensor_{i}" for i in range(len(arrays))]
        if len(names) != len(arrays):
            raise LayoutError(
                f"Got {len(arrays)} tensors but {len(names)} names; give one name per tensor. "
                f"Received: names={names!r}"
            )
        specs = []
        for name, array in zip(names, arrays, strict=True):
            array = np.asarray(array)
            if array.dtype.name not in ALLOWED_DTYPES:
                raise LayoutError(
                    f"Tensor {name!r} has dtype {array.dtype}, which coMind cannot send; "
                    f"use one of {sorted(ALLOWED_DTYPES)}. Received: dtype={array.dtype}"
                )
            specs.append(TensorSpec(name, _le(array.dtype), tuple(int(d) for d in array.shape)))
        return cls(specs)

    @classmethod
    def from_proto(cls, messages: Sequence[pb.TensorSpec], max_bytes: int) -> Layout:
        """Builds a layout from untrusted wire specs, refusing anything odd.

        Raises:
            LayoutError: an unknown dtype, a bad shape or name, too many
                tensors, or a model larger than ``max_bytes``.
        """
        if len(messages) > MAX_TENSORS:
            raise LayoutError(f"A model may have at most {MAX_TENSORS} tensors. Received: {len(messages)} tensors")
        specs = []
        total = 0
        for i, message in enumerate(messages):
            spec = _spec_from_proto(i, message, max_bytes)
            total += spec.nbytes
            if total > max_bytes:
                raise LayoutTooLarge(
                    f"The model is larger than this ps accepts ({max_bytes} bytes); raise "
                    f"--max-model-bytes if that is intended. Received: {total}+ bytes"
                )
            specs.append(spec)
        return cls(specs)

    def to_proto(self) -> list[pb.TensorSpec]:
        return [pb.TensorSpec(name=s.name, dtype=s.dtype.name, shape=s.shape) for s in self.specs]

    def mismatch(self, other: Layout) -> str | None:
        """Says how ``other`` differs from this layout in dtype or shape, or None.

        Names are not compared: the same Keras model built in two processes
        can name its variables differently.
        """
        if len(other.specs) != len(self.specs):
            return f"expected {len(self.specs)} tensors, got {len(other.specs)}"
        for i, (mine, theirs) in enumerate(zip(self.specs, other.specs, strict=True)):
            if mine.dtype != theirs.dtype or mine.shape != theirs.shape:
                return f"tensor {i} is {theirs.describe()}, expected {mine.describe()}"
        return None

    def views(self, buffer: np.ndarray | bytes) -> list[np.ndarray]:
        """The tensors inside a packed buffer, as arrays sharing its memory."""
        return [
            np.frombuffer(buffer, dtype=spec.dtype, count=spec.size, offset=offset).reshape(spec.shape)
            for spec, offset in zip(self.specs, self.offsets, strict=True)
        ]

    def finite(self, buffer: np.ndarray | bytes) -> bool:
        """Whether every floating-point value in a packed buffer is finite."""
        return all(np.isfinite(view).all() for view in self.views(buffer) if view.dtype.kind == "f")

    def pack(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """Packs arrays of this layout into one new flat uint8 buffer."""
        buffer = np.empty(self.nbytes, dtype=np.uint8)
        for view, array in zip(self.views(buffer), arrays, strict=True):
            # "equiv" admits only a byte-order change: a wrong dtype is a bug upstream.
            np.copyto(view, np.asarray(array).reshape(view.shape), casting="equiv")
        return buffer


def _spec_from_proto(i: int, message: pb.TensorSpec, max_bytes: int) -> TensorSpec:
    what = f"Tensor {i} ({_shown(message.name)})"
    if message.dtype not in ALLOWED_DTYPES:
        raise LayoutError(f"{what} has dtype {_shown(message.dtype)}; expected one of {sorted(ALLOWED_DTYPES)}. "
                          f"Received: dtype={_shown(message.dtype)}")
    if len(message.name) > MAX_NAME_CHARS:
        raise LayoutError(f"{what} has a name longer than {MAX_NAME_CHARS} characters. "
                          f"Received: {len(message.name)} characters")
    shape = tuple(message.shape)
    if len(shape) > MAX_DIMS or any(d < 0 for d in shape):
        raise LayoutError(f"{what} needs a shape of at most {MAX_DIMS} dimensions, none negative. "
                          f"Received: shape={_shown(str(list(shape)))}")
    dtype = _le(np.dtype(message.dtype))
    # NumPy refuses a shape whose non-zero dimensions span too many bytes, even with a zero among them.
    if 0 in shape and math.prod(d for d in shape if d) * dtype.itemsize > max_bytes:
        raise LayoutError(f"{what} is empty, but its other dimensions span more than the {max_bytes} bytes "
                          f"this ps accepts for a model. Received: shape={list(shape)}")
    return TensorSpec(message.name, dtype, shape)


def _shown(text: str, limit: int = 80) -> str:
    """``text`` quoted for an error message, cut short: it may be megabytes of anything."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def chunks(buffer: np.ndarray, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Slices a packed buffer into the byte strings that ``data`` fields carry."""
    view = memoryview(buffer.data).cast("B")
    for start in range(0, len(view), chunk_bytes):
        yield bytes(view[start:start + chunk_bytes])


class StreamError(ValueError):
    """A streamed model was not what its header promised."""


class TruncatedStream(StreamError):
    pass


class OversizedStream(StreamError):
    pass


class NonFiniteValues(StreamError):
    pass


class Assembler:
    """Reassembles a streamed model into a packed buffer, checking as it goes.

    With ``check_finite``, each newly completed stretch of a float tensor is
    checked while it is still in cache, so a NaN is caught without a second
    pass over the model.
    """

    def __init__(self, layout: Layout, check_finite: bool = False, buffer: np.ndarray | None = None):
        self.layout = layout
        self.buffer = np.empty(layout.nbytes, dtype=np.uint8) if buffer is None else buffer
        self.received = 0
        self._check_finite = check_finite
        self._checked = 0  # bytes before this offset passed the finite check
        self._tensor = 0   # index of the tensor holding byte `_checked`

    def feed(self, data: bytes) -> None:
        end = self.received + len(data)
        if end > self.layout.nbytes:
            raise OversizedStream(
                f"stream carries more than the {self.layout.nbytes} bytes its header declared "
                f"(at least {end})"
            )
        self.buffer[self.received:end] = np.frombuffer(data, dtype=np.uint8)
        self.received = end
        if self._check_finite:
            self._check_up_to(end)

    def _check_up_to(self, end: int) -> None:
        specs, offsets = self.layout.specs, self.layout.offsets
        while self._tensor < len(specs):
            spec, start = specs[self._tensor], offsets[self._tensor]
            stop = start + spec.nbytes
            item = spec.dtype.itemsize
            upto = start + (min(end, stop) - start) // item * item
            if spec.dtype.kind == "f" and upto > self._checked:
                values = np.frombuffer(self.buffer, dtype=spec.dtype,
                                       count=(upto - self._checked) // item, offset=self._checked)
                if not np.isfinite(values).all():
                    raise NonFiniteValues(f"tensor {self._tensor} ({spec.describe()}) holds NaN or Inf")
            self._checked = upto
            if upto < stop:
                return
            self._tensor += 1

    def finish(self) -> np.ndarray:
        if self.received != self.layout.nbytes:
            raise TruncatedStream(
                f"stream ended after {self.received} of the {self.layout.nbytes} bytes its "
                f"header declared"
            )
        return self.buffer

"""How an update travels to the ps, and the model back: the encode stage (docs/design.md, decision 11).

The ps chooses one encoding for every update (``--update-encoding``) and
announces it when a worker joins; the worker encodes the floating-point
tensors of its change with it, and integer and boolean tensors travel as they
are. The ps decodes an update before it validates it. Choices:

* ``float32``: the values as they are, at the model's dtype (float32 for
  every built-in model); nothing to decode.
* ``float16``: IEEE half precision, rounded to nearest even (NumPy's cast);
  values beyond its range saturate at +-65504. Half the bytes.
* ``bfloat16``: the upper 16 bits of each float32, rounded to nearest even
  (NumPy bit manipulation, no extra dependency); float32's range, 8 bits of
  precision. Half the bytes.
* ``int8``: the update's floating-point values, in model order, as one
  vector cut into blocks of :data:`INT8_BLOCK`; one float32 scale per block
  (its largest magnitude over 127) and one int8 per value, rounded
  stochastically, so that the decoded value's expectation is the value
  (unbiased; Alistarh et al. 2017, QSGD). A quarter of the bytes, plus the
  scales.
* ``topk:FRACTION``: of each floating-point tensor, the FRACTION of its
  coordinates largest in magnitude (at least one), as their indices and
  values; the worker keeps what it did not send and adds it to its next
  update (error feedback: Seide et al. 2014, Stich et al. 2018). The
  residual lives in the worker's memory only: a restarted worker starts
  from none, and what its predecessor had not sent yet is lost.

The model goes down at the model's dtype, or as ``float16``
(``--model-encoding``), which workers decode back to the model's dtype.

Every encoding's bytes on the wire follow from the model's layout alone
(:meth:`Encoding.wire_layout`): the ps knows how many bytes to read before it
reads one, and allocates nothing that a header merely claims.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from comind.registry import Registry
from comind.tensors import Layout, TensorSpec

FLOAT32 = "float32"
#: Values per int8 block, each block with one float32 scale: 1 + 4/8192 bytes a value, 0.25012 of float32's.
INT8_BLOCK = 8192
#: What `--model-encoding` offers: deterministic encodings whose decoded model every worker shares.
MODEL_ENCODINGS = (FLOAT32, "float16")

_FLOAT16_MAX = float(np.finfo(np.float16).max)


class EncodingError(ValueError):
    """Encoded bytes that decode to no update of the layout (indices out of range, or repeated)."""


class Encoding(Protocol):
    #: The name the ps announces and every update's header repeats (``topk:0.01``).
    name: str
    #: Whether the bytes sent are the values as they are (nothing to decode).
    identity: bool
    #: Whether the worker keeps what was not sent and adds it to its next update.
    error_feedback: bool

    def wire_layout(self, layout: Layout) -> Layout:
        """The layout of the encoded bytes of an update of ``layout``."""

    def encode(self, layout: Layout, packed: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``packed`` (an update in ``layout``) encoded, packed in :meth:`wire_layout`."""

    def decode(self, layout: Layout, wire: np.ndarray, out: np.ndarray) -> None:
        """Writes the update that ``wire`` encodes into ``out`` (packed in ``layout``).

        Raises:
            EncodingError: ``wire`` encodes no update of ``layout``.
        """


def _floating(spec: TensorSpec) -> bool:
    return spec.dtype.kind == "f"


class _PerTensor:
    """An encoding that turns each floating-point tensor into parts of its own; other tensors go as they are."""

    name = ""
    identity = False
    error_feedback = False

    def __init__(self) -> None:
        self._cached: tuple[Layout, Layout] | None = None

    def parts(self, spec: TensorSpec) -> list[TensorSpec]:
        raise NotImplementedError

    def encode_tensor(self, values: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        raise NotImplementedError

    def decode_tensor(self, parts: list[np.ndarray], out: np.ndarray) -> None:
        raise NotImplementedError

    def wire_layout(self, layout: Layout) -> Layout:
        if self._cached is not None and self._cached[0] is layout:
            return self._cached[1]
        specs = [part for spec in layout.specs for part in (self.parts(spec) if _floating(spec) else [spec])]
        wire = Layout(specs)
        self._cached = (layout, wire)
        return wire

    def encode(self, layout: Layout, packed: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        arrays: list[np.ndarray] = []
        for spec, view in zip(layout.specs, layout.views(packed), strict=True):
            arrays += self.encode_tensor(view.reshape(-1), rng) if _floating(spec) else [view]
        return self.wire_layout(layout).pack(arrays)

    def decode(self, layout: Layout, wire: np.ndarray, out: np.ndarray) -> None:
        parts = iter(self.wire_layout(layout).views(wire))
        for spec, target in zip(layout.specs, layout.views(out), strict=True):
            if not _floating(spec):
                target[...] = next(parts)
                continue
            with np.errstate(over="ignore"):  # a value beyond a float16 tensor's range: Inf, which the ps refuses
                self.decode_tensor([next(parts) for _ in self.parts(spec)], target.reshape(-1))


class Float32(_PerTensor):
    name = FLOAT32
    identity = True

    def wire_layout(self, layout: Layout) -> Layout:
        return layout

    def encode(self, layout: Layout, packed: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return packed

    def decode(self, layout: Layout, wire: np.ndarray, out: np.ndarray) -> None:
        out[...] = wire


class Float16(_PerTensor):
    name = "float16"

    def parts(self, spec: TensorSpec) -> list[TensorSpec]:
        return [TensorSpec(spec.name, np.dtype("<f2"), (spec.size,))]

    def encode_tensor(self, values: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        return [np.clip(values, -_FLOAT16_MAX, _FLOAT16_MAX).astype(np.float16)]

    def decode_tensor(self, parts: list[np.ndarray], out: np.ndarray) -> None:
        out[...] = parts[0]


class BFloat16(_PerTensor):
    name = "bfloat16"

    def parts(self, spec: TensorSpec) -> list[TensorSpec]:
        return [TensorSpec(spec.name, np.dtype("<u2"), (spec.size,))]

    def encode_tensor(self, values: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        return [to_bfloat16(values)]

    def decode_tensor(self, parts: list[np.ndarray], out: np.ndarray) -> None:
        out[...] = from_bfloat16(parts[0])


def to_bfloat16(values: np.ndarray) -> np.ndarray:
    """The bfloat16 bits (as uint16) of ``values``, rounded to nearest, ties to even; NaN stays NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    with np.errstate(over="ignore"):  # only NaNs' bits wrap around, and they are replaced
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    half = rounded.astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        half[nan] = 0x7FC0
    return half


def from_bfloat16(half: np.ndarray) -> np.ndarray:
    """float32 values from bfloat16 bits (uint16): exact."""
    return (half.astype(np.uint32) << np.uint32(16)).view(np.float32)


class Int8:
    """Blockwise int8 over the update's floating-point values as one vector; see the module's docstring."""

    name = "int8"
    identity = False
    error_feedback = False

    def __init__(self, block: int = INT8_BLOCK):
        self.block = block
        self._cached: tuple[Layout, Layout] | None = None

    def wire_layout(self, layout: Layout) -> Layout:
        if self._cached is not None and self._cached[0] is layout:
            return self._cached[1]
        specs = [TensorSpec(s.name, np.dtype("i1"), (s.size,)) if _floating(s) else s for s in layout.specs]
        count = sum(s.size for s in layout.specs if _floating(s))
        wire = Layout([*specs, TensorSpec("int8-scales", np.dtype("<f4"), (-(-count // self.block),))])
        self._cached = (layout, wire)
        return wire

    def encode(self, layout: Layout, packed: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        views = layout.views(packed)
        floats = [v.reshape(-1) for s, v in zip(layout.specs, views, strict=True) if _floating(s)]
        values = np.concatenate([np.zeros(0, np.float32), *floats], dtype=np.float32)
        quantized, scales = quantize(values, rng, self.block)
        arrays: list[np.ndarray] = []
        start = 0
        for spec, view in zip(layout.specs, views, strict=True):
            if _floating(spec):
                arrays.append(quantized[start:start + spec.size])
                start += spec.size
            else:
                arrays.append(view)
        return self.wire_layout(layout).pack([*arrays, scales])

    def decode(self, layout: Layout, wire: np.ndarray, out: np.ndarray) -> None:
        *parts, scales = self.wire_layout(layout).views(wire)
        offset = 0
        for spec, part, target in zip(layout.specs, parts, layout.views(out), strict=True):
            if _floating(spec):
                # The scale of each value: that of its block in the vector of every floating-point value.
                first, stop = offset // self.block, -(-(offset + spec.size) // self.block)
                edges = np.clip(np.arange(first, stop + 1, dtype=np.int64) * self.block, offset, offset + spec.size)
                with np.errstate(over="ignore"):  # a hostile scale: Inf, which the ps's finite check refuses
                    target.reshape(-1)[...] = part * np.repeat(scales[first:stop], np.diff(edges))
                offset += spec.size
            else:
                target[...] = part


def quantize(values: np.ndarray, rng: np.random.Generator, block: int = INT8_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Blockwise int8 with stochastic rounding: ``q * scale[block]`` is ``values`` in expectation.

    Returns:
        One int8 per value and one float32 scale per block of ``block`` values.
    """
    count = len(values)
    blocks = -(-count // block)
    flat = np.zeros(blocks * block, np.float32)
    flat[:count] = values
    padded = flat.reshape(blocks, block)
    scales = (np.abs(padded).max(axis=1, initial=0.0) / np.float32(127)).astype(np.float32)
    inverse = np.divide(np.float32(1), scales, out=np.zeros_like(scales), where=scales > 0)
    scaled = padded * inverse[:, None]
    scaled += rng.random(scaled.shape, dtype=np.float32)
    quantized = np.clip(np.floor(scaled), -127, 127).astype(np.int8).reshape(-1)[:count]
    return quantized, scales


class TopK(_PerTensor):
    """The largest-magnitude ``fraction`` of each floating-point tensor's coordinates."""

    error_feedback = True

    def __init__(self, fraction: float):
        super().__init__()
        if not 0 < fraction <= 1:
            raise ValueError
        self.fraction = fraction
        self.name = f"topk:{fraction!r}"

    def kept(self, size: int) -> int:
        """Coordinates sent of a tensor of ``size``: the fraction, at least one."""
        return min(size, max(1, int(self.fraction * size)))

    def parts(self, spec: TensorSpec) -> list[TensorSpec]:
        k = self.kept(spec.size)
        index = np.dtype("<i4") if spec.size < 1 << 31 else np.dtype("<i8")
        return [TensorSpec(spec.name + "/indices", index, (k,)), TensorSpec(spec.name, spec.dtype, (k,))]

    def encode_tensor(self, values: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        k, size = self.kept(values.size), values.size
        indices = np.arange(size) if k == size else np.argpartition(np.abs(values), size - k)[size - k:]
        indices.sort()
        return [indices.astype(np.int32 if size < 1 << 31 else np.int64), values[indices]]

    def decode_tensor(self, parts: list[np.ndarray], out: np.ndarray) -> None:
        indices, values = parts
        if len(indices) and (indices[0] < 0 or indices[-1] >= out.size or not (np.diff(indices) > 0).all()):
            raise EncodingError(f"top-k indices must rise strictly, from 0 to below the tensor's {out.size} "
                                f"values. Received: indices from {indices.min()} to {indices.max()}")
        out[...] = 0
        out[indices] = values


#: The update encodings; each entry makes an encoding from the text after its name's colon (None: none given).
ENCODINGS: Registry[type] = Registry("COMIND_UPDATE_ENCODING")
ENCODINGS.register(FLOAT32)(Float32)
ENCODINGS.register("float16")(Float16)
ENCODINGS.register("bfloat16")(BFloat16)
ENCODINGS.register("int8")(Int8)
ENCODINGS.register("topk")(TopK)

#: What each choice takes after a colon.
PARAMETERS = {"topk": "FRACTION"}
#: How the settings name the choices.
DESCRIPTION = ", ".join(f"{n}:{PARAMETERS[n]}" if n in PARAMETERS else n for n in ENCODINGS.names())


def parse(text: str) -> Encoding:
    """The encoding that ``text`` names (``int8``, ``topk:0.01``); ``""`` is ``float32``.

    Raises:
        ValueError: no such encoding, or a parameter it does not take.
    """
    name, colon, parameter = (text or FLOAT32).partition(":")
    factory = ENCODINGS[name]
    if name in PARAMETERS:
        try:
            fraction = float(parameter)
            encoding: Encoding = factory(fraction)
        except ValueError:
            raise ValueError(f"{name} takes a fraction of each tensor's values to send, above 0 and at most 1: "
                             f"{name}:0.01 sends the largest 1%. Received: {text!r}") from None
        return encoding
    if colon:
        raise ValueError(f"{name} takes no parameter. Received: {text!r}")
    return factory()


class Encoder:
    """A worker's side of the encode stage: the ps's encoding, its random numbers, and the error feedback.

    Args:
        encoding: what the ps announced.
        seed: for the stochastic rounding (tests); None: fresh entropy.
    """

    def __init__(self, encoding: Encoding, seed: int | None = None):
        self.encoding = encoding
        self.rng = np.random.default_rng(seed)
        #: What was not sent yet (error feedback), packed in the layout; None until the first update.
        self.residual: np.ndarray | None = None

    def encode(self, layout: Layout, change: np.ndarray) -> np.ndarray:
        """``change`` (packed in ``layout``) encoded for the wire; with error feedback, plus the residual,
        and the residual becomes what this encoding leaves out of that sum."""
        if not self.encoding.error_feedback:
            return self.encoding.encode(layout, change, self.rng)
        if self.residual is None or self.residual.nbytes != layout.nbytes:
            self.residual = np.zeros(layout.nbytes, np.uint8)
        compensated = change.copy()
        floats = [i for i, spec in enumerate(layout.specs) if _floating(spec)]
        views, residuals = layout.views(compensated), layout.views(self.residual)
        for i in floats:
            np.add(views[i], residuals[i], out=views[i])
        wire = self.encoding.encode(layout, compensated, self.rng)
        sent = np.empty_like(compensated)
        self.encoding.decode(layout, wire, sent)
        sent_views = layout.views(sent)
        for i in floats:
            np.subtract(views[i], sent_views[i], out=residuals[i])
        return wire

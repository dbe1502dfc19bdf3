"""Secure aggregation's primitives, all from maintained libraries: X25519 key agreement, HKDF-SHA256,
ChaCha20-Poly1305 (``cryptography``); ChaCha20 as the mask PRG; Shamir's secret sharing over GF(2^128)
(``pycryptodome``). No statistical RNG touches a key, a mask or a share."""

from __future__ import annotations

import functools
import hashlib
import os
import struct

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir, _Element
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from comind.secagg.errors import ForgedShare, InvalidMessage

KEY_BYTES = 32
#: A secret (a mask key or a self-mask seed) is 32 bytes; Shamir works on 16, so it is shared in two pieces.
SECRET_BYTES = 32
_PIECE = 16
NONCE_BYTES = 12
#: The room update_into asks beyond its input (a block, less one byte).
_SPARE = 63
#: Masks are drawn a MiB of keystream at a time.
_CHUNK = 1 << 20
_ZEROS = memoryview(bytes(_CHUNK))
_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


def new_private_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(*_RAW)


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def private_key(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def new_seed() -> bytes:
    return os.urandom(SECRET_BYTES)


def agree(private: X25519PrivateKey, peer_public: bytes, info: bytes) -> bytes:
    """A 32-byte key only the two holders of these key pairs can derive, bound to ``info``.

    Raises:
        InvalidMessage: ``peer_public`` is no X25519 public key (or a low-order point).
    """
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as error:
        raise InvalidMessage(f"A public key is not a usable X25519 key: {error}") from None
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=None, info=info).derive(shared)


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """ChaCha20-Poly1305 with a random nonce, which leads the result."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, sealed: bytes, associated: bytes) -> bytes:
    """What :func:`seal` sealed, if ``key`` and ``associated`` are those it was sealed with.

    Raises:
        ForgedShare: it was altered, or sealed under another key or for another context.
    """
    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated)
    except (InvalidTag, ValueError):
        raise ForgedShare("A share does not decrypt: it was altered, or sealed for another round, sender or "
                          "recipient.") from None


class Masks:
    """Adds masks of ``size`` ring elements to arrays in place, each the ChaCha20 keystream of its key, drawn into
    one buffer kept for every mask: a fresh buffer a mask (400 KB for a 0.4 MB model) cost page faults and
    allocations near the keystream's own cost."""

    def __init__(self, size: int):
        self.size = size
        self._buffer = bytearray(4 * size + _SPARE)  # update_into asks for a block's room beyond its input
        self._mask = np.frombuffer(self._buffer, "<u4", count=size)

    def apply(self, total: np.ndarray, key: bytes, sign: int) -> None:
        """``total`` +/-= the mask of ``key`` in the ring (uint32 wraps modulo 2^32)."""
        nbytes, view = 4 * self.size, memoryview(self._buffer)
        # Every key is fresh for its round and pair, so one stream per key needs no nonce of its own.
        encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
        # update_into, a chunk of zeros at a time: update() and a fresh input of the mask's size each allocate
        # and fill as much again, which made the keystream a third as fast.
        for start in range(0, nbytes, _CHUNK):
            length = min(_CHUNK, nbytes - start)
            encryptor.update_into(_ZEROS[:length], view[start:start + length + _SPARE])
        (np.add if sign > 0 else np.subtract)(total, self._mask, out=total)


def shuffled(items: list[int], seed: bytes) -> list[int]:
    """``items`` in an order drawn from ``seed`` (Fisher-Yates on a ChaCha20 keystream, without modulo bias)."""
    out = list(items)
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    for i in range(len(out) - 1, 0, -1):
        bound = i + 1
        limit = (1 << 64) - (1 << 64) % bound  # words at or above it would favour the low values
        while (word := struct.unpack("<Q", stream.update(bytes(8)))[0]) >= limit:
            pass
        j = word % bound
        out[i], out[j] = out[j], out[i]
    return out


def split(secret: bytes, threshold: int, holders: int) -> list[bytes]:
    """``holders`` shares of a 32-byte ``secret``, any ``threshold`` of which rebuild it; share i is for the
    holder at index i (Shamir's x = i + 1)."""
    pieces = [Shamir.split(threshold, holders, secret[i:i + _PIECE]) for i in range(0, SECRET_BYTES, _PIECE)]
    return [b"".join(piece[h][1] for piece in pieces) for h in range(holders)]


#: By nibble of y (the lowest first), c times each of its 16 values shifted into place (pycryptodome's encoding:
#: bit i of an integer is the coefficient of x^i).
_ProductTables = tuple[tuple[int, ...], ...]


def combine(shares: dict[int, bytes]) -> bytes:
    """The secret that shares (by holder index, as :func:`split` gave them) rebuild.

    The interpolation at 0 that pycryptodome's ``Shamir.combine`` does, in its field GF(2^128), with the Lagrange
    coefficients of a set of holders computed once, and their products by tables (:func:`_product_tables`):
    pycryptodome multiplies in pure Python, 128 rounds of big-integer arithmetic (0.2 ms a product), and the ps's
    rebuilds of 8 seeds were 13 ms, a fifth of a round of 8 workers, on the round's critical path. The lookups,
    indexed by the shares, take more or less time with them: the ps only rebuilds secrets it is meant to learn,
    and workers split theirs with pycryptodome.
    """
    tables = _lagrange_at_zero(tuple(index + 1 for index in shares))
    pieces = []
    for i in range(0, SECRET_BYTES, _PIECE):
        secret = 0
        for table, share in zip(tables, shares.values(), strict=True):
            secret ^= _times(table, int.from_bytes(share[i:i + _PIECE], "big"))  # + in GF(2^n) is xor
        pieces.append(secret.to_bytes(_PIECE, "big"))
    return b"".join(pieces)


@functools.lru_cache(maxsize=16)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[_ProductTables, ...]:
    """l_j(0) = prod_{m != j} x_m / (x_j - x_m) for Shamir's x coordinates ``xs`` (in GF(2^n), minus is plus), as
    tables of their products."""
    if len(set(xs)) != len(xs):
        raise ValueError(f"Duplicate share. Received: holders {xs}")
    coefficients = []
    for j, x_j in enumerate(xs):
        numerator, denominator = _Element(1), _Element(1)
        for m, x_m in enumerate(xs):
            if m != j:
                numerator *= _Element(x_m)
                denominator *= _Element(x_j) + _Element(x_m)
        coefficients.append(_product_tables(int(numerator * denominator.inverse())))
    return tuple(coefficients)


def _product_tables(c: int) -> _ProductTables:
    """Tables of ``c`` times every nibble in every place: y -> c y is linear over GF(2), so c y is the xor of c
    times each of y's 32 nibbles in its place (:func:`_times`)."""
    tables = []
    for _ in range(128 // 4):
        powers = [c]  # c x^(4j), c x^(4j+1), c x^(4j+2), c x^(4j+3)
        for _ in range(3):
            powers.append(_times_x(powers[-1]))
        table = [0] * 16
        for nibble in range(1, 16):
            low = nibble & -nibble
            table[nibble] = table[nibble ^ low] ^ powers[low.bit_length() - 1]
        tables.append(tuple(table))
        c = _times_x(powers[-1])
    return tuple(tables)


def _times_x(value: int) -> int:
    """``value`` x, reduced by pycryptodome's irreducible polynomial (x^128 + x^7 + x^2 + x + 1)."""
    value <<= 1
    return value ^ _Element.irr_poly if value >> 128 else value


def _times(tables: _ProductTables, y: int) -> int:
    """c y, c being the element ``tables`` were made for (:func:`_product_tables`)."""
    product = 0
    for table in tables:
        product ^= table[y & 15]
        y >>= 4
    return product


def commitment(context: bytes, share: bytes) -> bytes:
    """SHA-256 of a share in its context: lets the ps tell a share revealed at unmasking from a forged one,
    and (the share being 32 uniform bytes) reveals nothing of it."""
    return hashlib.sha256(context + share).digest()

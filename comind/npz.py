"""Reading ``.npz`` files that may be damaged or hostile.

``np.load`` trusts each array's header: a 500-byte file whose header claims
a petabyte-sized array makes it allocate that much before it reads a byte.
:class:`NpzFile` first checks every claimed size against what the archive
can hold, never unpickles, and turns every way the file can be malformed
into one :class:`NpzError` that names the file.
"""

from __future__ import annotations

import contextlib
import math
import os
import tokenize
import zipfile
import zlib
from collections.abc import Iterator
from typing import IO

import numpy as np
from numpy.lib import format as npy

#: How many times its stored size a member may unpack to. Deflate's longest
#: match (258 bytes) takes at least two bits, so it expands at most about
#: 1032 times; numpy.savez stores and numpy.savez_compressed deflates, and
#: other methods, with no such bound, are refused.
_MAX_EXPANSION = {zipfile.ZIP_STORED: 1, zipfile.ZIP_DEFLATED: 1032}

_HEADER_READERS = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}

# What zipfile, zlib and numpy raise for a malformed archive or array; numpy
# re-reads a header it cannot parse as Python 2 wrote it, with tokenize.
_MALFORMED = (OSError, EOFError, zipfile.BadZipFile, zlib.error, ValueError, NotImplementedError, tokenize.TokenError)


class NpzError(ValueError):
    """A ``.npz`` file is missing, unreadable, or not made of plain arrays."""


class NpzFile:
    """An open ``.npz`` archive whose arrays are read one at a time, each checked first.

    Raises:
        NpzError: from every method, naming the file and what is wrong with it.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        with _reading(self.path):
            self._size = os.path.getsize(self.path)
            self._archive = zipfile.ZipFile(self.path)
        self._members = {info.filename.removesuffix(".npy"): info for info in self._archive.infolist()}

    @property
    def names(self) -> list[str]:
        return list(self._members)

    def read(self, name: str) -> np.ndarray:
        info = self._members.get(name)
        if info is None:
            raise NpzError(f"{self.path} has no array {name!r}. It has: {', '.join(self._members) or 'nothing'}.")
        with _reading(self.path), self._archive.open(info) as file:
            self._check_size(info, file)
            file.seek(0)
            return npy.read_array(file, allow_pickle=False)

    def _check_size(self, info: zipfile.ZipInfo, file: IO[bytes]) -> None:
        """Refuses a member whose header claims more data than the member can hold."""
        expansion = _MAX_EXPANSION.get(info.compress_type)
        if expansion is None or info.flag_bits & 0x1:
            raise ValueError(f"{info.filename} is encrypted or compressed with method {info.compress_type}; "
                             "write the file with numpy.savez or numpy.savez_compressed")
        reader = _HEADER_READERS.get(npy.read_magic(file))
        if reader is None:
            raise ValueError(f"{info.filename} is not in .npy format version 1 or 2")
        shape, _, dtype = reader(file)
        # An element counts as a byte at least: zero-width strings must not make a huge count free.
        claimed = math.prod(shape) * max(dtype.itemsize, 1)
        # The sizes in the zip directory are claims too; the file's own size is not.
        available = min(info.file_size, expansion * min(info.compress_size, self._size)) - file.tell()
        if min(shape, default=0) < 0 or claimed > available:
            raise ValueError(f"{info.filename} claims a {dtype} array of shape {shape} ({claimed} bytes), but "
                             f"holds at most {max(available, 0)} bytes: the file is truncated or corrupt")

    def close(self) -> None:
        self._archive.close()

    def __enter__(self) -> NpzFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def _reading(path: str) -> Iterator[None]:
    """Turns the errors of reading a malformed file into an :class:`NpzError` that names it."""
    try:
        yield
    except NpzError:
        raise
    except _MALFORMED as error:
        raise NpzError(f"{path} is not a readable .npz file of plain arrays: {error}") from error

"""Datasets for the examples, read from their original files.

``load("digits")`` needs nothing: the 8x8 UCI handwritten digits ship with
the package. ``fashion_mnist`` and ``cifar10`` are read from their original
distribution files (the IDX files, and the *binary* CIFAR-10 batches, so
nothing is ever unpickled); without a ``data_dir`` they are downloaded with
``keras.utils.get_file`` into Keras' cache. A path ending in ``.npz`` loads a
user's own data in the ``keras.datasets`` layout.

Keras (and so TensorFlow) is imported only to download, so loading
``digits`` or an ``.npz`` file stays light.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import math
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np

from comind.npz import NpzFile

NAMES = ("digits", "fashion_mnist", "cifar10")

#: The arrays a user's ``.npz`` file must hold, as ``keras.datasets`` returns them.
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")

#: Most classes a user's labels may name: one name is made per class, so a
#: label of 10**12 must not mean 10**12 of them.
MAX_CLASSES = 1 << 16

_DIGITS_FILE = Path(__file__).with_name("digits.npz")

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FASHION_ORIGIN = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
# The same cache folder as keras.datasets.fashion_mnist, so files it fetched are reused.
_FASHION_CACHE_SUBDIR = os.path.join("datasets", "fashion-mnist")
_FASHION_IMAGES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
_FASHION_LABELS = {"train": "train-labels-idx1-ubyte", "test": "t10k-labels-idx1-ubyte"}
_FASHION_FILES = tuple(f"{name}.gz" for name in (*_FASHION_IMAGES.values(), *_FASHION_LABELS.values()))
_FASHION_SIDE = 28
# IDX magic numbers: 0x0000, type 0x08 (unsigned byte), then the number of dimensions.
_IDX_LABELS_MAGIC = 2049
_IDX_IMAGES_MAGIC = 2051

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
_CIFAR_ORIGIN = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
# The MD5 the dataset's page publishes for the binary archive.
_CIFAR_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
_CIFAR_FOLDER = "cifar-10-batches-bin"
_CIFAR_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
_CIFAR_TEST = ("test_batch.bin",)
_CIFAR_SHAPE = (3, 32, 32)  # channel-major in the file: all red, then green, then blue
_CIFAR_RECORD = 1 + math.prod(_CIFAR_SHAPE)  # a label byte, then the image

_GZIP_MAGIC = b"\x1f\x8b"


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: arrays have no single truth value
class Dataset:
    """A train/test split with integer labels.

    Attributes:
        name: the dataset's name, or the path of the ``.npz`` file it came from.
        x_train: ``uint8`` images ``(N, H, W)`` or ``(N, H, W, C)``; any numbers for a user's file.
        y_train: integer labels ``(N,)``, from 0 to ``num_classes - 1``.
        x_test: like ``x_train``.
        y_test: like ``y_train``.
        class_names: a name for each label.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one example."""
        return tuple(self.x_train.shape[1:])


def load(name: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Loads a dataset by name, or a user's ``.npz`` file by path.

    Args:
        name: one of :data:`NAMES`, or a path ending in ``.npz`` holding the
            arrays ``x_train``, ``y_train``, ``x_test`` and ``y_test``.
        data_dir: a folder holding the original files of ``fashion_mnist`` or
            ``cifar10``; when ``None`` they are downloaded into Keras' cache.
            ``digits`` and ``.npz`` files ignore it.

    Returns:
        The :class:`Dataset`.

    Raises:
        ValueError: the name is unknown, a file is missing or malformed, or
            the download failed. The message says which and what to do.
    """
    name = os.fspath(name)
    if name.endswith(".npz"):
        return _load_npz(Path(name))
    loader = _LOADERS.get(name)
    if loader is None:
        raise ValueError(f"Unknown dataset. Expected one of {', '.join(map(repr, NAMES))}, or the path of a "
                         f".npz file with the arrays {', '.join(NPZ_KEYS)}. Received: dataset={name!r}")
    return loader(None if data_dir is None else Path(data_dir))


def _load_digits(data_dir: Path | None) -> Dataset:
    """The digits that ship with the package; ``data_dir`` plays no part."""
    with np.load(_DIGITS_FILE, allow_pickle=False) as data:
        return Dataset("digits", class_names=_numbered(10), **{key: data[key] for key in NPZ_KEYS})


# --- Fashion-MNIST ------------------------------------------------------------------------------


def _load_fashion_mnist(data_dir: Path | None) -> Dataset:
    folder = data_dir if data_dir is not None else _download_fashion_mnist()
    arrays = {}
    for split in ("train", "test"):
        images = _read_idx(_find_idx(folder, _FASHION_IMAGES[split]), _IDX_IMAGES_MAGIC)
        labels = _read_idx(_find_idx(folder, _FASHION_LABELS[split]), _IDX_LABELS_MAGIC)
        _check_fashion_split(folder, split, images, labels)
        arrays[f"x_{split}"], arrays[f"y_{split}"] = images, labels
    return Dataset("fashion_mnist", class_names=FASHION_MNIST_CLASSES, **arrays)


def _download_fashion_mnist() -> Path:
    with _downloading("fashion_mnist", _FASHION_FILES):
        keras = _import_keras()
        paths = [keras.utils.get_file(file, origin=_FASHION_ORIGIN + file, cache_subdir=_FASHION_CACHE_SUBDIR)
                 for file in _FASHION_FILES]
    return Path(paths[0]).parent


def _find_idx(folder: Path, stem: str) -> Path:
    """The IDX file ``stem``, gzipped (as distributed) or not."""
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise ValueError(f"Fashion-MNIST file {stem}.gz (or {stem}) is missing from {folder}. "
                     + _where_to_put("fashion_mnist", _FASHION_FILES))


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file of unsigned bytes, checked against its own header.

    The header is the magic number, then one big-endian 32-bit size per
    dimension; the data must be exactly as long as the sizes say.
    """
    data = _read_maybe_gzipped(path)
    ndim = magic & 0xFF
    header = 4 * (1 + ndim)
    if len(data) < header:
        raise ValueError(f"{path} is not an IDX file: it has only {len(data)} bytes, "
                         f"fewer than the {header}-byte header.")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"{path} has the wrong magic number {found}: expected {magic} "
                         f"(an IDX file of {'images' if magic == _IDX_IMAGES_MAGIC else 'labels'}).")
    shape = tuple(int.from_bytes(data[i:i + 4], "big") for i in range(4, header, 4))
    if 0 in shape:  # nothing to train on, and NumPy refuses such a shape when its other sizes are huge
        raise ValueError(f"{path} holds no data: its header gives the sizes {shape}.")
    expected = header + math.prod(shape)
    if len(data) != expected:
        raise ValueError(f"{path} has {len(data)} bytes but its header {shape} says {expected}: "
                         f"the file is {'truncated' if len(data) < expected else 'too long'}.")
    # frombuffer over bytes is read-only; copy so every loader returns ordinary arrays.
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape).copy()


def _read_maybe_gzipped(path: Path) -> bytes:
    data = path.read_bytes()
    if not data.startswith(_GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(f"{path} is not a valid gzip file (truncated?): {error}") from error


def _check_fashion_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """What the headers alone cannot say: the sizes agree and the labels are classes."""
    images_file, labels_file = _FASHION_IMAGES[split], _FASHION_LABELS[split]
    if images.shape[1:] != (_FASHION_SIDE, _FASHION_SIDE):
        raise ValueError(f"{images_file} in {folder} holds {images.shape[1]}x{images.shape[2]} images: "
                         f"Fashion-MNIST's are {_FASHION_SIDE}x{_FASHION_SIDE}.")
    if len(images) != len(labels):
        raise ValueError(f"{images_file} in {folder} holds {len(images)} images but {labels_file} "
                         f"holds {len(labels)} labels.")
    _check_label_range(labels, len(FASHION_MNIST_CLASSES), f"{labels_file} in {folder}")


# --- CIFAR-10 -----------------------------------------------------------------------------------


def _load_cifar10(data_dir: Path | None) -> Dataset:
    folder = _cifar_batches_folder(data_dir if data_dir is not None else _download_cifar10())
    x_train, y_train = _read_cifar_batches(folder, _CIFAR_TRAIN)
    x_test, y_test = _read_cifar_batches(folder, _CIFAR_TEST)
    return Dataset("cifar10", x_train, y_train, x_test, y_test, CIFAR10_CLASSES)


def _download_cifar10() -> Path:
    with _downloading("cifar10", (*_CIFAR_TRAIN, *_CIFAR_TEST)):
        keras = _import_keras()
        # With extract=True, get_file returns the folder it extracted the archive into
        # (``cifar-10-binary_extracted`` in the cache); the batches are in a folder inside it.
        return Path(keras.utils.get_file("cifar-10-binary.tar.gz", origin=_CIFAR_ORIGIN, extract=True,
                                         file_hash=_CIFAR_MD5))


def _cifar_batches_folder(folder: Path) -> Path:
    """``folder``, or its ``cifar-10-batches-bin`` folder as the archive unpacks."""
    inner = folder / _CIFAR_FOLDER
    folder = inner if inner.is_dir() else folder
    missing = [file for file in (*_CIFAR_TRAIN, *_CIFAR_TEST) if not (folder / file).is_file()]
    if missing:
        raise ValueError(f"CIFAR-10 file(s) {', '.join(missing)} missing from {folder}. "
                         + _where_to_put("cifar10", (*_CIFAR_TRAIN, *_CIFAR_TEST)))
    return folder


def _read_cifar_batches(folder: Path, files: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The images ``(N, 32, 32, 3)`` and labels ``(N,)`` of the batch files, in order."""
    batches = [_read_cifar_batch(folder / file) for file in files]
    return (np.concatenate([images for images, _ in batches]),
            np.concatenate([labels for _, labels in batches]))


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    data = path.read_bytes()
    if not data or len(data) % _CIFAR_RECORD:
        raise ValueError(f"{path} has {len(data)} bytes, not a whole number of {_CIFAR_RECORD}-byte CIFAR-10 "
                         "records (a label byte, then 3x32x32 image bytes): it is truncated, or not from the "
                         "binary version of CIFAR-10.")
    records = np.frombuffer(data, np.uint8).reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0]
    _check_label_range(labels, len(CIFAR10_CLASSES), str(path))
    images = records[:, 1:].reshape(-1, *_CIFAR_SHAPE).transpose(0, 2, 3, 1)  # to channels-last
    return images, labels


# --- A user's .npz file -------------------------------------------------------------------------


def _load_npz(path: Path) -> Dataset:
    arrays = _read_npz(path)
    for split in ("train", "test"):
        arrays[f"y_{split}"] = _checked_npz_split(path, split, arrays[f"x_{split}"], arrays[f"y_{split}"])
    _check_npz_examples(path, arrays["x_train"], arrays["x_test"])
    # The classes are those the model trains on: a test label past them has no output to be scored against.
    num_classes = int(arrays["y_train"].max()) + 1
    _check_npz_test_labels(path, arrays["y_test"], num_classes)
    return Dataset(str(path), class_names=_numbered(num_classes), **arrays)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ValueError(f"The dataset file {path} does not exist. Received: dataset={str(path)!r}")
    with NpzFile(path) as data:
        found = data.names
        arrays = {key: data.read(key) for key in NPZ_KEYS if key in found}
    missing = [key for key in NPZ_KEYS if key not in arrays]
    if missing:
        raise ValueError(f"{path} lacks the array(s) {', '.join(missing)}: a dataset file needs "
                         f"{', '.join(NPZ_KEYS)}. It has: {', '.join(found) or 'nothing'}.")
    return arrays


def _checked_npz_split(path: Path, split: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Checks one split of a user's file; returns its labels with shape ``(N,)``."""
    if y.ndim == 2 and y.shape[1] == 1:  # keras.datasets.cifar10 gives (N, 1)
        y = y.reshape(-1)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y_{split} in {path} must hold integer class labels of shape (N,) or (N, 1). "
                         f"Received: y_{split}.dtype={y.dtype}, y_{split}.shape={y.shape}")
    if x.ndim < 2 or not math.prod(x.shape[1:]) or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise ValueError(f"x_{split} in {path} must hold numbers of shape (N, ...) with at least one "
                         f"feature. Received: x_{split}.dtype={x.dtype}, x_{split}.shape={x.shape}")
    if len(x) != len(y):
        raise ValueError(f"x_{split} and y_{split} in {path} must have one label per example. "
                         f"Received: len(x_{split})={len(x)}, len(y_{split})={len(y)}")
    if not len(x):  # nothing to train on, or to test with
        raise ValueError(f"x_{split} and y_{split} in {path} hold no examples; a dataset file needs at least one "
                         f"in each split. Received: x_{split}.shape={x.shape}")
    _check_finite(path, f"x_{split}", x)
    if y.min() < 0:
        raise ValueError(f"y_{split} in {path} must hold labels >= 0. Received: min(y_{split})={y.min()}")
    if y.max() >= MAX_CLASSES:
        raise ValueError(f"y_{split} in {path} must hold labels below {MAX_CLASSES} (coMind's most classes); number "
                         f"your classes from 0. Received: max(y_{split})={y.max()}")
    return y


def _check_finite(path: Path, name: str, x: np.ndarray) -> None:
    """Refuses NaN and Inf, naming the first: they make every loss NaN, which looks like divergence."""
    if not np.issubdtype(x.dtype, np.inexact):
        return
    bad = ~np.isfinite(x)
    if bad.any():
        first = np.unravel_index(np.argmax(bad), x.shape)
        where = ", ".join(str(int(i)) for i in first)
        raise ValueError(f"{name} in {path} holds {np.count_nonzero(bad)} NaN or Inf value(s), the first at "
                         f"{name}[{where}]; replace them, or drop those examples. Received: {name}[{where}]={x[first]}")


def _check_npz_test_labels(path: Path, y_test: np.ndarray, num_classes: int) -> None:
    index = int(np.argmax(y_test))
    if y_test[index] >= num_classes:
        raise ValueError(f"y_test in {path} holds the label {y_test[index]} (at index {index}), but the labels of "
                         f"y_train go from 0 to {num_classes - 1}: a model trained on them has {num_classes} "
                         f"classes. Number the classes alike in both. Received: max(y_test)={y_test[index]}")


def _check_npz_examples(path: Path, x_train: np.ndarray, x_test: np.ndarray) -> None:
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"x_train and x_test in {path} must have examples of the same shape. "
                         f"Received: x_train.shape={x_train.shape}, x_test.shape={x_test.shape}")


# --- Shared -------------------------------------------------------------------------------------


def _check_label_range(labels: np.ndarray, num_classes: int, source: str) -> None:
    if labels.size and labels.max() >= num_classes:
        raise ValueError(f"{source} holds the label {labels.max()}, but there are only {num_classes} classes "
                         f"(0 to {num_classes - 1}).")


def _numbered(num_classes: int) -> tuple[str, ...]:
    return tuple(str(i) for i in range(num_classes))


def _import_keras() -> ModuleType:
    import keras  # here, not at the top: it imports TensorFlow, which only a download needs

    return keras


def _where_to_put(dataset: str, files: Sequence[str]) -> str:
    return (f"Put the original files of {dataset} ({', '.join(files)}) in a directory and set "
            "COMIND_DATA_DIR (or --data-dir) to it.")


@contextlib.contextmanager
def _downloading(dataset: str, files: Sequence[str]) -> Iterator[None]:
    """Turns any failure to download into a ValueError that says how to do without."""
    try:
        yield
    except Exception as error:  # get_file raises a bare Exception for network errors
        raise ValueError(f"Downloading {dataset} failed ({error}). " + _where_to_put(dataset, files)) from error


_LOADERS: dict[str, Callable[[Path | None], Dataset]] = {
    "digits": _load_digits,
    "fashion_mnist": _load_fashion_mnist,
    "cifar10": _load_cifar10,
}

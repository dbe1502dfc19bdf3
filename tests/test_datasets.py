"""Loading datasets from their original files, without a network.

Fashion-MNIST and CIFAR-10 are tested on small synthetic files written in
their original formats; downloads are tested against a stand-in Keras.
"""

from __future__ import annotations

import gzip
import subprocess
import sys
import types

import numpy as np
import pytest

from comind import datasets

FASHION_IMAGES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
FASHION_LABELS = {"train": "train-labels-idx1-ubyte", "test": "t10k-labels-idx1-ubyte"}
CIFAR_FILES = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
SIZES = {"train": 20, "test": 10}


def write_idx(path, array, magic, gzipped):
    """``array`` as an IDX file: the magic number, each dimension, then the bytes."""
    data = b"".join(n.to_bytes(4, "big") for n in (magic, *array.shape)) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gzipped else data)


def write_fashion(folder, gzipped=True):
    """Random Fashion-MNIST files; returns the arrays they hold."""
    rng = np.random.default_rng(1)
    arrays = {}
    for split, size in SIZES.items():
        arrays[f"x_{split}"] = rng.integers(0, 256, (size, 28, 28), dtype=np.uint8)
        arrays[f"y_{split}"] = rng.integers(0, 10, size, dtype=np.uint8)
        suffix = ".gz" if gzipped else ""
        write_idx(folder / (FASHION_IMAGES[split] + suffix), arrays[f"x_{split}"], 2051, gzipped)
        write_idx(folder / (FASHION_LABELS[split] + suffix), arrays[f"y_{split}"], 2049, gzipped)
    return arrays


def write_cifar(folder, per_batch=4):
    """Random CIFAR-10 binary batches; returns the (channels-last) arrays they hold."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    arrays = {}
    for split, files in CIFAR_FILES.items():
        images = rng.integers(0, 256, (per_batch * len(files), 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, len(images), dtype=np.uint8)
        for i, file in enumerate(files):
            batch = slice(i * per_batch, (i + 1) * per_batch)
            channel_major = images[batch].transpose(0, 3, 1, 2).reshape(per_batch, -1)
            (folder / file).write_bytes(np.column_stack([labels[batch], channel_major]).tobytes())
        arrays[f"x_{split}"], arrays[f"y_{split}"] = images, labels
    return arrays


def assert_holds(dataset, arrays):
    for key, expected in arrays.items():
        actual = getattr(dataset, key)
        assert actual.dtype == np.uint8 and actual.flags.writeable, key
        np.testing.assert_array_equal(actual, expected, err_msg=key)


@pytest.fixture
def fake_keras(monkeypatch):
    """Puts a stand-in ``keras`` in ``sys.modules``; the test sets its ``get_file``."""
    keras = types.SimpleNamespace(utils=types.SimpleNamespace())
    monkeypatch.setitem(sys.modules, "keras", keras)
    return keras.utils


# --- digits -------------------------------------------------------------------------------------


def test_digits_ship_with_the_package():
    digits = datasets.load("digits")
    assert digits.x_train.shape == (1437, 8, 8) and digits.x_test.shape == (360, 8, 8)
    assert digits.x_train.dtype == np.uint8 and digits.x_train.max() == 255
    assert digits.y_train.shape == (1437,) and digits.y_test.shape == (360,)
    assert set(np.unique(digits.y_train)) == set(range(10))
    assert digits.num_classes == 10 and digits.class_names == tuple("0123456789")
    assert digits.input_shape == (8, 8)


def test_digits_and_npz_files_load_without_tensorflow(tmp_path):
    path = tmp_path / "mine.npz"
    np.savez(path, x_train=np.zeros((2, 3)), y_train=[0, 1], x_test=np.zeros((1, 3)), y_test=[1])
    code = ("import sys; from comind import datasets; datasets.load('digits'); "
            f"datasets.load({str(path)!r}); "
            "assert not {'keras', 'tensorflow'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"'digits', 'fashion_mnist', 'cifar10'.*\.npz.*Received: dataset='mnist'$"):
        datasets.load("mnist")


# --- Fashion-MNIST ------------------------------------------------------------------------------


@pytest.mark.parametrize("gzipped", [True, False], ids=["gzipped", "plain"])
def test_fashion_mnist_reads_the_idx_files(tmp_path, gzipped):
    arrays = write_fashion(tmp_path, gzipped)
    fashion = datasets.load("fashion_mnist", data_dir=tmp_path)
    assert_holds(fashion, arrays)
    assert fashion.x_train.shape == (20, 28, 28) and fashion.y_test.shape == (10,)
    assert fashion.class_names[0] == "T-shirt/top" and fashion.class_names[9] == "Ankle boot"
    assert fashion.num_classes == 10 and fashion.input_shape == (28, 28)


def test_fashion_mnist_accepts_a_mix_of_gzipped_and_plain_files(tmp_path):
    arrays = write_fashion(tmp_path)
    plain = tmp_path / FASHION_LABELS["test"]
    plain.write_bytes(gzip.decompress((tmp_path / f"{plain.name}.gz").read_bytes()))
    (tmp_path / f"{plain.name}.gz").unlink()
    assert_holds(datasets.load("fashion_mnist", data_dir=tmp_path), arrays)


def truncate(path):
    path.write_bytes(path.read_bytes()[:-5])


def pad(path):
    path.write_bytes(path.read_bytes() + b"\0")


def relabel(path, magic, array):
    write_idx(path, array, magic, gzipped=False)


FASHION_DAMAGE = {
    "missing file": (lambda folder: (folder / "t10k-images-idx3-ubyte").unlink(),
                     r"t10k-images-idx3-ubyte\.gz \(or t10k-images-idx3-ubyte\) is missing.*COMIND_DATA_DIR"),
    "bad magic": (lambda folder: relabel(folder / "train-labels-idx1-ubyte", 2051, np.zeros((20, 1, 1))),
                  r"train-labels-idx1-ubyte has the wrong magic number 2051: expected 2049"),
    "truncated": (lambda folder: truncate(folder / "train-images-idx3-ubyte"),
                  r"train-images-idx3-ubyte has 15691 bytes but its header \(20, 28, 28\) says 15696.*truncated"),
    "too long": (lambda folder: pad(folder / "t10k-labels-idx1-ubyte"),
                 r"t10k-labels-idx1-ubyte has 19 bytes but its header \(10,\) says 18: the file is too long"),
    "count mismatch": (lambda folder: relabel(folder / "t10k-labels-idx1-ubyte", 2049, np.zeros(11)),
                 r"t10k-images-idx3-ubyte .* holds 10 images but t10k-labels-idx1-ubyte holds 11 labels"),
    "header only": (lambda folder: (folder / "train-labels-idx1-ubyte").write_bytes(b"\0\0\x08"),
                    r"train-labels-idx1-ubyte is not an IDX file: it has only 3 bytes"),
    "wrong size": (lambda folder: relabel(folder / "train-images-idx3-ubyte", 2051, np.zeros((20, 27, 28))),
                   r"train-images-idx3-ubyte .* holds 27x28 images: Fashion-MNIST's are 28x28"),
    "label out of range": (lambda folder: relabel(folder / "train-labels-idx1-ubyte", 2049, np.full(20, 10)),
                           r"train-labels-idx1-ubyte .* holds the label 10, but there are only 10 classes"),
}


@pytest.mark.parametrize("damage, message", FASHION_DAMAGE.values(), ids=FASHION_DAMAGE.keys())
def test_malformed_fashion_mnist_files_are_named(tmp_path, damage, message):
    write_fashion(tmp_path, gzipped=False)
    damage(tmp_path)
    with pytest.raises(ValueError, match=message):
        datasets.load("fashion_mnist", data_dir=tmp_path)


def test_a_truncated_gzip_file_is_named(tmp_path):
    write_fashion(tmp_path)
    truncate(tmp_path / "train-images-idx3-ubyte.gz")
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz is not a valid gzip file"):
        datasets.load("fashion_mnist", data_dir=tmp_path)


def test_fashion_mnist_downloads_into_the_keras_cache(tmp_path, fake_keras):
    arrays = write_fashion(tmp_path)
    calls = []

    def get_file(fname, origin, cache_subdir):
        calls.append((origin, cache_subdir))
        return str(tmp_path / fname)

    fake_keras.get_file = get_file
    assert_holds(datasets.load("fashion_mnist"), arrays)
    assert sorted(origin for origin, _ in calls) == sorted(
        f"https://storage.googleapis.com/tensorflow/tf-keras-datasets/{name}.gz"
        for name in (*FASHION_IMAGES.values(), *FASHION_LABELS.values()))
    assert {subdir for _, subdir in calls} == {"datasets/fashion-mnist"}


# --- CIFAR-10 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("inner", ["", "cifar-10-batches-bin"], ids=["directly", "in-subfolder"])
def test_cifar10_reads_the_binary_batches_in_order(tmp_path, inner):
    arrays = write_cifar(tmp_path / inner)
    cifar = datasets.load("cifar10", data_dir=tmp_path)
    assert_holds(cifar, arrays)
    assert cifar.x_train.shape == (20, 32, 32, 3) and cifar.x_test.shape == (4, 32, 32, 3)
    assert cifar.y_train.shape == (20,) and cifar.input_shape == (32, 32, 3)
    assert cifar.class_names[0] == "airplane" and cifar.num_classes == 10


def test_cifar10_channels_come_apart(tmp_path):
    """A record is all red bytes, then all green, then all blue."""
    write_cifar(tmp_path)
    record = bytes([7]) + bytes([10]) * 1024 + bytes([20]) * 1024 + bytes([30]) * 1024
    (tmp_path / "test_batch.bin").write_bytes(record)
    cifar = datasets.load("cifar10", data_dir=tmp_path)
    assert cifar.y_test.tolist() == [7]
    np.testing.assert_array_equal(cifar.x_test[0], np.broadcast_to([10, 20, 30], (32, 32, 3)))


CIFAR_DAMAGE = {
    "missing file": (lambda folder: (folder / "data_batch_3.bin").unlink(),
                     r"data_batch_3\.bin missing from .*data_batch_1\.bin.*test_batch\.bin.*COMIND_DATA_DIR"),
    "truncated": (lambda folder: truncate(folder / "data_batch_2.bin"),
                  r"data_batch_2\.bin has 12287 bytes, not a whole number of 3073-byte CIFAR-10 records"),
    "empty": (lambda folder: (folder / "test_batch.bin").write_bytes(b""),
              r"test_batch\.bin has 0 bytes"),
    "label out of range": (lambda folder: (folder / "test_batch.bin").write_bytes(bytes([10]) + bytes(3072)),
                           r"test_batch\.bin holds the label 10, but there are only 10 classes"),
}


@pytest.mark.parametrize("damage, message", CIFAR_DAMAGE.values(), ids=CIFAR_DAMAGE.keys())
def test_malformed_cifar10_files_are_named(tmp_path, damage, message):
    write_cifar(tmp_path)
    damage(tmp_path)
    with pytest.raises(ValueError, match=message):
        datasets.load("cifar10", data_dir=tmp_path)


def test_cifar10_downloads_the_binary_archive(tmp_path, fake_keras):
    arrays = write_cifar(tmp_path / "cifar-10-binary_extracted" / "cifar-10-batches-bin")
    calls = []

    def get_file(fname, origin, extract, file_hash):
        calls.append((fname, origin, extract))
        return str(tmp_path / "cifar-10-binary_extracted")

    fake_keras.get_file = get_file
    assert_holds(datasets.load("cifar10"), arrays)
    assert calls == [("cifar-10-binary.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz", True)]


# --- Downloads ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name, a_file", [("fashion_mnist", "t10k-labels-idx1-ubyte.gz"),
                                          ("cifar10", "test_batch.bin")])
def test_a_failed_download_says_how_to_work_offline(fake_keras, name, a_file):
    def get_file(*args, **kwargs):
        raise Exception("URL fetch failure on https://example: None -- [Errno -2] Name or service not known")

    fake_keras.get_file = get_file
    with pytest.raises(ValueError, match=rf"Downloading {name} failed \(URL fetch failure.*\)\. Put the original "
                                         rf"files of {name} \(.*{a_file}.*\) in a directory and set COMIND_DATA_DIR "
                                         r"\(or --data-dir\) to it\."):
        datasets.load(name)


# --- A user's .npz file -------------------------------------------------------------------------


def save_npz(path, **overrides):
    arrays = {"x_train": np.linspace(0, 1, 12, dtype=np.float32).reshape(4, 3), "y_train": [[0], [2], [1], [2]],
              "x_test": np.zeros((2, 3), np.float32), "y_test": [[2], [0]], **overrides}
    np.savez(path, **{key: value for key, value in arrays.items() if value is not None})
    return path


def test_a_users_npz_file_loads(tmp_path):
    mine = datasets.load(str(save_npz(tmp_path / "mine.npz")))
    assert mine.name == str(tmp_path / "mine.npz")
    assert mine.y_train.tolist() == [0, 2, 1, 2] and mine.y_test.tolist() == [2, 0]
    assert mine.x_train.dtype == np.float32 and mine.input_shape == (3,)
    assert mine.class_names == ("0", "1", "2") and mine.num_classes == 3


def test_the_classes_are_those_of_the_training_labels(tmp_path):
    """A test set without some class still has a model of every trained class; a test label past them is refused
    (it would have made a model of 51 classes out of 10, with nothing trained for the other 41)."""
    assert datasets.load(str(save_npz(tmp_path / "fewer.npz", y_test=[0, 0]))).num_classes == 3
    with pytest.raises(ValueError, match=r"y_test in .* holds the label 50 \(at index 1\), but the labels of "
                                         r"y_train go from 0 to 2.*Received: max\(y_test\)=50$"):
        datasets.load(str(save_npz(tmp_path / "past.npz", y_test=[1, 50])))


FASHION_SHAPED = {"x_train": np.zeros((4, 28, 28), np.float32), "x_test": np.zeros((2, 28, 28), np.float32)}


@pytest.mark.parametrize("split, value", [("train", np.nan), ("test", np.inf), ("test", -np.inf)])
def test_nan_or_inf_in_the_examples_is_refused_where_it_is(tmp_path, split, value):
    """Non-finite inputs would train to a NaN loss, which the ps then calls divergence."""
    x = FASHION_SHAPED[f"x_{split}"].copy()
    x[1, 27, 3] = value
    path = save_npz(tmp_path / "bad.npz", **{**FASHION_SHAPED, f"x_{split}": x})
    with pytest.raises(ValueError, match=rf"x_{split} in .* holds 1 NaN or Inf value\(s\), the first at "
                                         rf"x_{split}\[1, 27, 3\].*Received: x_{split}\[1, 27, 3\]={value}$"):
        datasets.load(str(path))


NPZ_DAMAGE = {
    "missing keys": ({"y_train": None, "x_test": None},
                     r"lacks the array\(s\) y_train, x_test: a dataset file needs x_train, y_train, x_test, y_test"),
    "length mismatch": ({"y_test": [1, 0, 1]},
                        r"one label per example. Received: len\(x_test\)=2, len\(y_test\)=3"),
    "float labels": ({"y_train": [0.0, 1.0, 1.0, 0.0]}, r"y_train .* must hold integer class labels"),
    "one-hot labels": ({"y_train": np.eye(4, dtype=int)}, r"Received: y_train.dtype=int64, y_train.shape=\(4, 4\)"),
    "negative labels": ({"y_test": [0, -1]}, r"y_test .* must hold labels >= 0. Received: min\(y_test\)=-1"),
    "shape mismatch": ({"x_test": np.zeros((2, 4))}, r"x_train.shape=\(4, 3\), x_test.shape=\(2, 4\)"),
    "no features": ({"x_test": np.zeros(2)}, r"x_test .* must hold numbers of shape \(N, ...\)"),
    "text": ({"x_train": np.full((4, 3), "a")}, r"x_train .* must hold numbers"),
    "no training examples": ({"x_train": np.zeros((0, 3)), "y_train": np.zeros(0, int)},
                             r"x_train and y_train in .* hold no examples.*Received: x_train.shape=\(0, 3\)$"),
    "no test examples": ({"x_test": np.zeros((0, 3)), "y_test": np.zeros(0, int)},
                         r"x_test and y_test in .* hold no examples.*Received: x_test.shape=\(0, 3\)$"),
    "objects": ({"x_train": np.array([None] * 4, dtype=object).reshape(4, 1)},
                r"not a readable .npz file of plain arrays: Object arrays cannot be loaded"),
}


@pytest.mark.parametrize("overrides, message", NPZ_DAMAGE.values(), ids=NPZ_DAMAGE.keys())
def test_a_bad_npz_file_says_what_is_wrong(tmp_path, overrides, message):
    path = save_npz(tmp_path / "bad.npz", **overrides)
    with pytest.raises(ValueError, match=message):
        datasets.load(str(path))


def test_a_missing_or_unreadable_npz_file_is_named(tmp_path):
    missing = tmp_path / "nowhere.npz"
    with pytest.raises(ValueError, match=rf"{missing} does not exist. Received: dataset='{missing}'$"):
        datasets.load(str(missing))
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match=r"junk.npz is not a readable .npz file"):
        datasets.load(str(tmp_path / "junk.npz"))

"""Tests for ebm_sim.datasets: digits, IDX parsing, CIFAR python batches, restricted unpickling."""
from __future__ import annotations

import gzip
import os
import pickle
import pickletools
from pathlib import Path

import numpy as np
import pytest

from ebm_sim import datasets as dsets
from ebm_sim.datasets import (
    DATASET_NAMES,
    Dataset,
    RestrictedUnpickler,
    load_cifar10,
    load_cifar100,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_mnist,
    read_idx,
    restricted_load,
    subsample_indices,
)


def shared_data_dir() -> Path:
    """../shared/data beside the repository, or $EBM_SHARED_DATA."""
    env = os.environ.get("EBM_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


REAL_CIFAR10 = shared_data_dir() / "cifar-10-batches-py"
REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


# ------------------------------------------------------------------------------------------------ helpers
_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B,
              np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    big = array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
    code = _IDX_CODES[np.dtype(big.dtype)]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(big).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_idx_dataset(folder: Path, n_train=30, n_test=20, shape=(28, 28), gz_train=True, gz_test=False,
                      seed=0, dotted=False) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {
        "train": (rng.integers(0, 256, (n_train,) + shape, dtype=np.uint8),
                  (np.arange(n_train) % 10).astype(np.uint8)),
        "t10k": (rng.integers(0, 256, (n_test,) + shape, dtype=np.uint8),
                 ((np.arange(n_test) * 3) % 10).astype(np.uint8)),
    }
    for prefix, (images, labels) in arrays.items():
        ext = ".gz" if (gz_train if prefix == "train" else gz_test) else ""
        sep = "." if dotted else "-"
        write_idx(folder / f"{prefix}-images{sep}idx3-ubyte{ext}", images)
        write_idx(folder / f"{prefix}-labels{sep}idx1-ubyte{ext}", labels)
    return arrays


def cifar_pixels(n: int, offset: int = 0) -> np.ndarray:
    """(n, 3072) uint8 rows whose value encodes the position: (c*1024 + h*32 + w + offset + row) % 256."""
    base = np.arange(3072)
    return ((base[None, :] + offset + np.arange(n)[:, None]) % 256).astype(np.uint8)


def dump(path: Path, obj, protocol=2) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def write_cifar10(folder: Path, batches=(1, 3), n=20, protocol=2, meta=True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in batches:
        dump(folder / f"data_batch_{i}", {b"batch_label": f"training batch {i} of 5".encode(),
                                          b"labels": [int(v) for v in (np.arange(n) + i) % 10],
                                          b"data": cifar_pixels(n, offset=i),
                                          b"filenames": [f"img_{i}_{k}.png".encode() for k in range(n)]},
             protocol)
    dump(folder / "test_batch", {b"batch_label": b"testing batch 1 of 1",
                                 b"labels": [int(v) for v in np.arange(n) % 10],
                                 b"data": cifar_pixels(n), b"filenames": [b"t.png"] * n}, protocol)
    if meta:
        dump(folder / "batches.meta", {b"label_names": [f"class{k}".encode() for k in range(10)],
                                       b"num_cases_per_batch": n, b"num_vis": 3072}, protocol)


class _Evil:
    """Pickles as a call to os.system; never unpickled with the plain unpickler here."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


# ------------------------------------------------------------------------------------------------ digits
def test_digits_shapes_range_dtypes_labels():
    ds = load_digits()
    assert ds.name == "digits" and ds.num_classes == 10 and ds.image_shape == (8, 8)
    assert ds.x_train.shape == (1437, 64) and ds.x_test.shape == (360, 64)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() == 1.0 and ds.x_test.max() <= 1.0
    assert set(np.unique(ds.y_train)) == set(range(10)) == set(np.unique(ds.y_test))
    counts = np.bincount(ds.y_test, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified
    assert ds.images("test").shape == (360, 8, 8)
    # pixel values are k/16
    assert np.allclose(ds.x_train * 16, np.round(ds.x_train * 16))


def test_digits_split_is_seeded():
    a, b, c = load_digits(seed=0), load_digits(seed=0), load_digits(seed=1)
    assert np.array_equal(a.x_test, b.x_test) and np.array_equal(a.y_train, b.y_train)
    assert not np.array_equal(a.x_test, c.x_test)


def test_load_dataset_dispatch_and_limits():
    ds = load_dataset("Digits", limit_train=100, limit_test=50, seed=3)
    assert ds.x_train.shape == (100, 64) and ds.x_test.shape == (50, 64)
    assert np.bincount(ds.y_train, minlength=10).min() >= 9  # stratified-ish
    again = load_dataset("digits", limit_train=100, limit_test=50, seed=3)
    assert np.array_equal(ds.x_train, again.x_train)
    bigger = load_dataset("digits", limit_train=10**6)
    assert bigger.x_train.shape[0] == 1437
    with pytest.raises(ValueError, match="positive"):
        load_dataset("digits", limit_train=0)


def test_unknown_dataset_lists_known_names():
    with pytest.raises(ValueError) as err:
        load_dataset("imagenet")
    for name in DATASET_NAMES:
        assert name in str(err.value)
    assert "imagenet" in str(err.value)


def test_subsample_indices_proportional_and_sorted():
    y = np.array([0] * 90 + [1] * 10)
    idx = subsample_indices(y, 20, seed=0)
    assert len(idx) == 20 and np.all(np.diff(idx) > 0)
    assert list(np.bincount(y[idx])) == [18, 2]
    assert not np.array_equal(idx, subsample_indices(y, 20, seed=1))


def test_dataset_validates_its_arrays():
    x = np.zeros((4, 4), np.float32)
    y = np.zeros(4, np.int64)
    Dataset(x, y, x, y, name="ok", image_shape=(2, 2), num_classes=2)
    with pytest.raises(ValueError, match="float32"):
        Dataset(x.astype(np.float64), y, x, y, name="bad", image_shape=(2, 2), num_classes=2)
    with pytest.raises(ValueError, match="int64"):
        Dataset(x, y.astype(np.int32), x, y, name="bad", image_shape=(2, 2), num_classes=2)
    with pytest.raises(ValueError, match=r"\(N, 9\)"):
        Dataset(x, y, x, y, name="bad", image_shape=(3, 3), num_classes=2)
    with pytest.raises(ValueError, match="outside"):
        Dataset(x + 2, y, x, y, name="bad", image_shape=(2, 2), num_classes=2)
    with pytest.raises(ValueError, match="labels outside"):
        Dataset(x, y + 5, x, y, name="bad", image_shape=(2, 2), num_classes=2)


# ------------------------------------------------------------------------------------------------ IDX
@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_read_idx_round_trip(tmp_path, suffix, dtype):
    rng = np.random.default_rng(1)
    array = (rng.standard_normal((3, 4, 5)) * 50).astype(dtype)
    path = write_idx(tmp_path / f"a-idx3-ubyte{suffix}", array)
    out = read_idx(path)
    assert out.shape == (3, 4, 5) and out.dtype == np.dtype(dtype).newbyteorder("=")
    assert np.array_equal(out, array)


def test_read_idx_one_dimensional(tmp_path):
    labels = np.arange(7, dtype=np.uint8)
    assert np.array_equal(read_idx(write_idx(tmp_path / "l-idx1-ubyte", labels)), labels)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_truncated_refused(tmp_path, suffix):
    data = idx_bytes(np.zeros((4, 3, 3), np.uint8))[:-1]
    path = tmp_path / f"trunc-idx3-ubyte{suffix}"
    path.write_bytes(gzip.compress(data) if suffix else data)
    with pytest.raises(ValueError, match="truncated") as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_read_idx_trailing_bytes_refused(tmp_path):
    path = tmp_path / "long-idx1-ubyte"
    path.write_bytes(idx_bytes(np.zeros(5, np.uint8)) + b"\x00")
    with pytest.raises(ValueError, match="trailing") as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_read_idx_bad_magic_dtype_header(tmp_path):
    good = idx_bytes(np.zeros((2, 2), np.uint8))
    bad_magic = tmp_path / "magic"
    bad_magic.write_bytes(b"\x01\x02" + good[2:])
    with pytest.raises(ValueError, match="magic") as err:
        read_idx(bad_magic)
    assert str(bad_magic) in str(err.value)
    bad_code = tmp_path / "code"
    bad_code.write_bytes(b"\x00\x00\x07" + good[3:])
    with pytest.raises(ValueError, match="dtype code 0x07"):
        read_idx(bad_code)
    short_header = tmp_path / "header"
    short_header.write_bytes(good[:6])
    with pytest.raises(ValueError, match="header"):
        read_idx(short_header)
    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tiny)


def test_read_idx_broken_gzip(tmp_path):
    path = tmp_path / "broken-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(100, np.uint8)))[:-12])
    with pytest.raises(ValueError, match="gzip") as err:
        read_idx(path)
    assert str(path) in str(err.value)
    not_gz = tmp_path / "plain-idx1-ubyte.gz"
    not_gz.write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(ValueError, match="not gzip"):
        read_idx(not_gz)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        read_idx(tmp_path / "nope")


def test_mnist_from_idx_folder(tmp_path):
    arrays = write_idx_dataset(tmp_path / "mnist", shape=(5, 4))
    for where in (tmp_path / "mnist", tmp_path):  # the folder itself, or its parent
        ds = load_mnist(where)
        assert ds.name == "mnist" and ds.image_shape == (5, 4)
        assert ds.x_train.shape == (30, 20) and ds.x_test.shape == (20, 20)
        assert ds.x_train.dtype == np.float32 and ds.y_test.dtype == np.int64
        np.testing.assert_array_equal(ds.images("train"), arrays["train"][0] / np.float32(255))
        np.testing.assert_array_equal(ds.y_test, arrays["t10k"][1])
    via_dispatch = load_dataset("MNIST", tmp_path, limit_train=10)
    assert via_dispatch.x_train.shape == (10, 20)


def test_mnist_dotted_names_and_env(tmp_path, monkeypatch):
    write_idx_dataset(tmp_path / "mnist", dotted=True, gz_train=False)
    monkeypatch.setenv("EBM_DATA_DIR", str(tmp_path))
    ds = load_mnist()
    assert ds.x_train.shape == (30, 784) and ds.image_shape == (28, 28)


def test_mnist_missing_paths(tmp_path, monkeypatch):
    monkeypatch.delenv("EBM_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="EBM_DATA_DIR"):
        load_mnist()
    missing = tmp_path / "does-not-exist"
    with pytest.raises(FileNotFoundError) as err:
        load_mnist(missing)
    assert str(missing) in str(err.value) and "IDX" in str(err.value)
    partial = tmp_path / "partial"
    write_idx_dataset(partial)
    (partial / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_mnist(partial)


def test_idx_mismatched_counts_refused(tmp_path):
    write_idx_dataset(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(19, np.uint8))
    with pytest.raises(ValueError, match="20 images but 19 labels"):
        load_mnist(tmp_path)


def test_fashion_mnist_default_locations(tmp_path, monkeypatch):
    monkeypatch.setattr(dsets, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "system" / "fashion-mnist")
    monkeypatch.setenv("EBM_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(FileNotFoundError) as err:
        load_fashion_mnist()
    message = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(tmp_path / "system" / "fashion-mnist") in message
    assert str(tmp_path / "data" / "fashion-mnist") in message
    write_idx_dataset(tmp_path / "data" / "fashion-mnist")
    ds = load_fashion_mnist()
    assert ds.name == "fashion-mnist" and ds.class_names[0] == "T-shirt/top" and ds.x_train.shape == (30, 784)
    # the system location comes first
    write_idx_dataset(tmp_path / "system" / "fashion-mnist", n_train=12)
    assert load_dataset("fashion_mnist").x_train.shape == (12, 784)


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    ds = load_fashion_mnist(REAL_FASHION)
    assert ds.x_train.shape == (60000, 784) and ds.x_test.shape == (10000, 784)
    assert ds.image_shape == (28, 28) and ds.num_classes == 10
    assert list(np.bincount(ds.y_test)) == [1000] * 10
    assert 0.0 <= ds.x_test.min() and ds.x_test.max() <= 1.0


# ------------------------------------------------------------------------------------------------ CIFAR
@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar10_synthetic_batches(tmp_path, protocol):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder, batches=(1, 3), n=20, protocol=protocol)
    for where in (tmp_path, folder):  # the parent or the batches folder itself
        ds = load_cifar10(where)
        assert ds.name == "cifar10" and ds.image_shape == (3, 32, 32) and ds.num_classes == 10
        assert ds.x_train.shape == (40, 3072) and ds.x_test.shape == (20, 3072)
        assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
        assert ds.class_names == tuple(f"class{k}" for k in range(10))
        # batch 1 then batch 3, in file order
        np.testing.assert_array_equal(ds.y_train[:20], (np.arange(20) + 1) % 10)
        np.testing.assert_array_equal(ds.y_train[20:], (np.arange(20) + 3) % 10)
        # channel order: the first 1024 values of a row are the R plane, row-major 32x32
        img = ds.images("test")[5]
        c, h, w = np.meshgrid(np.arange(3), np.arange(32), np.arange(32), indexing="ij")
        expected = ((c * 1024 + h * 32 + w + 5) % 256).astype(np.float32) / np.float32(255)
        np.testing.assert_array_equal(img, expected)
        assert img[0, 0, 0] == np.float32(5 / 255) and img[1, 0, 0] == np.float32((1024 + 5) % 256 / 255)


def test_cifar10_numpy2_module_names(tmp_path):
    """Pickles written by numpy 2 name numpy._core.multiarray; they load too."""
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder, protocol=2)
    raw = (folder / "test_batch").read_bytes()
    assert b"numpy.core.multiarray" in raw
    (folder / "test_batch").write_bytes(raw.replace(b"numpy.core.multiarray", b"numpy._core.multiarray"))
    assert load_cifar10(folder).x_test.shape == (20, 3072)


def test_cifar10_without_meta_uses_standard_names(tmp_path):
    write_cifar10(tmp_path, meta=False)
    assert load_cifar10(tmp_path).class_names == dsets.CIFAR10_CLASSES


def test_cifar10_missing_paths(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        load_cifar10(missing)
    assert str(missing) in str(err.value) and "CIFAR-10 python version" in str(err.value)
    assert "--data-dir" in str(err.value)
    monkeypatch.delenv("EBM_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="EBM_DATA_DIR"):
        load_cifar10()
    only_test = tmp_path / "only-test"
    write_cifar10(only_test, batches=())
    with pytest.raises(FileNotFoundError, match="data_batch_1..5"):
        load_cifar10(only_test)
    with pytest.raises(FileNotFoundError, match="CIFAR-100 python version"):
        load_cifar100(missing)


def test_cifar10_malformed_batches(tmp_path):
    write_cifar10(tmp_path)
    dump(tmp_path / "test_batch", {b"data": np.zeros((3, 100), np.uint8), b"labels": [0, 1, 2]})
    with pytest.raises(ValueError, match=r"\(N, 3072\)"):
        load_cifar10(tmp_path)
    dump(tmp_path / "test_batch", {b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1]})
    with pytest.raises(ValueError, match="3 images"):
        load_cifar10(tmp_path)
    dump(tmp_path / "test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})
    with pytest.raises(ValueError, match="labels outside"):
        load_cifar10(tmp_path)
    (tmp_path / "test_batch").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(ValueError, match="dict"):
        load_cifar10(tmp_path)
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": 1})[:-5])
    with pytest.raises(ValueError, match="not a readable pickle"):
        load_cifar10(tmp_path)


def test_cifar100_synthetic(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for split, n in (("train", 50), ("test", 30)):
        dump(folder / split, {b"filenames": [b"x"] * n, b"batch_label": split.encode(),
                              b"fine_labels": [int(v) for v in (np.arange(n) * 7) % 100],
                              b"coarse_labels": [int(v) for v in np.arange(n) % 20],
                              b"data": cifar_pixels(n, offset=9)})
    dump(folder / "meta", {b"fine_label_names": [f"fine{k}".encode() for k in range(100)],
                           b"coarse_label_names": [f"coarse{k}".encode() for k in range(20)]})
    ds = load_dataset("CIFAR-100", tmp_path)
    assert ds.name == "cifar100" and ds.num_classes == 100 and ds.image_shape == (3, 32, 32)
    assert ds.x_train.shape == (50, 3072) and ds.x_test.shape == (30, 3072)
    np.testing.assert_array_equal(ds.y_train, (np.arange(50) * 7) % 100)
    assert ds.class_names[3] == "fine3" and len(ds.class_names) == 100
    assert ds.images("train")[0, 2, 0, 0] == np.float32((2048 + 9) % 256 / 255)
    coarse = load_cifar100(folder, label_mode="coarse")
    assert coarse.num_classes == 20 and coarse.class_names[-1] == "coarse19"
    np.testing.assert_array_equal(coarse.y_test, np.arange(30) % 20)
    with pytest.raises(ValueError, match="label_mode"):
        load_cifar100(folder, label_mode="medium")


# ------------------------------------------------------------------------------------------------ pickles
def _globals_in(data: bytes) -> list[str]:
    found, strings = [], []
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            found.append(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            found.append(".".join(strings[-2:]))
        elif isinstance(arg, str):
            strings.append(arg)
    return found


@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pickle_refused_and_never_executed(tmp_path, protocol):
    marker = tmp_path / "pwned"
    payload = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0],
               b"evil": _Evil(f"echo pwned > {marker}")}
    data = pickle.dumps(payload, protocol=protocol)
    system_global = f"{os.system.__module__}.system"  # posix.system on Linux
    assert system_global in _globals_in(data)
    path = tmp_path / "evil.pkl"
    path.write_bytes(data)
    with pytest.raises(pickle.UnpicklingError) as err:
        restricted_load(path)
    assert f"refusing to unpickle {system_global}" in str(err.value)
    assert str(path) in str(err.value)
    assert not marker.exists()
    # the same payload as a CIFAR batch is refused by the loader
    write_cifar10(tmp_path / "c")
    (tmp_path / "c" / "test_batch").write_bytes(data)
    with pytest.raises(pickle.UnpicklingError, match="system"):
        load_cifar10(tmp_path / "c")
    assert not marker.exists()


@pytest.mark.parametrize("module,name", [("builtins", "eval"), ("builtins", "getattr"), ("os", "system"),
                                         ("subprocess", "Popen"), ("numpy", "load"),
                                         ("copyreg", "_reconstructor"), ("__builtin__", "exec")])
def test_restricted_unpickler_refuses_other_globals(tmp_path, module, name):
    data = b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n."
    path = tmp_path / "g.pkl"
    path.write_bytes(data)
    shown = "builtins" if module == "__builtin__" else module
    with pytest.raises(pickle.UnpicklingError, match=f"refusing to unpickle {shown}.{name}"):
        restricted_load(path)


def test_restricted_unpickler_accepts_plain_data(tmp_path):
    obj = {b"a": [1, 2.5, None, True, "text", b"bytes"], "set": {1, 2}, "frozen": frozenset({3}),
           "tuple": (1, (2, 3)), "array": np.arange(6, dtype=np.float32).reshape(2, 3),
           "scalar": np.int64(7), "f": np.float32(1.5), "ba": bytearray(b"xy"), "c": 1 + 2j}
    for protocol in (2, 3, 4, 5):
        path = tmp_path / f"ok{protocol}.pkl"
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
        out = restricted_load(path)
        assert out[b"a"] == obj[b"a"] and out["set"] == {1, 2} and out["tuple"] == (1, (2, 3))
        np.testing.assert_array_equal(out["array"], obj["array"])
        assert out["scalar"] == 7 and out["array"].dtype == np.float32 and out["ba"] == bytearray(b"xy")
    assert isinstance(RestrictedUnpickler, type) and issubclass(RestrictedUnpickler, pickle.Unpickler)


# ------------------------------------------------------------------------------------------------ real data
@pytest.mark.skipif(not (REAL_CIFAR10 / "test_batch").is_file(), reason=f"no real CIFAR-10 at {REAL_CIFAR10}")
def test_real_cifar10_batches():
    ds = load_cifar10(REAL_CIFAR10.parent)
    assert ds.x_test.shape == (10000, 3072) and ds.num_classes == 10 and ds.image_shape == (3, 32, 32)
    assert list(np.bincount(ds.y_test, minlength=10)) == [1000] * 10
    assert ds.x_train.shape[0] % 10000 == 0 and ds.x_train.shape[0] >= 10000
    assert ds.x_test.dtype == np.float32
    assert 0.0 <= ds.x_test.min() and ds.x_test.max() <= 1.0 and ds.x_test.max() > 0.99
    assert 0.3 < ds.x_test.mean() < 0.7
    assert ds.class_names[0] == "airplane" and ds.class_names[-1] == "truck"
    # natural images: neighbouring pixels within one plane are strongly correlated
    img = ds.images("test")[:200]
    corr = np.corrcoef(img[:, 0, :, :-1].ravel(), img[:, 0, :, 1:].ravel())[0, 1]
    assert corr > 0.8
    small = load_dataset("cifar-10", REAL_CIFAR10, limit_train=200, limit_test=100, seed=1)
    assert list(np.bincount(small.y_test, minlength=10)) == [10] * 10


def test_channels_first_shape_adds_a_channel_to_grayscale_images():
    from ebm_sim.datasets import load_digits
    data = load_digits()
    assert data.image_shape == (8, 8) and data.channels_first_shape == (1, 8, 8)

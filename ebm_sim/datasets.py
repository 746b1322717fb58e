"""Dataset loaders: every loader reads local files (no network access).

All loaders return a :class:`Dataset` whose inputs are float32 in [0, 1], flattened to shape (N, D)
(batch-first), with ``image_shape`` giving the per-example shape to reshape to: (8, 8) for the digits,
(28, 28) for (Fashion-)MNIST, (3, 32, 32) channels-first for CIFAR. Labels are int64 in [0, num_classes).

Sources
- ``digits``: scikit-learn's embedded 8x8 digits, pixels / 16, seeded stratified 1437/360 split.
- ``fashion-mnist``: IDX files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` from the Debian package
  ``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist) or ``$EBM_DATA_DIR/fashion-mnist``.
- ``mnist``: the same IDX layout from any folder (default ``$EBM_DATA_DIR/mnist``).
- ``cifar10`` / ``cifar100``: the "python version" batch pickles (``cifar-10-batches-py``,
  ``cifar-100-python``), read through a restricted unpickler that only rebuilds plain containers, bytes,
  numbers and numpy arrays.
"""
from __future__ import annotations

import gzip
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

__all__ = [
    "Dataset",
    "DATASET_NAMES",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "load_fashion_mnist",
    "load_cifar10",
    "load_cifar100",
    "read_idx",
    "restricted_load",
    "RestrictedUnpickler",
    "RefusedGlobalError",
    "subsample_indices",
]

#: Where the Debian package ``dataset-fashion-mnist`` installs its IDX files.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Environment variable naming a folder that holds ``mnist/``, ``fashion-mnist/``, ``cifar-10-batches-py/``...
DATA_DIR_ENV = "EBM_DATA_DIR"

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")

FASHION_MNIST_HINT = ("install it with `apt-get install dataset-fashion-mnist` (root), or put the four IDX files "
                      "in $EBM_DATA_DIR/fashion-mnist or pass data_dir / --data-dir")
MNIST_HINT = ("put the four MNIST IDX files ({train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]) in a folder and "
              "pass data_dir / --data-dir, or set $EBM_DATA_DIR so that $EBM_DATA_DIR/mnist holds them")
CIFAR10_HINT = ("download the CIFAR-10 python version (cifar-10-python.tar.gz), extract it and pass --data-dir "
                "(data_dir) pointing at cifar-10-batches-py or its parent folder, or set $EBM_DATA_DIR")
CIFAR100_HINT = ("download the CIFAR-100 python version (cifar-100-python.tar.gz), extract it and pass --data-dir "
                 "(data_dir) pointing at cifar-100-python or its parent folder, or set $EBM_DATA_DIR")


# --------------------------------------------------------------------------------------------- Dataset
@dataclass
class Dataset:
    """A labelled train/test split.

    x_train (N, D) and x_test (M, D): float32 in [0, 1], flattened; ``image_shape`` is the per-example shape
    (prod(image_shape) == D), e.g. (8, 8), (28, 28) or (3, 32, 32) channels-first.
    y_train (N,), y_test (M,): int64 in [0, num_classes).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str
    image_shape: tuple[int, ...]
    num_classes: int
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        self.image_shape = tuple(int(s) for s in self.image_shape)
        if self.class_names is not None:
            self.class_names = tuple(str(c) for c in self.class_names)
            if len(self.class_names) != self.num_classes:
                raise ValueError(f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes")
        dim = int(np.prod(self.image_shape))
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != dim:
                raise ValueError(f"{self.name}: x_{split} must be a float32 array of shape (N, {dim}), got "
                                 f"{getattr(x, 'dtype', type(x))} {getattr(x, 'shape', '')}")
            if not isinstance(y, np.ndarray) or y.dtype != np.int64 or y.shape != (x.shape[0],):
                raise ValueError(f"{self.name}: y_{split} must be an int64 array of shape ({x.shape[0]},), got "
                                 f"{getattr(y, 'dtype', type(y))} {getattr(y, 'shape', '')}")
            if y.size and (y.min() < 0 or y.max() >= self.num_classes):
                raise ValueError(f"{self.name}: y_{split} has labels outside [0, {self.num_classes})")
            if x.size and not (x.min() >= 0.0 and x.max() <= 1.0):  # NaN fails both comparisons
                raise ValueError(f"{self.name}: x_{split} has values outside [0, 1] (or NaN)")

    @property
    def num_features(self) -> int:
        """D, the length of one flattened example."""
        return int(np.prod(self.image_shape))

    @property
    def channels_first_shape(self) -> tuple:
        """One example as (C, H, W): ``image_shape``, with a channel axis of 1 added to grayscale (H, W) images."""
        return self.image_shape if len(self.image_shape) == 3 else (1,) + self.image_shape

    def images(self, split: str = "train") -> np.ndarray:
        """The ``split`` ("train" or "test") inputs reshaped to (N, *image_shape) (a view, no copy)."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        x = getattr(self, f"x_{split}")
        return x.reshape((x.shape[0],) + self.image_shape)

    def __repr__(self) -> str:
        return (f"Dataset(name={self.name!r}, train={self.x_train.shape}, test={self.x_test.shape}, "
                f"image_shape={self.image_shape}, num_classes={self.num_classes})")


# --------------------------------------------------------------------------------------------- helpers
def _env_data_dir() -> Path | None:
    value = os.environ.get(DATA_DIR_ENV)
    return Path(value).expanduser() if value else None


def subsample_indices(y: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Indices (sorted, length min(n, len(y))) of a seeded, class-stratified subsample of labels ``y`` (N,).

    Each class keeps about n * count_c / N examples (proportional stratification); which ones is a seeded
    random choice. Ordering candidates by (rank within class + 0.5) / class count interleaves the classes.
    """
    y = np.asarray(y)
    n = int(n)
    if n <= 0:
        raise ValueError(f"a subsample size must be positive, got {n}")
    if n >= y.shape[0]:
        return np.arange(y.shape[0])
    rng = np.random.default_rng(seed)
    perm = rng.permutation(y.shape[0])
    _, inv, counts = np.unique(y[perm], return_inverse=True, return_counts=True)
    order = np.argsort(inv, kind="stable")  # positions grouped by class, in shuffled order
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(y.shape[0], dtype=np.int64)
    rank[order] = np.arange(y.shape[0]) - starts[inv[order]]
    frac = (rank + 0.5) / counts[inv]
    chosen = np.lexsort((np.arange(y.shape[0]), frac))[:n]  # by frac, ties by shuffled position
    return np.sort(perm[chosen])


def _limit(ds: Dataset, limit_train: int | None, limit_test: int | None, seed: int) -> Dataset:
    if limit_train is not None:
        idx = subsample_indices(ds.y_train, limit_train, seed)
        ds.x_train, ds.y_train = ds.x_train[idx], ds.y_train[idx]
    if limit_test is not None:
        idx = subsample_indices(ds.y_test, limit_test, seed + 1)
        ds.x_test, ds.y_test = ds.x_test[idx], ds.y_test[idx]
    return ds


# --------------------------------------------------------------------------------------------- digits
def load_digits(seed: int = 0, test_size: int = 360) -> Dataset:
    """scikit-learn's 8x8 digits (1797 images, embedded): pixels / 16 in [0, 1], x (N, 64), image_shape (8, 8).

    Split: seeded stratified train_test_split (default 1437 train / 360 test).
    """
    from sklearn.datasets import load_digits as _sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = _sk_load_digits()
    x = (np.asarray(bunch.data, dtype=np.float64) / 16.0).astype(np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, stratify=y, random_state=seed)
    return Dataset(x_train=np.ascontiguousarray(x_tr), y_train=y_tr, x_test=np.ascontiguousarray(x_te), y_test=y_te,
                   name="digits", image_shape=(8, 8), num_classes=10,
                   class_names=tuple(str(i) for i in range(10)))


# --------------------------------------------------------------------------------------------- IDX
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (raw or gzip-compressed) into an array of the shape its header declares.

    Header: two zero bytes, a dtype code (0x08 ubyte, 0x09 byte, 0x0B short, 0x0C int, 0x0D float,
    0x0E double), the number of dimensions, then one big-endian uint32 per dimension. The payload must hold
    exactly prod(dims) items; anything else (bad magic, unknown dtype, truncated or trailing bytes, a broken
    gzip stream) raises ValueError naming the file. Multi-byte types are returned in native byte order.

    The header is checked before the payload is read: a raw file's size must match it, and a gzip stream is
    inflated only up to the declared size (plus one byte, to see trailing data), after the declared size was
    checked against the memory available, so a small compressed file cannot inflate to gigabytes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    with open(path, "rb") as raw_handle:
        compressed = raw_handle.read(2) == b"\x1f\x8b"
        raw_handle.seek(0)
        if not compressed and path.suffix == ".gz":
            raise ValueError(f"{path}: named .gz but is not gzip-compressed")
        handle = gzip.GzipFile(fileobj=raw_handle) if compressed else raw_handle
        try:
            return _read_idx_stream(path, handle, None if compressed else path.stat().st_size)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise ValueError(f"{path}: broken gzip stream ({exc})") from None


def _read_idx_stream(path: Path, handle, file_size: int | None) -> np.ndarray:
    """The IDX array of an open stream (``file_size``: the raw file's size, None for a gzip stream)."""
    from .limits import require_memory

    magic = handle.read(4)
    if len(magic) < 4:
        raise ValueError(f"{path}: not an IDX file (only {len(magic)} bytes, shorter than the 4-byte magic number)")
    if magic[0] != 0 or magic[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number 0x{magic.hex()}; "
                         "expected 0x0000 then a dtype code and ndim)")
    code, ndim = magic[2], magic[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX dtype code 0x{code:02x} (expected one of "
                         f"{', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)})")
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares 0 dimensions")
    header = handle.read(4 * ndim)
    header_len = 4 + 4 * ndim
    if len(header) < 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header ({4 + len(header)} bytes, {ndim} dimensions need "
                         f"{header_len})")
    dims = tuple(int(d) for d in np.frombuffer(header, dtype=">u4"))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=object)) * dtype.itemsize
    if file_size is not None and file_size - header_len != expected:
        payload = file_size - header_len
        what = "truncated" if payload < expected else "has trailing bytes"
        raise ValueError(f"{path}: IDX file {what}: header declares shape {dims} of {dtype} "
                         f"({expected} bytes) but the file holds {payload} data bytes")
    require_memory(expected, f"{path}: its IDX header declares shape {dims} of {dtype}")
    data = handle.read(expected)
    if len(data) < expected:
        raise ValueError(f"{path}: IDX file truncated: header declares shape {dims} of {dtype} "
                         f"({expected} bytes) but the file holds {len(data)} data bytes")
    if handle.read(1):
        raise ValueError(f"{path}: IDX file has trailing bytes after the {expected} data bytes its header declares "
                         f"(shape {dims} of {dtype})")
    array = np.frombuffer(data, dtype=dtype).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=True)


_IDX_NAMES = {
    ("train", "images"): ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    ("train", "labels"): ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    ("test", "images"): ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    ("test", "labels"): ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def _find_idx(folder: Path, split: str, kind: str) -> Path | None:
    for stem in _IDX_NAMES[(split, kind)]:
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                return folder / name
    return None


def _has_idx(folder: Path) -> bool:
    return folder.is_dir() and all(_find_idx(folder, s, k) is not None for (s, k) in _IDX_NAMES)


def _resolve_idx_dir(candidates: Sequence[Path], subfolder: str, what: str, hint: str) -> Path:
    tried: list[Path] = []
    for base in candidates:
        for folder in (base, base / subfolder):
            if folder in tried:
                continue
            tried.append(folder)
            if _has_idx(folder):
                return folder
    if not tried:
        raise FileNotFoundError(f"{what}: no data folder given and ${DATA_DIR_ENV} is not set; {hint}")
    partial = [f for f in tried if f.is_dir() and any(_find_idx(f, s, k) for (s, k) in _IDX_NAMES)]
    detail = ""
    if partial:
        missing = [_IDX_NAMES[key][0] for key in _IDX_NAMES if _find_idx(partial[0], *key) is None]
        detail = f" ({partial[0]} lacks {', '.join(missing)}[.gz])"
    raise FileNotFoundError(f"{what} IDX files not found in {', '.join(str(t) for t in tried)}{detail}; {hint}")


def _load_idx_dataset(folder: Path, name: str, class_names: tuple[str, ...] | None) -> Dataset:
    arrays = {}
    for split in ("train", "test"):
        img_path, lab_path = _find_idx(folder, split, "images"), _find_idx(folder, split, "labels")
        images, labels = read_idx(img_path), read_idx(lab_path)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(f"{img_path}: expected a uint8 image array (N, rows, cols), got {images.dtype} "
                             f"{images.shape}")
        if labels.ndim != 1 or labels.dtype != np.uint8:
            raise ValueError(f"{lab_path}: expected a uint8 label vector (N,), got {labels.dtype} {labels.shape}")
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"{folder}: {split} has {images.shape[0]} images but {labels.shape[0]} labels")
        if labels.size and labels.max() >= 10:
            raise ValueError(f"{lab_path}: label {int(labels.max())} outside [0, 10)")
        arrays[split] = (images, labels)
    shapes = {arrays[s][0].shape[1:] for s in arrays}
    if len(shapes) != 1:
        raise ValueError(f"{folder}: train and test images differ in size: {sorted(shapes)}")
    image_shape = shapes.pop()

    def flat(images: np.ndarray) -> np.ndarray:
        return (images.reshape(images.shape[0], -1).astype(np.float32) / np.float32(255.0))

    return Dataset(x_train=flat(arrays["train"][0]), y_train=arrays["train"][1].astype(np.int64),
                   x_test=flat(arrays["test"][0]), y_test=arrays["test"][1].astype(np.int64),
                   name=name, image_shape=image_shape, num_classes=10, class_names=class_names)


def load_fashion_mnist(data_dir: str | os.PathLike | None = None) -> Dataset:
    """Fashion-MNIST from IDX files: x (60000, 784) / (10000, 784) float32 in [0, 1], image_shape (28, 28).

    ``data_dir`` (the folder holding the four IDX files, or its parent with a ``fashion-mnist`` subfolder);
    by default /usr/share/datasets/fashion-mnist (``apt-get install dataset-fashion-mnist``), then
    ``$EBM_DATA_DIR/fashion-mnist``.
    """
    if data_dir is not None:
        candidates = [Path(data_dir).expanduser()]
    else:
        candidates = [FASHION_MNIST_SYSTEM_DIR]
        env = _env_data_dir()
        if env is not None:
            candidates.append(env / "fashion-mnist")
    folder = _resolve_idx_dir(candidates, "fashion-mnist", "Fashion-MNIST", FASHION_MNIST_HINT)
    return _load_idx_dataset(folder, "fashion-mnist", FASHION_MNIST_CLASSES)


def load_mnist(data_dir: str | os.PathLike | None = None) -> Dataset:
    """MNIST from IDX files in ``data_dir`` (or its ``mnist`` subfolder; default ``$EBM_DATA_DIR/mnist``).

    x (N, 784) float32 in [0, 1], image_shape (28, 28), labels 0-9.
    """
    if data_dir is not None:
        candidates = [Path(data_dir).expanduser()]
    else:
        env = _env_data_dir()
        candidates = [] if env is None else [env / "mnist"]
    folder = _resolve_idx_dir(candidates, "mnist", "MNIST", MNIST_HINT)
    return _load_idx_dataset(folder, "mnist", tuple(str(i) for i in range(10)))


# --------------------------------------------------------------------------------------------- pickles
def _numpy_multiarray_attr(name: str) -> Callable[..., Any]:
    try:
        from numpy._core import multiarray  # numpy >= 2 (and the 1.26 compatibility shim)
    except ImportError:  # pragma: no cover - older numpy
        from numpy.core import multiarray
    return getattr(multiarray, name)


def _numpy_frombuffer() -> Callable[..., Any]:
    try:
        from numpy._core import numeric
    except ImportError:  # pragma: no cover - older numpy
        from numpy.core import numeric
    return numeric._frombuffer


def _codecs_encode() -> Callable[..., Any]:
    import _codecs
    return _codecs.encode


# Globals a pickle of plain containers + numpy arrays may reference, and how to obtain them.
# numpy arrays pickle as numpy.core.multiarray._reconstruct(numpy.ndarray, ...) + numpy.dtype (numpy 2 writes
# numpy._core.multiarray); numpy scalars as numpy.core.multiarray.scalar; protocol 5 arrays as
# numpy.core.numeric._frombuffer; Python 3 protocol-2 pickles encode
# bytes as _codecs.encode(str, "latin1"); sets/frozensets/bytearrays under protocol < 4 need their builtins.
_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_multiarray_attr("_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_multiarray_attr("_reconstruct"),
    ("numpy.core.multiarray", "scalar"): lambda: _numpy_multiarray_attr("scalar"),
    ("numpy._core.multiarray", "scalar"): lambda: _numpy_multiarray_attr("scalar"),
    ("numpy.core.numeric", "_frombuffer"): _numpy_frombuffer,  # protocol 5 (out-of-band capable) arrays
    ("numpy._core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): _codecs_encode,
    ("builtins", "set"): lambda: set,
    ("builtins", "frozenset"): lambda: frozenset,
    ("builtins", "bytearray"): lambda: bytearray,
    ("builtins", "complex"): lambda: complex,
    ("builtins", "bytes"): lambda: _bytes_from_pickle,  # protocol 2 pickles an empty bytes object as bytes()
}


def _bytes_from_pickle(*args: Any) -> bytes:
    """``bytes`` for the unpickler, refusing a size argument (``bytes(10**12)`` would allocate a terabyte)."""
    if args and isinstance(args[0], int):
        raise RefusedGlobalError("refusing to unpickle bytes(<size>): only bytes built from data are allowed")
    return bytes(*args)


class RefusedGlobalError(pickle.UnpicklingError):
    """A pickle asked for a global (class or function) outside the allowed set."""


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that rebuilds only plain containers, str/bytes, numbers and numpy arrays/scalars.

    Any other global (a class or function an attacker could call, e.g. os.system) raises
    pickle.UnpicklingError("refusing to unpickle <module>.<name> from <source>").
    """

    def __init__(self, file: Any, *, source: str = "<pickle>", **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102 - see class docstring
        if module == "__builtin__":  # Python 2 pickles
            module = "builtins"
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            raise RefusedGlobalError(f"refusing to unpickle {module}.{name} from {self.source}: only plain "
                                         "containers, bytes, numbers and numpy arrays are allowed")
        return factory()


def restricted_load(path: str | os.PathLike, encoding: str = "bytes") -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler` (``encoding="bytes"`` as for the CIFAR batches).

    A forbidden global raises RefusedGlobalError (a pickle.UnpicklingError); a corrupt or truncated file
    raises ValueError naming the file.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        try:
            return RestrictedUnpickler(handle, source=str(path), encoding=encoding).load()
        except RefusedGlobalError as exc:
            if str(path) in str(exc):
                raise
            raise RefusedGlobalError(f"{exc} (in {path})") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as exc:
            raise ValueError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from None


def _str_keys(obj: Any, path: Path) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _as_text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _integer_labels(values: Any, what: str) -> np.ndarray:
    """``values`` (a list or array of class indices) as int64, refusing anything but integers: a float label (0.5)
    would otherwise be truncated silently, a bool or a string taken for a number."""
    try:
        array = np.asarray(values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not a list of integers ({exc})") from None
    if array.dtype.kind not in "iu" or array.ndim != 1:
        found = f"{array.dtype} values of shape {array.shape}"
        if array.dtype.kind == "f" and array.size:
            fractional = array[~np.isfinite(array) | (array != np.round(array))]
            if fractional.size:
                found += f", e.g. {fractional[0]!r}"
        raise ValueError(f"{what} must be a list of integer class indices, got {found}")
    return array.astype(np.int64)


def _cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _str_keys(restricted_load(path), path)
    for key in ("data", label_key):
        if key not in batch:
            raise ValueError(f"{path}: not a CIFAR batch (no {key!r} entry; keys: {sorted(batch)})")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got "
                         f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
    if data.shape[0] == 0:
        raise ValueError(f"{path}: the batch holds no images (its 'data' has shape {data.shape})")
    labels = _integer_labels(batch[label_key], f"{path}: {label_key!r}")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {data.shape[0]} images but {label_key!r} has shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{path}: labels outside [0, {num_classes})")
    return data, labels


def _cifar_x(data: Sequence[np.ndarray]) -> np.ndarray:
    # rows are the R, G, B planes of a 32x32 image one after the other: already channels-first (3, 32, 32)
    stacked = np.concatenate(list(data), axis=0) if len(data) > 1 else data[0]
    return stacked.astype(np.float32) / np.float32(255.0)


def _resolve_cifar_dir(data_dir: str | os.PathLike | None, subfolder: str, marker: str, what: str,
                       hint: str) -> Path:
    if data_dir is not None:
        bases = [Path(data_dir).expanduser()]
    else:
        env = _env_data_dir()
        if env is None:
            raise FileNotFoundError(f"{what}: no data folder given (data_dir / --data-dir) and ${DATA_DIR_ENV} "
                                    f"is not set; {hint}")
        bases = [env]
    tried = []
    for base in bases:
        for folder in (base / subfolder, base):
            tried.append(folder)
            if (folder / marker).is_file():
                return folder
    raise FileNotFoundError(f"{what}: no {marker} found in {' or '.join(str(t) for t in tried)}; {hint}")


def load_cifar10(data_dir: str | os.PathLike | None = None) -> Dataset:
    """CIFAR-10 from the python batches: x float32 in [0, 1] of shape (N, 3072), image_shape (3, 32, 32).

    ``data_dir``: ``cifar-10-batches-py`` itself or the folder containing it (default ``$EBM_DATA_DIR``).
    Reads whichever of data_batch_1..5 exist (at least one), test_batch, and label names from batches.meta
    (the standard names if it is absent).
    """
    folder = _resolve_cifar_dir(data_dir, "cifar-10-batches-py", "test_batch", "CIFAR-10", CIFAR10_HINT)
    train_files = [folder / f"data_batch_{i}" for i in range(1, 6) if (folder / f"data_batch_{i}").is_file()]
    if not train_files:
        raise FileNotFoundError(f"CIFAR-10: {folder} has test_batch but no data_batch_1..5; {CIFAR10_HINT}")
    train = [_cifar_batch(p, "labels", 10) for p in train_files]
    test_x, test_y = _cifar_batch(folder / "test_batch", "labels", 10)
    class_names: tuple[str, ...] = CIFAR10_CLASSES
    meta_path = folder / "batches.meta"
    if meta_path.is_file():
        meta = _str_keys(restricted_load(meta_path), meta_path)
        names = meta.get("label_names")
        if not isinstance(names, (list, tuple)) or len(names) != 10:
            raise ValueError(f"{meta_path}: expected 10 'label_names', got {names!r}")
        class_names = tuple(_as_text(n) for n in names)
    return Dataset(x_train=_cifar_x([d for d, _ in train]), y_train=np.concatenate([l for _, l in train]),
                   x_test=_cifar_x([test_x]), y_test=test_y, name="cifar10", image_shape=(3, 32, 32),
                   num_classes=10, class_names=class_names)


def load_cifar100(data_dir: str | os.PathLike | None = None, label_mode: str = "fine") -> Dataset:
    """CIFAR-100 from the python files train/test/meta: x (N, 3072) float32 in [0, 1], image_shape (3, 32, 32).

    ``data_dir``: ``cifar-100-python`` itself or the folder containing it (default ``$EBM_DATA_DIR``).
    ``label_mode``: "fine" (100 classes, default) or "coarse" (20 superclasses).
    """
    if label_mode not in ("fine", "coarse"):
        raise ValueError(f"label_mode must be 'fine' or 'coarse', got {label_mode!r}")
    num_classes = 100 if label_mode == "fine" else 20
    folder = _resolve_cifar_dir(data_dir, "cifar-100-python", "test", "CIFAR-100", CIFAR100_HINT)
    if not (folder / "train").is_file():
        raise FileNotFoundError(f"CIFAR-100: {folder / 'train'} not found; {CIFAR100_HINT}")
    label_key = f"{label_mode}_labels"
    train_x, train_y = _cifar_batch(folder / "train", label_key, num_classes)
    test_x, test_y = _cifar_batch(folder / "test", label_key, num_classes)
    class_names = None
    meta_path = folder / "meta"
    if meta_path.is_file():
        meta = _str_keys(restricted_load(meta_path), meta_path)
        names = meta.get(f"{label_mode}_label_names")
        if not isinstance(names, (list, tuple)) or len(names) != num_classes:
            raise ValueError(f"{meta_path}: expected {num_classes} '{label_mode}_label_names'")
        class_names = tuple(_as_text(n) for n in names)
    return Dataset(x_train=_cifar_x([train_x]), y_train=train_y, x_test=_cifar_x([test_x]), y_test=test_y,
                   name="cifar100", image_shape=(3, 32, 32), num_classes=num_classes, class_names=class_names)


# --------------------------------------------------------------------------------------------- dispatch
DATASET_NAMES = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100")
_ALIASES = {
    "digits": "digits", "sklearndigits": "digits",
    "mnist": "mnist",
    "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist",
    "cifar10": "cifar10",
    "cifar100": "cifar100",
}


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, limit_train: int | None = None,
                 limit_test: int | None = None, seed: int = 0) -> Dataset:
    """Load a dataset by name ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100"; case, '-' and '_'
    ignored). ``data_dir`` is passed to the file-based loaders (ignored for digits). ``limit_train`` /
    ``limit_test`` keep a seeded, class-stratified subsample of that many examples (for quick runs);
    ``seed`` also fixes the digits train/test split.
    """
    key = str(name).lower().replace("-", "").replace("_", "").replace(" ", "")
    canonical = _ALIASES.get(key)
    if canonical is None:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASET_NAMES)}")
    if canonical == "digits":
        ds = load_digits(seed=seed)
    elif canonical == "mnist":
        ds = load_mnist(data_dir)
    elif canonical == "fashion-mnist":
        ds = load_fashion_mnist(data_dir)
    elif canonical == "cifar10":
        ds = load_cifar10(data_dir)
    else:
        ds = load_cifar100(data_dir)
    return _limit(ds, limit_train, limit_test, seed)

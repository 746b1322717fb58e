"""HDF5 storage of the toolkit's artifacts: networks, fixed-point datasets and trajectories.

One self-describing HDF5 file per artifact (full schemas: docs/formats.md). Every file carries the root
attributes

    format           "ebm-network" | "ebm-fixed-points" | "ebm-trajectory", or a format another package registers
                     (``register_format``) and writes through ``write_artifact``
    version          int, the version of the format the writer wrote (VERSIONS: the ones each format has; a network
                     is version 1 for a dense ``Network``, 2 for a ``LayeredNetwork`` of layers and interactions)
    created          ISO 8601 time (UTC) of writing
    toolkit_version  version of ebm-toolkit that wrote it
    content_hash     SHA-256 (hex) over the datasets and the configuration attributes (see ``_content_hash``)

plus the configuration attributes of its format. Datasets are contiguous and uncompressed (fast for
~60k x 1000 float32 arrays) and stored in the exact dtype given, so round trips are bit-exact.

Writes are atomic (``ebm_sim.outputs.atomic_path``): the file is written to ``.<name>.<pid>.<random>.tmp`` in the
target's directory, flushed, fsync'ed and renamed onto the target with ``os.replace``; on any exception
(KeyboardInterrupt, a full disk: ``DiskFullError``) the temporary file is removed and the target is left as it was.
Loads refuse, with ``ArtifactError``, a missing file, a file that is not HDF5 or is corrupt or truncated, a wrong
format, an unsupported version, datasets that would take more memory than the file holds (``check_stored_sizes``,
before reading them) and a content-hash mismatch. The hash detects corruption and careless edits, not forgery: a
file whose hash was recomputed after an edit loads as valid (docs/formats.md).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from .model.cost import COSTS
from .model.interaction import INTERACTIONS
from .model.network import LayeredNetwork
from .network import Network
from .outputs import RecordingFile, atomic_path, interrupts_deferred  # atomic_path is re-exported for others

FORMAT_VERSION = 1  # the version every format started at (a dense Network is still written as version 1)
LAYERED_NETWORK_VERSION = 2  # an ebm-network file of a LayeredNetwork (layers, interactions, cost)
FORMATS = {}    # format -> what a file of it holds, for messages ("a network")
VERSIONS = {}   # format -> the versions this toolkit reads
SUMMARIES = {}  # format -> attrs -> the summary ``artifact_info`` shows (formats registered by other packages)


def register_format(name: str, noun: str, versions: tuple = (FORMAT_VERSION,), summary=None) -> None:
    """Make a format known to the readers and writers here: its name, what a file of it holds ("a feedforward
    model"), the versions this toolkit reads, and optionally ``summary(attrs) -> dict`` for ``artifact_info``.
    A package that writes its own format through ``write_artifact`` registers it when imported."""
    FORMATS[name], VERSIONS[name] = noun, tuple(versions)
    if summary is not None:
        SUMMARIES[name] = summary


register_format("ebm-network", "a network", (FORMAT_VERSION, LAYERED_NETWORK_VERSION))
SHAPED_VERSION = 2  # fixed points / trajectories of a LayeredNetwork: inputs and states keep their (C, H, W) shapes
register_format("ebm-fixed-points", "a fixed-point dataset", (FORMAT_VERSION, SHAPED_VERSION))
register_format("ebm-trajectory", "a trajectory", (FORMAT_VERSION, SHAPED_VERSION))
HEADER_ATTRS = ("format", "version", "created", "toolkit_version", "content_hash")
_UNHASHED_ATTRS = ("created", "toolkit_version", "content_hash")
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
HDF5_OBJECT_BYTES = 4096  # room allowed per dataset (and for the root's attributes) beyond the data: HDF5 headers
_READ_ERRORS = (OSError, KeyError, RuntimeError, ValueError, TypeError)


class ArtifactError(ValueError):
    """A file that cannot be loaded as the requested artifact (missing, corrupt, wrong format/version/hash)."""


def _toolkit_version() -> str:
    try:
        from importlib.metadata import version
        return version("ebm-toolkit")
    except Exception:  # not installed (running from a source tree)
        return "unknown"


# ---------------------------------------------------------------------------------------------- helpers
def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.dtype):
        return obj.name
    if isinstance(obj, type) and issubclass(obj, np.generic):
        return np.dtype(obj).name
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serializable")


def _to_json(obj, what: str) -> str:
    """Canonical JSON (sorted keys) of ``obj``; numpy scalars/arrays/dtypes become plain JSON values."""
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise ValueError(f"{what} must be a dict with str keys, got {type(obj).__name__}")
    try:
        return json.dumps(obj, sort_keys=True, default=_json_default)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serializable: {e}") from None


def _py(value):
    """An h5py attribute value as a plain Python value (so that hashing is the same on write and read)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    return value


def _content_hash(datasets: dict, attrs: dict) -> str:
    """SHA-256 over the datasets (sorted by name: name, dtype.str, shape, raw C-order bytes, each part
    followed by a NUL) and then the canonical JSON of the hashed attributes (all root attributes but
    ``created``, ``toolkit_version`` and ``content_hash``)."""
    h = hashlib.sha256()
    for name in sorted(datasets):
        array = np.ascontiguousarray(datasets[name])
        h.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        h.update(array)
        h.update(b"\0")
    h.update(json.dumps(attrs, sort_keys=True).encode())
    return h.hexdigest()


def _header(fmt: str, datasets: dict, config: dict, version: int = FORMAT_VERSION) -> dict:
    """All root attributes of a new artifact: format, version, configuration, created, toolkit, hash."""
    hashed = {"format": fmt, "version": version, **config}
    return {**hashed, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "toolkit_version": _toolkit_version(), "content_hash": _content_hash(datasets, hashed)}


def write_text(path, text: str) -> Path:
    """Write a text file atomically (``atomic_path``): an interruption leaves the old file or none, never half."""
    path = Path(path)
    data = text.encode()
    with atomic_path(path, size_hint=len(data)) as tmp:
        tmp.write_bytes(data)
    return path


def _json_value(value):
    """numpy scalars and arrays as plain JSON values; anything else as its string."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def write_json(path, obj) -> Path:
    """Write ``obj`` as indented JSON, atomically; numpy values become plain numbers and lists."""
    return write_text(path, json.dumps(obj, indent=2, default=_json_value) + "\n")


def save_figure(fig, path, **savefig) -> Path:
    """Save a matplotlib figure as PNG atomically (``fig.savefig`` options in ``savefig``)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", **savefig)
    return path


def _write_artifact(path, fmt: str, datasets: dict, config: dict, version: int = FORMAT_VERSION) -> str:
    """Atomically write ``datasets`` (name -> array) and the header (of format ``fmt``, ``version``) + ``config``
    attributes; return the hash."""
    path = Path(path)
    attrs = _header(fmt, datasets, config, version)
    payload = sum(np.asarray(a).nbytes for a in datasets.values()) + HDF5_OBJECT_BYTES * (len(datasets) + 1)
    with interrupts_deferred(), atomic_path(path, size_hint=payload) as tmp:  # Ctrl-C after the file is complete
        # h5py writes through a Python file object: a full disk is then an OSError (ENOSPC) of Python's own that
        # atomic_path turns into DiskFullError (written by name, HDF5 fails in its close and h5py then crashes the
        # interpreter); h5py may word it "File close failed", so the file object keeps the real error
        with RecordingFile(tmp, "wb") as handle:
            try:
                with h5py.File(handle, "w") as f:
                    for name in sorted(datasets):
                        f.create_dataset(name, data=datasets[name])
                    for key, value in attrs.items():
                        f.attrs[key] = np.asarray(value, dtype=np.int64) if isinstance(value, list) else value
            except Exception as error:
                if handle.error is not None and handle.error is not error:
                    raise handle.error from error
                raise
    return attrs["content_hash"]


def write_artifact(path, fmt: str, datasets: dict, config: dict, version: int = FORMAT_VERSION) -> str:
    """Public hook for a format written outside this module (registered with ``register_format``): atomically
    write ``datasets`` (name -> array, stored as given) and the common header plus ``config`` (str, int, float,
    bool or int-list attributes; JSON strings for objects); return the content hash. ``fmt`` must be in FORMATS,
    ``version`` one of ``VERSIONS[fmt]``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known formats: {', '.join(FORMATS)}")
    if version not in VERSIONS[fmt]:
        raise ValueError(f"{fmt} has versions {', '.join(map(str, VERSIONS[fmt]))}, not {version!r}")
    return _write_artifact(path, fmt, datasets, config, version)


def read_artifact(path, fmt: str) -> tuple[dict, dict]:
    """Public hook: (datasets, attributes) of an artifact of format ``fmt``, refusing (ArtifactError) a missing,
    corrupt, wrong-format, unsupported-version or tampered file, as every loader here does."""
    return _load(path, fmt)


def _open_error(path: Path, error: Exception) -> ArtifactError:
    try:
        with open(path, "rb") as fh:
            signed = fh.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE
    except OSError:
        signed = False
    if not signed:
        return ArtifactError(f"{path} is not an HDF5 file (no HDF5 signature at its start): {error}")
    return ArtifactError(f"{path} cannot be read: the HDF5 file is corrupt or truncated ({error})")


_CONTIGUOUS_LAYOUTS = (h5py.h5d.COMPACT, h5py.h5d.CONTIGUOUS)


def check_stored_sizes(path, datasets) -> None:
    """Refuse (ArtifactError), before a byte of data is read, datasets that would take more memory than the file
    holds: the toolkit writes plain datasets only (fixed-size numbers or bytes, compact or contiguous, unfiltered,
    fully written, in the file itself), so their sizes together never exceed the file's. A 20 KB file declaring a
    (2^37,) array, a compressed dataset that inflates a thousandfold or raw data kept in another file is refused.

    datasets: (name, h5py.Dataset) pairs of an open file."""
    path = Path(path)
    total = 0
    for name, dataset in datasets:
        plist = dataset.id.get_create_plist()
        if dataset.dtype.kind not in "biufS" or dataset.dtype.hasobject:
            problem = f"has dtype {dataset.dtype}, not a plain number or byte string"
        elif plist.get_layout() not in _CONTIGUOUS_LAYOUTS or plist.get_nfilters() or plist.get_external_count():
            problem = "is chunked, compressed or stored outside the file"
        elif dataset.id.get_storage_size() != dataset.nbytes:
            problem = (f"declares {dataset.shape} of {dataset.dtype} ({dataset.nbytes} bytes) but stores "
                       f"{dataset.id.get_storage_size()} bytes")
        else:
            total += dataset.nbytes
            continue
        raise ArtifactError(f"{path}: dataset {name!r} {problem}: not written by this toolkit (refused before "
                            f"reading it)")
    size = path.stat().st_size
    if total > size:
        raise ArtifactError(f"{path}: its datasets declare {total} bytes but the file has {size}: corrupt or not "
                            f"written by this toolkit (refused before reading them)")


def _read_file(path, expected: str | None = None) -> tuple[dict, dict, str]:
    """Open an artifact, check its header (format == ``expected`` if given, supported version) and read all
    datasets. Returns (datasets name -> array, attributes, recomputed content hash)."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: no such file")
    if not path.is_file():
        raise ArtifactError(f"{path} is not a regular file")
    try:
        with h5py.File(path, "r") as f:
            attrs = {key: _py(value) for key, value in f.attrs.items()}
            _check_header(path, attrs, expected)
            found = {}
            f.visititems(lambda name, obj: found.__setitem__(name, obj) if isinstance(obj, h5py.Dataset) else None)
            check_stored_sizes(path, found.items())
            datasets = {name: dataset[...] for name, dataset in found.items()}
    except ArtifactError:
        raise
    except _READ_ERRORS as e:
        raise _open_error(path, e) from e
    hashed = {k: v for k, v in attrs.items() if k not in _UNHASHED_ATTRS}
    return datasets, attrs, _content_hash(datasets, hashed)


def _check_header(path: Path, attrs: dict, expected: str | None) -> None:
    """Refuse a file that is not an artifact, has another format than ``expected`` or an unsupported version."""
    fmt = attrs.get("format")
    if fmt is None:
        raise ArtifactError(f"{path} is an HDF5 file but not an ebm-toolkit artifact (no 'format' attribute)")
    if fmt not in FORMATS:
        raise ArtifactError(f"{path} has unknown format {fmt!r}; known formats: {', '.join(FORMATS)} (a package's "
                            f"own format is known once that package is imported)")
    if expected is not None and fmt != expected:
        raise ArtifactError(f"{path} holds {FORMATS[fmt]} (format {fmt!r}), but {FORMATS[expected]} "
                            f"(format {expected!r}) was expected")
    if attrs.get("version") not in VERSIONS[fmt]:
        readable = ", ".join(map(str, VERSIONS[fmt]))
        raise ArtifactError(f"{path}: unsupported {fmt} version {attrs.get('version')!r}; this toolkit "
                            f"({_toolkit_version()}) reads {fmt} version{'s' * (len(VERSIONS[fmt]) > 1)} "
                            f"{readable}")
    if not isinstance(attrs.get("content_hash"), str):
        raise ArtifactError(f"{path} has no content_hash attribute: corrupt or not written by this toolkit")


def _load(path, expected: str) -> tuple[dict, dict]:
    """Read an artifact of format ``expected``; refuse it if its content hash does not match."""
    datasets, attrs, computed = _read_file(path, expected)
    if computed != attrs["content_hash"]:
        raise ArtifactError(f"{path}: content hash mismatch, the file was modified or is corrupt "
                            f"(stored {attrs['content_hash'][:12]}, computed {computed[:12]})")
    return datasets, attrs


def _take(path, datasets: dict, names) -> list:
    """[datasets[name] for name in names], refusing (ArtifactError) a missing one."""
    missing = [n for n in names if n not in datasets]
    if missing:
        raise ArtifactError(f"{path} lacks dataset(s) {', '.join(missing)}: corrupt or not written by this toolkit")
    return [datasets[n] for n in names]


def _layer_names(prefix: str, first: int, count: int) -> list:
    return [f"{prefix}{i}" for i in range(first, first + count)]


def _check_network_hash(network_hash) -> str:
    if not (isinstance(network_hash, str) and len(network_hash) == 64
            and all(c in "0123456789abcdef" for c in network_hash)):
        raise ValueError(f"network_hash must be a SHA-256 hex digest (Network.content_hash()), got {network_hash!r}")
    return network_hash


def _check_hash_matches(path, stored: str, network, what: str) -> None:
    if network is not None and network.content_hash() != stored:
        raise ArtifactError(f"{path}: these {what} were computed by another network (stored network_hash "
                            f"{stored[:12]}, given network {network.content_hash()[:12]})")


def _array(value, name: str, ndim: int, kinds: str) -> np.ndarray:
    """``value`` as an array with ``ndim`` dimensions and a dtype kind in ``kinds``, else ValueError."""
    array = np.asarray(value)
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {array.shape}")
    if array.dtype.kind not in kinds:
        expected = {"f": "a float", "iu": "an integer", "b": "a bool"}.get(kinds, kinds)
        raise ValueError(f"{name} must have {expected} dtype, got {array.dtype}")
    return array


def _layer_arrays(arrays, name: str, ndim: int, shaped: bool = False) -> list:
    """A non-empty list of float arrays with ``ndim`` dimensions (one per layer 1..L); ``shaped``: a layer may also
    keep its (C, H, W) shape, ``ndim + 2`` dimensions."""
    if not isinstance(arrays, (list, tuple)) or len(arrays) == 0:
        raise ValueError(f"{name} must be a non-empty list of per-layer arrays, got {type(arrays).__name__}")
    return [_array(a, f"{name}[{k}] (layer {k + 1})", ndim + 2 if shaped and np.ndim(a) == ndim + 2 else ndim, "f")
            for k, a in enumerate(arrays)]


def _shapes_version(arrays: list, axes: int) -> tuple[int, list]:
    """The format version of per-layer arrays whose first ``axes`` dimensions are (samples) or (steps, samples):
    1 when every array is flat (n_k,) per sample, else SHAPED_VERSION; and the per-sample shapes."""
    shapes = [list(a.shape[axes:]) for a in arrays]
    return (FORMAT_VERSION if all(len(shape) == 1 for shape in shapes) else SHAPED_VERSION), shapes


def _stored_shapes(path, attrs: dict, key: str, count_key: str) -> list:
    """The per-sample shapes of a file's layers: ``attrs[key]`` (JSON, version 2) or the flat sizes of version 1."""
    if attrs["version"] == SHAPED_VERSION:
        try:
            return [tuple(int(n) for n in shape) for shape in json.loads(attrs[key])]
        except (KeyError, TypeError, ValueError):
            raise ArtifactError(f"{path}: its {key} attribute is missing or not a JSON list of shapes: corrupt or "
                                "not written by this toolkit") from None
    return [(int(n),) for n in attrs[count_key]]


def _check_leading(arrays: dict, axes: int) -> tuple:
    """All arrays (name -> array) share their first ``axes`` dimensions; return them."""
    shapes = {name: a.shape[:axes] for name, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        detail = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"inconsistent leading dimensions (expected equal): {detail}")
    return next(iter(shapes.values()))


def _flatten(tree: dict, prefix: str, what: str) -> dict:
    """Nested dict of arrays/scalars/str -> {prefix/key/...: array}. str values become UTF-8 bytes scalars."""
    if not isinstance(tree, dict):
        raise ValueError(f"{what} must be a dict, got {type(tree).__name__}")
    flat = {}
    for key, value in tree.items():
        if not isinstance(key, str) or not key or "/" in key or key in (".", ".."):
            raise ValueError(f"{what} key {key!r} must be a non-empty str without '/'")
        name = f"{prefix}/{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name, what))
            continue
        if isinstance(value, str):
            encoded = value.encode()
            value = np.array(encoded, dtype=f"S{max(1, len(encoded))}")
        array = np.asarray(value)
        if array.dtype.kind not in "biufcS" or (array.dtype.kind == "S" and array.ndim):
            raise ValueError(f"{what} entry {name.split('/', 1)[1]!r}: unsupported value of type "
                             f"{type(value).__name__} (use numeric/bool arrays or scalars, str, or nested dicts)")
        flat[name] = array
    return flat


def _unflatten(datasets: dict, prefix: str) -> dict:
    """Inverse of ``_flatten``: 0-d arrays come back as numpy scalars, bytes scalars as str."""
    tree = {}
    for name in sorted(n for n in datasets if n.startswith(prefix + "/")):
        *parents, leaf = name[len(prefix) + 1:].split("/")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        value = datasets[name]
        if value.ndim == 0:
            value = value[()]
            value = value.decode() if isinstance(value, bytes) else value
        node[leaf] = value
    return tree


# ---------------------------------------------------------------------------------------------- network
def _history_datasets(history: dict) -> tuple[dict, dict]:
    """Training history -> ({"history/<name>": array}, {name: "list" | "array"})."""
    if not isinstance(history, dict):
        raise ValueError(f"network.history must be a dict, got {type(history).__name__}")
    datasets, kinds = {}, {}
    for key, value in history.items():
        if not isinstance(key, str) or not key or "/" in key:
            raise ValueError(f"history key {key!r} must be a non-empty str without '/'")
        try:
            array = np.asarray(value)
        except ValueError as e:
            raise ValueError(f"history[{key!r}] is ragged (entries of different lengths): {e}") from None
        if array.ndim == 0 or array.dtype.kind not in "biuf":
            raise ValueError(f"history[{key!r}] must be a list of numbers or of 1-D arrays, or an array "
                             f"(got {type(value).__name__} of dtype {array.dtype}, shape {array.shape})")
        datasets[f"history/{key}"] = array
        kinds[key] = "list" if isinstance(value, (list, tuple)) else "array"
    return datasets, kinds


def save_network(path, network: Network | LayeredNetwork, extra_attrs: dict | None = None,
                 checkpoint: dict | None = None) -> str:
    """Write ``network`` to ``path`` atomically (replacing any existing file) and return the file's content hash.

    A dense ``Network`` is written as version 1, a ``LayeredNetwork`` as version 2 (format "ebm-network"; full
    schemas in docs/formats.md):
      version 1  datasets  weights/W{k} (n_{k+1}, n_k), k = 0..L-1; biases/b{k} (n_k,), k = 1..L (network dtype)
                 attrs     layer_sizes (int64 array (L+1,)), activation (str), dtype, network_hash,
                           readout (bool, only when true: the last layer is a softmax readout; absent = False)
      version 2  datasets  interactions/<i>/<name>  parameter <name> of the i-th interaction (its order in
                                                    ``network.interactions``); cost/<name>  the cost's parameters
                 attrs     architecture (JSON of ``network.describe()``: layers, activation, interactions with kind,
                           pre, post and hyperparameters, cost with kind and classes), dtype, network_hash
      both       datasets  history/<name>  numeric array, one per ``network.history`` entry (list of floats -> 1-D,
                                           list of 1-D arrays -> 2-D)
                           checkpoint/<key>[/<key>...]  one per leaf of ``checkpoint`` (only if given)
                 attrs     dtype ("float32"/"float64"), network_hash (str, ``network.content_hash()``),
                           history_types (JSON {name: "list"|"array"}), has_checkpoint (bool), extra (JSON of
                           ``extra_attrs``, "{}" if None)

    checkpoint: optional dict of numpy arrays, numeric/bool scalars, str, or nested dicts of these (e.g. the
    epoch, optimizer state, a JSON-encoded RNG state); read back with ``load_checkpoint``. The whole file is
    rewritten: saving without ``checkpoint`` drops a checkpoint stored earlier.
    extra_attrs: optional JSON-serializable dict of configuration (shown by ``artifact_info``).
    """
    layered = isinstance(network, LayeredNetwork)
    datasets, config = _layered_network_content(network) if layered else _dense_network_content(network)
    history, history_types = _history_datasets(network.history)
    datasets.update(history)
    if checkpoint is not None:
        datasets.update(_flatten(checkpoint, "checkpoint", "checkpoint"))
    config.update({"history_types": _to_json(history_types, "history"), "has_checkpoint": checkpoint is not None,
                   "extra": _to_json(extra_attrs or {}, "extra_attrs")})
    if not layered and network.readout:
        config["readout"] = True
    version = LAYERED_NETWORK_VERSION if layered else FORMAT_VERSION
    return _write_artifact(path, "ebm-network", datasets, config, version)


def _dense_network_content(network: Network) -> tuple[dict, dict]:
    """Version 1: the parameter datasets and the identity attributes of a dense ``Network``."""
    datasets = {f"weights/W{k}": w for k, w in enumerate(network.weights)}
    datasets.update({f"biases/b{k + 1}": b for k, b in enumerate(network.biases)})
    config = {"layer_sizes": [int(n) for n in network.layer_sizes], "activation": network.activation,
              "dtype": str(network.dtype), "network_hash": network.content_hash()}
    return datasets, config


def _layered_network_content(network: LayeredNetwork) -> tuple[dict, dict]:
    """Version 2: the parameter datasets (interactions/<i>/<name>, cost/<name>) and the identity attributes
    (architecture, dtype, network_hash) of a ``LayeredNetwork``."""
    datasets = {f"interactions/{i}/{name}": array
                for i, interaction in enumerate(network.interactions) for name, array in interaction.params.items()}
    datasets.update({f"cost/{name}": array for name, array in network.cost.params.items()})
    config = {"architecture": _to_json(network.describe(), "the architecture"), "dtype": str(network.dtype),
              "network_hash": network.content_hash()}
    return datasets, config


def load_network(path) -> Network | LayeredNetwork:
    """Read a network written by ``save_network``: a ``Network`` from a version-1 file, a ``LayeredNetwork`` from a
    version-2 file, with bit-exact parameters, activation and history (lists come back as lists, arrays as
    arrays). Raises ArtifactError on a bad file."""
    datasets, attrs = _load(path, "ebm-network")
    read = _read_layered_network if attrs["version"] == LAYERED_NETWORK_VERSION else _read_dense_network
    network = read(path, datasets, attrs)
    if network.content_hash() != attrs.get("network_hash"):
        raise ArtifactError(f"{path}: network hash mismatch (stored {str(attrs.get('network_hash'))[:12]}, "
                            f"loaded {network.content_hash()[:12]}): corrupt or not written by this toolkit")
    return network


def load_dense_network(path, purpose: str) -> Network:
    """``load_network`` for the parts of the toolkit that handle dense networks only (the dense Numba kernels, the
    Torch twin, the distillation commands, the hardware targets, the pipeline): a version-2 (layered, e.g. convolutional)
    file is refused with an ArtifactError naming ``purpose`` (e.g. "the distillation")."""
    network = load_network(path)
    if isinstance(network, LayeredNetwork):
        raise ArtifactError(f"{path} holds a layered network ({network!r}); {purpose} handles dense networks for "
                            f"now (layered ones relax with ebm relax or ebm_sim.model and train with ebm train)")
    return network


def load_layered_network(path) -> LayeredNetwork:
    """Read a network file of either version as a ``LayeredNetwork`` (a version-1 dense network through
    ``LayeredNetwork.from_dense``: the same dynamics, Dense + Bias interactions). Raises ArtifactError on a bad
    file."""
    network = load_network(path)
    return network if isinstance(network, LayeredNetwork) else LayeredNetwork.from_dense(network)


def _read_history(path, datasets: dict, attrs: dict) -> dict:
    """The training history stored under history/ (lists as lists, arrays as arrays)."""
    history = {}
    for key, kind in json.loads(attrs["history_types"]).items():
        (array,) = _take(path, datasets, [f"history/{key}"])
        history[key] = array if kind == "array" else (array.tolist() if array.ndim == 1 else list(array))
    return history


def _read_dense_network(path, datasets: dict, attrs: dict) -> Network:
    """A version-1 file's ``Network``."""
    num_layers = len(attrs["layer_sizes"]) - 1
    weights = _take(path, datasets, _layer_names("weights/W", 0, num_layers))
    biases = _take(path, datasets, _layer_names("biases/b", 1, num_layers))
    return Network(weights, biases, attrs["activation"], _read_history(path, datasets, attrs),
                   readout=bool(attrs.get("readout", False)))


def _read_layered_network(path, datasets: dict, attrs: dict) -> LayeredNetwork:
    """A version-2 file's ``LayeredNetwork``: every kind is looked up in the registries and every parameter dataset
    taken before the network is built through ``LayeredNetwork.from_description``."""
    description = _architecture(path, attrs)
    classes = [_registered(path, INTERACTIONS, entry, f"interaction {i}")
               for i, entry in enumerate(description["interactions"])]
    _registered(path, COSTS, description["cost"], "the cost")
    params = [dict(zip(c.param_names, _take(path, datasets, [f"interactions/{i}/{n}" for n in c.param_names])))
              for i, c in enumerate(classes)]
    cost_params = {name[len("cost/"):]: array for name, array in datasets.items() if name.startswith("cost/")}
    history = _read_history(path, datasets, attrs)
    try:
        return LayeredNetwork.from_description(description, params, cost_params, history)
    except (ValueError, TypeError) as error:
        raise ArtifactError(f"{path}: the stored network does not fit its architecture ({error}): corrupt or not "
                            f"written by this toolkit") from None


def _architecture(path, attrs: dict) -> dict:
    """The ``architecture`` attribute of a version-2 network file, checked to be the shape ``describe()`` gives
    (layers, activation, interactions: a list of {kind, pre, post, ...}, cost: {kind, classes})."""
    try:
        description = json.loads(attrs["architecture"])
    except (KeyError, TypeError, ValueError) as error:
        raise ArtifactError(f"{path}: no readable 'architecture' attribute ({error!r}): corrupt or not written by "
                            f"this toolkit") from None
    problem = _architecture_problem(description)
    if problem:
        raise ArtifactError(f"{path}: the architecture attribute {problem}: corrupt or not written by this toolkit")
    return description


def _architecture_problem(description) -> str | None:
    """What is wrong with the structure of a stored architecture, or None."""
    if not isinstance(description, dict):
        return "is not a JSON object"
    missing = [key for key in ("layers", "activation", "interactions", "cost") if key not in description]
    if missing:
        return f"lacks {', '.join(missing)}"
    layers, entries, cost = description["layers"], description["interactions"], description["cost"]
    if not (isinstance(layers, list) and layers and all(isinstance(s, list) and s and
                                                        all(type(n) is int for n in s) for s in layers)):
        return f"has layers {layers!r}, not a list of shapes (lists of ints)"
    if not isinstance(entries, list):
        return f"has interactions {entries!r}, not a list"
    for i, entry in enumerate(entries):
        if not (isinstance(entry, dict) and isinstance(entry.get("kind"), str)
                and type(entry.get("pre")) is int and type(entry.get("post")) is int):
            return f"has interaction {i} {entry!r}, not an object with a kind and int pre and post"
    if not (isinstance(cost, dict) and isinstance(cost.get("kind"), str) and type(cost.get("classes")) is int):
        return f"has cost {cost!r}, not an object with a kind and int classes"
    return None


def _registered(path, registry: dict, entry: dict, what: str):
    """The class ``registry`` (INTERACTIONS or COSTS) has for ``entry["kind"]``, else ArtifactError naming it."""
    if entry["kind"] not in registry:
        raise ArtifactError(f"{path}: {what} has unknown kind {entry['kind']!r}; this toolkit knows "
                            f"{', '.join(sorted(registry))} (a file of a newer toolkit?)")
    return registry[entry["kind"]]


def load_checkpoint(path) -> dict | None:
    """The ``checkpoint`` dict stored with ``save_network`` (nested dicts restored, 0-d arrays as numpy
    scalars, str as str), or None if the file holds no checkpoint."""
    datasets, attrs = _load(path, "ebm-network")
    return _unflatten(datasets, "checkpoint") if attrs.get("has_checkpoint") else None


# ---------------------------------------------------------------------------------------------- fixed points
@dataclass
class FixedPointDataset:
    """Fixed points of a network on N inputs.

    inputs (N, n_0) float; labels (N,) int; states list of L arrays (N, n_k), k = 1..L, float;
    residuals (N,) float; steps (N,) int; converged (N,) bool; settings dict (integrator settings);
    network_hash: content hash of the network that computed them. A LayeredNetwork's fixed points keep their
    shapes: inputs (N, *input_shape), states (N, *shape_k) (e.g. (N, C, H, W)).
    """

    inputs: np.ndarray
    labels: np.ndarray
    states: list
    residuals: np.ndarray
    steps: np.ndarray
    converged: np.ndarray
    settings: dict
    network_hash: str

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def layer_sizes(self) -> tuple:
        """(n_0, n_1, ..., n_L): units per layer (C * H * W for a (C, H, W) layer)."""
        return tuple(int(np.prod(shape)) for shape in self.layer_shapes)

    @property
    def layer_shapes(self) -> tuple:
        """((n_0,), (n_1,), ...) for a dense network, the layers' (C, H, W) or (n,) shapes for a layered one."""
        return (tuple(self.inputs.shape[1:]),) + tuple(tuple(s.shape[1:]) for s in self.states)


def save_fixed_points(path, inputs, labels, states, residuals, steps, converged, settings: dict,
                      network_hash: str) -> str:
    """Validate and write a fixed-point dataset atomically; return the file's content hash.

    Shapes: inputs (N, n_0) float, labels (N,) int, states list of L arrays (N, n_k) float (finite),
    residuals (N,) float, steps (N,) int, converged (N,) bool; settings a JSON-serializable dict (method,
    tol, max_steps, beta, dt, dtype, ...); network_hash = the content hash of the network used. A layered network's
    inputs and states may keep their shapes: inputs (N, n_0) or (N, C, H, W), states (N, n_k) or (N, C_k, H_k, W_k).

    Schema (format "ebm-fixed-points"; version 1 when every array is flat, 2 when a layer keeps a (C, H, W) shape):
      datasets  inputs (N, *shape_0), labels (N,), states/s{k} (N, *shape_k) for k = 1..L, residuals (N,),
                steps (N,), converged (N,) bool -- each in the dtype given
      attrs     settings (JSON str), network_hash (str), num_samples (int N), layer_sizes (int64 (L+1,): units per
                layer), version 2 also layer_shapes (JSON list of the L+1 per-sample shapes)
    Raises ValueError naming the problem on bad shapes/dtypes/values (nothing is written).
    """
    states = _layer_arrays(states, "states", 2, shaped=True)
    arrays = {"inputs": _array(inputs, "inputs", 4 if np.ndim(inputs) == 4 else 2, "f"),
              "labels": _array(labels, "labels", 1, "iu"),
              **{f"states/s{k + 1}": s for k, s in enumerate(states)},
              "residuals": _array(residuals, "residuals", 1, "f"), "steps": _array(steps, "steps", 1, "iu"),
              "converged": _array(converged, "converged", 1, "b")}
    (num_samples,) = _check_leading(arrays, 1)
    for name in ["inputs"] + [f"states/s{k + 1}" for k in range(len(states))]:
        if not np.all(np.isfinite(arrays[name])):
            raise ValueError(f"{name} holds NaN or inf")
    version, shapes = _shapes_version([arrays["inputs"]] + states, 1)
    config = {"settings": _to_json(settings, "settings"), "network_hash": _check_network_hash(network_hash),
              "num_samples": int(num_samples), "layer_sizes": [int(np.prod(shape)) for shape in shapes]}
    if version == SHAPED_VERSION:
        config["layer_shapes"] = json.dumps(shapes)
    return _write_artifact(path, "ebm-fixed-points", arrays, config, version)


def load_fixed_points(path, network: Network | None = None) -> FixedPointDataset:
    """Read a fixed-point dataset (bit-exact). If ``network`` is given, refuse (ArtifactError) fixed points
    computed by a network with another content hash."""
    datasets, attrs = _load(path, "ebm-fixed-points")
    _check_hash_matches(path, attrs["network_hash"], network, "fixed points")
    shapes = _stored_shapes(path, attrs, "layer_shapes", "layer_sizes")
    states = _take(path, datasets, _layer_names("states/s", 1, len(shapes) - 1))
    inputs, labels, residuals, steps, converged = _take(
        path, datasets, ["inputs", "labels", "residuals", "steps", "converged"])
    for name, array in [("inputs", inputs), *((f"states/s{k + 1}", s) for k, s in enumerate(states))]:
        if array.dtype.kind != "f" or not np.all(np.isfinite(array)):
            rows = np.nonzero(~np.all(np.isfinite(array.reshape(len(array), -1)), axis=1))[0] \
                if array.dtype.kind == "f" else []
            raise ArtifactError(f"{path}: {name} holds NaN or inf (rows {list(rows[:5])}"
                                f"{'...' if len(rows) > 5 else ''}) or is not float ({array.dtype}): fixed points "
                                f"are finite by construction (ebm relax refuses to write others); the file was "
                                f"edited or not written by this toolkit")
    if labels.dtype.kind not in "iu":
        raise ArtifactError(f"{path}: labels have dtype {labels.dtype}, not integers: not written by this toolkit")
    _check_shapes(path, [inputs] + states, shapes, 1)
    return FixedPointDataset(inputs, labels, states, residuals, steps, converged,
                             json.loads(attrs["settings"]), attrs["network_hash"])


def _check_shapes(path, arrays: list, shapes: list, axes: int) -> None:
    """Each array's per-sample shape (after its first ``axes`` dimensions) is the stored one, else ArtifactError."""
    found = [tuple(a.shape[axes:]) for a in arrays]
    if found != [tuple(shape) for shape in shapes]:
        raise ArtifactError(f"{path}: its arrays have per-sample shapes {found} but its attributes say {shapes}: "
                            "corrupt or not written by this toolkit")


# ---------------------------------------------------------------------------------------------- trajectories
@dataclass
class StoredTrajectory:
    """States and energy over time: states list of L arrays (T, B, n_k) (a layered network's: (T, B, *shape_k));
    energy (T, B); settings dict; network_hash of the network simulated."""

    states: list
    energy: np.ndarray
    settings: dict
    network_hash: str


def save_trajectory(path, trajectory, energy, settings: dict, network_hash: str) -> str:
    """Validate and write a trajectory atomically; return the file's content hash.

    trajectory: list of L float arrays (T, B, n_k), k = 1..L (a layered network's may keep their shapes:
    (T, B, C_k, H_k, W_k)); energy (T, B) float (NaN/inf allowed: a diverging run may be recorded); settings
    JSON-serializable dict; network_hash = the network's content hash.

    Schema (format "ebm-trajectory"; version 1 when every layer is flat, 2 when one keeps a (C, H, W) shape):
      datasets  states/s{k} (T, B, *shape_k) for k = 1..L, energy (T, B) -- each in the dtype given
      attrs     settings (JSON str), network_hash (str), num_steps (int T), batch_size (int B),
                state_sizes (int64 (L,): units n_1..n_L), version 2 also state_shapes (JSON list of the L shapes)
    """
    states = _layer_arrays(trajectory, "trajectory", 3, shaped=True)
    arrays = {**{f"states/s{k + 1}": s for k, s in enumerate(states)},
              "energy": _array(energy, "energy", 2, "f")}
    num_steps, batch = _check_leading(arrays, 2)
    version, shapes = _shapes_version(states, 2)
    config = {"settings": _to_json(settings, "settings"), "network_hash": _check_network_hash(network_hash),
              "num_steps": int(num_steps), "batch_size": int(batch),
              "state_sizes": [int(np.prod(shape)) for shape in shapes]}
    if version == SHAPED_VERSION:
        config["state_shapes"] = json.dumps(shapes)
    return _write_artifact(path, "ebm-trajectory", arrays, config, version)


def load_trajectory(path, network: Network | None = None) -> StoredTrajectory:
    """Read a trajectory (bit-exact). If ``network`` is given, refuse one simulated with another network."""
    datasets, attrs = _load(path, "ebm-trajectory")
    _check_hash_matches(path, attrs["network_hash"], network, "trajectories")
    shapes = _stored_shapes(path, attrs, "state_shapes", "state_sizes")
    states = _take(path, datasets, _layer_names("states/s", 1, len(shapes)))
    (energy,) = _take(path, datasets, ["energy"])
    _check_shapes(path, states, shapes, 2)
    return StoredTrajectory(states, energy, json.loads(attrs["settings"]), attrs["network_hash"])


# ---------------------------------------------------------------------------------------------- info
def artifact_info(path) -> dict:
    """Header, hash status ("ok" / "mismatch") and a summary of any artifact, for ``ebm info``.

    Returns {"path", "format", "version", "created", "toolkit_version", "content_hash", "hash_status",
    "datasets": {name: {"shape", "dtype"}}, "summary": {...format-specific...}}. Raises ArtifactError for a
    missing, non-HDF5, corrupt, non-artifact or unsupported-version file (not for a hash mismatch).
    """
    datasets, attrs, computed = _read_file(path)
    fmt = attrs["format"]
    summary = {}
    if fmt == "ebm-network":
        summary = _network_summary(path, datasets, attrs)
    elif fmt in SUMMARIES:
        summary = SUMMARIES[fmt](attrs)
    elif fmt in ("ebm-fixed-points", "ebm-trajectory"):
        summary = {"network_hash": attrs.get("network_hash"), "settings": json.loads(attrs.get("settings", "{}"))}
        keys = ("num_samples", "layer_sizes") if fmt == "ebm-fixed-points" else ("num_steps", "batch_size",
                                                                                  "state_sizes")
        summary.update({k: attrs.get(k) for k in keys})
        shapes_key = "layer_shapes" if fmt == "ebm-fixed-points" else "state_shapes"
        if attrs.get(shapes_key):
            summary[shapes_key] = ["x".join(map(str, shape)) for shape in json.loads(attrs[shapes_key])]
        if fmt == "ebm-fixed-points" and "converged" in datasets:
            summary["converged"] = f"{int(np.count_nonzero(datasets['converged']))}/{datasets['converged'].size}"
    return {"path": str(path), "format": fmt, "version": attrs["version"], "created": attrs.get("created"),
            "toolkit_version": attrs.get("toolkit_version"), "content_hash": attrs["content_hash"],
            "hash_status": "ok" if computed == attrs["content_hash"] else "mismatch",
            "datasets": {n: {"shape": tuple(a.shape), "dtype": str(a.dtype)} for n, a in sorted(datasets.items())},
            "summary": summary}


def _network_summary(path, datasets: dict, attrs: dict) -> dict:
    """``artifact_info``'s summary of a network file: its architecture (version 1: layer sizes and activation;
    version 2: layer shapes, activation, interactions, cost and any other part of the description), dtype, network
    hash, history and checkpoint keys and the extra attributes."""
    if attrs["version"] == LAYERED_NETWORK_VERSION:
        description = _architecture(path, attrs)
        summary = {"layer_shapes": ["x".join(map(str, shape)) for shape in description["layers"]],
                   "activation": description["activation"],
                   "interactions": [_interaction_text(entry) for entry in description["interactions"]],
                   "cost": f"{description['cost']['kind']}, {description['cost']['classes']} classes",
                   **{k: v for k, v in description.items() if k not in ("layers", "activation", "interactions",
                                                                         "cost")}}
    else:
        summary = {"layer_sizes": attrs.get("layer_sizes"), "activation": attrs.get("activation")}
    return {**summary, "dtype": attrs.get("dtype"), "network_hash": attrs.get("network_hash"),
            "history_keys": sorted(json.loads(attrs.get("history_types", "{}"))),
            "checkpoint_keys": sorted(n[len("checkpoint/"):] for n in datasets
                                      if n.startswith("checkpoint/")) if attrs.get("has_checkpoint") else None,
            "extra": json.loads(attrs.get("extra", "{}"))}


def _interaction_text(entry: dict) -> str:
    """One stored interaction in a line: "conv2d 0->1 (kernel=3 stride=1 padding=1 pool=max)", "bias 1"."""
    layers = f"{entry['pre']}->{entry['post']}" if entry["pre"] != entry["post"] else str(entry["post"])
    settings = " ".join(f"{k}={v}" for k, v in entry.items() if k not in ("kind", "pre", "post"))
    return f"{entry['kind']} {layers}" + (f" ({settings})" if settings else "")


def format_info(info: dict) -> str:
    """Human-readable multi-line text of an ``artifact_info`` dict."""
    lines = [f"{info['path']}",
             f"  format:   {info['format']} (version {info['version']})",
             f"  created:  {info['created']} by ebm-toolkit {info['toolkit_version']}",
             f"  hash:     {info['hash_status']} ({info['content_hash'][:12]})"
             + ("" if info["hash_status"] == "ok" else ": the file was modified or is corrupt")]
    for key, value in info["summary"].items():
        if value is None:
            value = "(none)"
        elif isinstance(value, dict):
            value = json.dumps(value, sort_keys=True)
        elif isinstance(value, (list, tuple)):
            value = ", ".join(str(v) for v in value) if value else "(none)"
        lines.append(f"  {key}: {value}")
    lines.append("  datasets:")
    width = max((len(n) for n in info["datasets"]), default=0)
    lines += [f"    {name:<{width}}  {d['dtype']:<8} {d['shape']}" for name, d in info["datasets"].items()]
    return "\n".join(lines)

"""HDF5 storage of feedforward models (format ``"ebm-feedforward"``: version 1 a dense ``FeedForward``, version 2 a
``LayeredFeedForward``, the student or baseline of a convolutional EBM) and ``load_model`` for every kind.

A feedforward file is written through ``ebm_sim.storage.write_artifact`` (same header, content hash, atomic write
and refusals as the simulator's artifacts; schema in docs/formats.md). Version 1:

  datasets  weights/W{k} (n_{k+1}, n_k), k = 0..L-1, and biases/b{k} (n_k,), k = 1..L, in the model's dtype;
            checkpoint/<name> (only while training: current parameters and optimizer state, see distill.train)
  attrs     layer_sizes (int64 (L+1,)), activation, readout (bool), dtype, kind ("distilled" | "standard" |
            "pgd-at"), config (JSON: the training configuration), dataset (str, "" if unknown),
            network_hash and fixed_points_hash (64-hex of the EBM network and of the fixed-point file's content,
            distilled models only, else ""), provenance (JSON: file names, split, relaxation settings, ...),
            history (JSON {name: [per-epoch values]}), model_hash (SHA-256 of the architecture and parameters,
            checked after loading), has_checkpoint (bool), checkpoint_state (JSON, "{}" without a checkpoint)
Version 2 (layered): datasets params/i{j}/{name} (the j-th interaction's parameters, e.g. a conv weight
(C_out, C_in, k, k) or a bias (C,)) and params/cost/{name} (the readout's weight and bias), checkpoint/<name>; attrs
as version 1 without layer_sizes, plus architecture (JSON: the EBM's ``LayeredNetwork.describe()``) and layer_shapes
(JSON list of the layers' shapes); readout is True for a softmax-readout cost.

``load_model(path)`` returns an ``nn.Module`` mapping images in [0, 1] ((B, n_0) or (B, ...)) to logits, for a
feedforward file of any kind and for an ``ebm-network`` file (``ebm_sim.torch_twin.EBMClassifier``).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from ebm_sim import storage
from ebm_sim.storage import ArtifactError

from .formats import DENSE_VERSION, FORMAT, LAYERED_VERSION
from .models import FeedForward, LayeredFeedForward

KINDS = ("distilled", "standard", "pgd-at")
_TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _json(obj, what: str) -> str:
    """Canonical JSON (sorted keys) of a dict; numpy scalars and arrays become plain values."""
    def default(value):
        if isinstance(value, (np.generic, np.ndarray)):
            return value.tolist()
        if isinstance(value, Path):
            return str(value)
        raise TypeError(f"{type(value).__name__} is not JSON-serializable")

    if not isinstance(obj, dict):
        raise ValueError(f"{what} must be a dict, got {type(obj).__name__}")
    try:
        return json.dumps(obj, sort_keys=True, default=default)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serializable: {e}") from None


def _hex_digest(value, name: str) -> str:
    if not (isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)):
        raise ValueError(f"{name} must be a SHA-256 hex digest (64 lowercase hex characters), got {value!r}")
    return value


def model_hash(model) -> str:
    """SHA-256 over the architecture and dtype and the exact parameter bytes: for a FeedForward (layer sizes,
    activation, readout, dtype) then W_0, ..., b_1, ...; for a LayeredFeedForward the canonical JSON of its
    architecture and its dtype, then the parameters in ``parameter_state`` order."""
    h = hashlib.sha256()
    if isinstance(model, FeedForward):
        h.update(repr((model.layer_sizes, model.activation, model.readout, str(model.dtype))).encode())
        weights, biases = model.weights_biases()
        arrays = (*weights, *biases)
    else:
        h.update((json.dumps(model.architecture, sort_keys=True) + str(model.dtype)).encode())
        arrays = tuple(model.parameter_state().values())
    for array in arrays:
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def _dense_content(model: FeedForward) -> tuple:
    """(datasets, attrs, version) of a FeedForward's parameters and architecture (version 1)."""
    weights, biases = model.weights_biases()
    for k, (w, b) in enumerate(zip(weights, biases)):
        if not (np.all(np.isfinite(w)) and np.all(np.isfinite(b))):
            raise ValueError(f"W_{k} or b_{k + 1} holds NaN or inf: refusing to save a diverged model")
    datasets = {f"weights/W{k}": w for k, w in enumerate(weights)}
    datasets.update({f"biases/b{k + 1}": b for k, b in enumerate(biases)})
    attrs = {"layer_sizes": [int(n) for n in model.layer_sizes], "activation": model.activation,
             "readout": bool(model.readout), "dtype": str(weights[0].dtype)}
    return datasets, attrs, DENSE_VERSION


def _layered_content(model: LayeredFeedForward) -> tuple:
    """(datasets, attrs, version) of a LayeredFeedForward's parameters and architecture (version 2)."""
    state = model.parameter_state()
    for name, array in state.items():
        if not np.all(np.isfinite(array)):
            raise ValueError(f"parameter {name} holds NaN or inf: refusing to save a diverged model")
    datasets = {f"params/{name}": array for name, array in state.items()}
    attrs = {"architecture": _json(model.architecture, "architecture"),
             "layer_shapes": json.dumps([list(s) for s in model.layer_shapes]), "activation": model.activation,
             "readout": model.cost.kind == "softmax_readout", "dtype": str(next(iter(state.values())).dtype)}
    return datasets, attrs, LAYERED_VERSION


#: student class -> fn(model) -> (datasets, architecture attrs, format version)
_CONTENTS = {FeedForward: _dense_content, LayeredFeedForward: _layered_content}


@dataclass
class ModelRecord:
    """A feedforward file's contents: the model (eval mode) and its provenance.

    kind: "distilled" | "standard" | "pgd-at"; config: training configuration; dataset: name or None;
    network_hash / fixed_points_hash: the EBM's ``Network.content_hash()`` and the fixed-point file's content hash
    (distilled models; None otherwise); provenance: further details (file names, split, relax settings...);
    history: {name: per-epoch list}; checkpoint: flat {name: array} and checkpoint_state (dict) while training
    (None once finished); content_hash: the file's; model_hash: ``model_hash(model)``.
    """

    model: FeedForward | LayeredFeedForward
    kind: str
    config: dict
    dataset: str | None
    network_hash: str | None
    fixed_points_hash: str | None
    provenance: dict = field(default_factory=dict)
    history: dict = field(default_factory=dict)
    checkpoint: dict | None = None
    checkpoint_state: dict | None = None
    content_hash: str = ""
    model_hash: str = ""


def save_model(path, model: FeedForward | LayeredFeedForward, kind: str, config: dict, *, dataset: str | None = None,
               network_hash: str | None = None, fixed_points_hash: str | None = None, provenance: dict | None = None,
               history: dict | None = None, checkpoint: dict | None = None,
               checkpoint_state: dict | None = None) -> str:
    """Write ``model`` atomically as an "ebm-feedforward" file and return its content hash.

    kind: one of KINDS. A "distilled" model needs ``network_hash`` (the EBM's) and ``fixed_points_hash`` (the
    fixed-point file's content hash); the baselines take neither. config, provenance, history, checkpoint_state:
    JSON-serializable dicts. checkpoint: flat dict {name: numeric array} stored under ``checkpoint/`` (training
    state; ``load_model`` ignores it). Raises ValueError naming the problem before anything is written.
    """
    if type(model) not in _CONTENTS:
        raise ValueError(f"model must be a distill.models.FeedForward or LayeredFeedForward, got "
                         f"{type(model).__name__}")
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "distilled":
        _hex_digest(network_hash, "network_hash")
        _hex_digest(fixed_points_hash, "fixed_points_hash")
    elif network_hash is not None or fixed_points_hash is not None:
        raise ValueError(f"a {kind!r} model is not distilled: it has no network_hash or fixed_points_hash")
    datasets, architecture, version = _CONTENTS[type(model)](model)
    if checkpoint is not None:
        for name, value in checkpoint.items():
            array = np.asarray(value)
            if not name or name.startswith("/") or array.dtype.kind not in "biuf":
                raise ValueError(f"checkpoint entry {name!r} must be a numeric array with a non-empty name")
            datasets[f"checkpoint/{name}"] = array
    config_attrs = {
        **architecture, "kind": kind,
        "config": _json(dict(config), "config"), "dataset": dataset or "",
        "network_hash": network_hash or "", "fixed_points_hash": fixed_points_hash or "",
        "provenance": _json(dict(provenance or {}), "provenance"),
        "history": _json(dict(history or {}), "history"), "model_hash": model_hash(model),
        "has_checkpoint": checkpoint is not None,
        "checkpoint_state": _json(dict(checkpoint_state or {}), "checkpoint_state")}
    return storage.write_artifact(path, FORMAT, datasets, config_attrs, version)


def load_feedforward(path) -> ModelRecord:
    """Read an "ebm-feedforward" file (bit-exact parameters, provenance, history, any checkpoint). Raises
    ArtifactError for a missing, corrupt, wrong-format, unsupported-version or tampered file."""
    datasets, attrs = storage.read_artifact(path, FORMAT)
    try:
        dtype = _TORCH_DTYPES[attrs["dtype"]]
        model = _READERS[int(attrs["version"])](datasets, attrs, dtype)
        checkpoint = ({name[len("checkpoint/"):]: a for name, a in datasets.items() if name.startswith("checkpoint/")}
                      if attrs["has_checkpoint"] else None)
        record = ModelRecord(
            model=model.eval(), kind=attrs["kind"], config=json.loads(attrs["config"]),
            dataset=attrs["dataset"] or None, network_hash=attrs["network_hash"] or None,
            fixed_points_hash=attrs["fixed_points_hash"] or None, provenance=json.loads(attrs["provenance"]),
            history=json.loads(attrs["history"]), checkpoint=checkpoint,
            checkpoint_state=json.loads(attrs["checkpoint_state"]) if attrs["has_checkpoint"] else None,
            content_hash=attrs["content_hash"], model_hash=attrs["model_hash"])
    except ArtifactError:
        raise
    except (KeyError, ValueError, TypeError) as e:
        raise ArtifactError(f"{path}: malformed {FORMAT} file ({type(e).__name__}: {e}): corrupt or not written "
                            f"by this toolkit") from e
    if model_hash(model) != record.model_hash:
        raise ArtifactError(f"{path}: model hash mismatch (stored {record.model_hash[:12]}, loaded "
                            f"{model_hash(model)[:12]}): corrupt or not written by this toolkit")
    return record


def _read_dense(datasets: dict, attrs: dict, dtype) -> FeedForward:
    sizes = [int(n) for n in attrs["layer_sizes"]]
    num = len(sizes) - 1
    model = FeedForward(sizes, attrs["activation"], bool(attrs["readout"]), dtype=dtype)
    model.load_parameters([datasets[f"weights/W{k}"] for k in range(num)],
                          [datasets[f"biases/b{k}"] for k in range(1, num + 1)])
    return model


def _read_layered(datasets: dict, attrs: dict, dtype) -> LayeredFeedForward:
    state = {name[len("params/"):]: array for name, array in datasets.items() if name.startswith("params/")}
    return LayeredFeedForward.from_state(json.loads(attrs["architecture"]), state, dtype=dtype)


#: format version -> fn(datasets, attrs, torch dtype) -> the model with its parameters
_READERS = {DENSE_VERSION: _read_dense, LAYERED_VERSION: _read_layered}


def artifact_format(path) -> str:
    """The ``format`` attribute of an artifact file (ArtifactError, as the loaders word it, if it has none)."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            fmt = f.attrs.get("format")
    except OSError:
        fmt = None
    if isinstance(fmt, bytes):
        fmt = fmt.decode()
    if not isinstance(fmt, str):
        storage.artifact_info(path)  # raises the storage's message (no such file, not HDF5, not an artifact, ...)
        raise ArtifactError(f"{path} has no readable 'format' attribute")
    return fmt


def stored_content_hash(path) -> str:
    """The ``content_hash`` attribute of an artifact (call after a loader has verified the file)."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            value = f.attrs["content_hash"]
    except (OSError, KeyError) as e:
        raise ArtifactError(f"{path}: cannot read its content_hash ({e})") from e
    return value.decode() if isinstance(value, bytes) else str(value)


def load_model(path, **ebm_options) -> torch.nn.Module:
    """Any stored model as an ``nn.Module`` in eval mode: images in [0, 1], (B, n_0) or (B, ...) -> logits (B, C).

    - "ebm-feedforward" (distilled, standard, pgd-at): a ``FeedForward`` or ``LayeredFeedForward``
      (``.provenance`` holds its ModelRecord without the model);
    - "ebm-network": ``ebm_sim.torch_twin.EBMClassifier(network, **ebm_options)``, which runs the deployed
      relaxation (options: method, max_steps, tol, ...). NotImplementedError if the twin does not offer it.
    Other files raise ArtifactError.
    """
    fmt = artifact_format(path)
    if fmt == "ebm-network":
        network = storage.load_dense_network(path, "load_model (the Torch twin)")
        from ebm_sim import torch_twin
        classifier = getattr(torch_twin, "EBMClassifier", None)
        if classifier is None:
            raise NotImplementedError(f"load_model({path}): loading an ebm-network as a torch module needs "
                                      f"ebm_sim.torch_twin.EBMClassifier, which this version does not have yet")
        return classifier(network, **ebm_options).eval()
    if ebm_options:
        raise ValueError(f"options {sorted(ebm_options)} apply to ebm-network files only, not to {path} ({fmt})")
    record = load_feedforward(path)  # refuses every other format with the storage's message
    model = record.model
    record.model = None
    model.provenance = record
    return model

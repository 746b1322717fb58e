"""Digital deployment: export a feedforward classifier (distilled student or baseline) to ONNX and run it with
onnxruntime.

The exported graph maps

    images  float32 (B, *input_shape), values in [0, 1]   ->   logits  float32 (B, n_classes)

with a dynamic batch axis B (named ``"batch"``) unless ``dynamic_batch=False``. Normalization, if any, must live
inside the module, as for every model of the toolkit (images in [0, 1] in, logits out).

Export uses torch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``): it *traces* the module
once, so Python control flow that depends on the data is frozen at the traced path (the toolkit's students have
none). It exports a float32 CPU copy in eval mode; the caller's module is left as it was (dtype, device, mode).

Files are written atomically (``ebm_sim.storage.atomic_path``: temporary file in the target's directory, fsync,
``os.replace``), and checked with ``onnx.checker`` *before* the rename: a failed export or check leaves no file and
an existing target untouched.

Metadata (provenance: model kind, hashes of the network and fixed-point files, ...) goes into the ONNX model's
``metadata_props`` (string -> string): string values are stored as they are, other JSON values as JSON text, their
keys listed under ``ebm_toolkit.json_keys`` so that ``OnnxClassifier.metadata`` returns the dict that was given.
Keys starting with ``ebm_toolkit.`` are reserved for the toolkit's own entries (format, version, input shape).

Versions checked together (requirements.txt): onnx 1.23.2, onnxscript 0.7.2, onnxruntime 1.32.0 (CPU wheel),
ml_dtypes 0.5.4 beside torch 2.13.0+cpu and numpy 1.26.4.
"""
from __future__ import annotations

import copy
import io
import json
import logging
import math
import warnings
from importlib import metadata as _importlib_metadata
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from ebm_sim.storage import ArtifactError, atomic_path

FORMAT = "ebm-onnx-classifier"
FORMAT_VERSION = 1
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
BATCH_AXIS = "batch"
RESERVED_PREFIX = "ebm_toolkit."
_KEY_FORMAT = RESERVED_PREFIX + "format"
_KEY_FORMAT_VERSION = RESERVED_PREFIX + "format_version"
_KEY_TOOLKIT_VERSION = RESERVED_PREFIX + "toolkit_version"
_KEY_INPUT_SHAPE = RESERVED_PREFIX + "input_shape"
_KEY_JSON_KEYS = RESERVED_PREFIX + "json_keys"


class OnnxModelError(ArtifactError):
    """A file that cannot be used as an exported ONNX classifier (missing, not ONNX, invalid); names the path."""


def _toolkit_version() -> str:
    try:
        return _importlib_metadata.version("ebm-toolkit")
    except _importlib_metadata.PackageNotFoundError:
        return "unknown"


def _sample_shape(input_shape) -> tuple:
    """``input_shape`` (int or sequence of ints): the shape of ONE sample, without the batch axis."""
    shape = (input_shape,) if isinstance(input_shape, (int, np.integer)) else tuple(input_shape)
    if not shape or any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0 for n in shape):
        raise ValueError(f"input_shape must be a positive int or a tuple of positive ints (one sample, no batch "
                         f"axis; e.g. 784 for (B, 784) images), got {input_shape!r}")
    return tuple(int(n) for n in shape)


def _metadata_props(metadata: dict | None, sample_shape: tuple) -> dict:
    """User metadata plus the toolkit's reserved entries, as the string -> string map ONNX stores."""
    props, json_keys = {}, []
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"metadata keys must be non-empty strings, got {key!r}")
        if key.startswith(RESERVED_PREFIX):
            raise ValueError(f"metadata key {key!r} uses the reserved prefix {RESERVED_PREFIX!r}")
        if isinstance(value, str):
            props[key] = value
            continue
        try:
            props[key] = json.dumps(value, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise ValueError(f"metadata[{key!r}] = {value!r} is neither a string nor a JSON value: {error}") from None
        json_keys.append(key)
    props[_KEY_FORMAT] = FORMAT
    props[_KEY_FORMAT_VERSION] = str(FORMAT_VERSION)
    props[_KEY_TOOLKIT_VERSION] = _toolkit_version()
    props[_KEY_INPUT_SHAPE] = json.dumps(list(sample_shape))
    props[_KEY_JSON_KEYS] = json.dumps(sorted(json_keys))
    return props


def _decode_metadata(props: dict) -> dict:
    """Inverse of ``_metadata_props`` for the user's entries (reserved entries dropped)."""
    try:
        json_keys = set(json.loads(props.get(_KEY_JSON_KEYS, "[]")))
    except ValueError:
        json_keys = set()
    out = {}
    for key, value in props.items():
        if key.startswith(RESERVED_PREFIX):
            continue
        if key in json_keys:
            try:
                value = json.loads(value)
            except ValueError:
                pass  # written by another tool: keep the string
        out[key] = value
    return out


def _export_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A float32 CPU copy in eval mode (the caller's module is not touched)."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    clone = copy.deepcopy(module)
    return clone.to(device="cpu", dtype=torch.float32).eval()


def export_onnx(module: torch.nn.Module, path, input_shape, opset: int = 17, dynamic_batch: bool = True,
                metadata: dict | None = None, static_batch_size: int = 1) -> Path:
    """Export ``module`` (images (B, *input_shape) in [0, 1] -> logits (B, n_classes)) to the ONNX file ``path``.

    input_shape: the shape of one sample without the batch axis (784 or (784,) for (B, 784) inputs).
    opset: ONNX opset version. dynamic_batch: B is a free axis ``"batch"``; else B is fixed to
    ``static_batch_size``. metadata: provenance (str -> str or JSON value), stored in ``metadata_props``.
    Input ``"images"`` float32, output ``"logits"`` float32. Written atomically and checked with ``onnx.checker``
    before the rename. Returns the path.
    """
    path = Path(path)
    shape = _sample_shape(input_shape)
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 7:
        raise ValueError(f"opset must be an int >= 7, got {opset!r}")
    if isinstance(static_batch_size, bool) or not isinstance(static_batch_size, int) or static_batch_size <= 0:
        raise ValueError(f"static_batch_size must be a positive int, got {static_batch_size!r}")
    props = _metadata_props(metadata, shape)  # validate the metadata before any work
    clone = _export_copy(module)

    batch = 2 if dynamic_batch else static_batch_size
    example = torch.rand((batch,) + shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    with torch.no_grad():
        out = clone(example)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != batch:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"module must map images (B, {', '.join(map(str, shape))}) to logits (B, n_classes); "
                         f"for B = {batch} it returned {got} (input_shape is one sample's shape, no batch axis)")

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # torch >= 2.9 warns that the TorchScript exporter is legacy; it is the one chosen here (dynamo=False).
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*",
                                category=DeprecationWarning)
        # ... and its internals raise DeprecationWarnings about their own helpers (nothing the caller can act on).
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx\.")
        torch.onnx.export(
            clone, (example,), buffer, dynamo=False, export_params=True, do_constant_folding=True,
            opset_version=opset, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: BATCH_AXIS}, OUTPUT_NAME: {0: BATCH_AXIS}} if dynamic_batch else None,
        )
    model = onnx.load_model_from_string(buffer.getvalue())
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.doc_string = f"{FORMAT} v{FORMAT_VERSION}: images float32 (B, {', '.join(map(str, shape))}) in [0, 1] -> logits"

    with atomic_path(path) as tmp:
        tmp.write_bytes(model.SerializeToString())
        check_onnx(tmp, name=path)
    return path


QUANTIZATIONS = ("int8",)
_KEY_QUANTIZATION = RESERVED_PREFIX + "quantization"


def quantize_onnx(source, path, quantization: str = "int8") -> Path:
    """Quantize an exported classifier for CPU deployment: ``"int8"`` is onnxruntime's dynamic quantization
    (weights stored as int8 with one scale per tensor; activations quantized to uint8 at run time with the range
    observed over the whole call's batch; MatMulInteger products accumulated in int32, then rescaled to float32).
    Convolutions (students of convolutional EBMs) become ConvInteger the same way (int8 weights, uint8 activations).
    No calibration data is needed. The logits differ from the float model's by the quantization error (measure the
    agreement), and because the activation range is the batch's, a sample's logits depend slightly on the rest of
    its batch.

    source: an ONNX file written by ``export_onnx``; path: the quantized file (written atomically, checked). Its
    metadata keeps the source's and adds ``ebm_toolkit.quantization``. Returns the path.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
    source, path = Path(source), Path(path)
    check_onnx(source)
    if source.resolve() == path.resolve():
        raise ValueError(f"quantize_onnx writes a new file: {path} is the source itself")
    with atomic_path(path) as tmp:
        quantization_logger = logging.getLogger()  # quantize_dynamic logs a pre-processing hint on the root logger
        level = quantization_logger.level
        quantization_logger.setLevel(logging.ERROR)
        try:
            quantize_dynamic(str(source), str(tmp), weight_type=QuantType.QInt8)
        finally:
            quantization_logger.setLevel(level)
        model = onnx.load(str(tmp))
        entry = model.metadata_props.add()
        entry.key, entry.value = _KEY_QUANTIZATION, quantization
        tmp.write_bytes(model.SerializeToString())
        check_onnx(tmp, name=path)
    return path


def check_onnx(path, name=None) -> None:
    """Validate the ONNX file ``path`` with ``onnx.checker`` (full check, shape inference included); raise
    ``OnnxModelError`` naming the file (``name``, default ``path``) when it is missing, not ONNX, or invalid."""
    path, name = Path(path), Path(name) if name is not None else Path(path)
    if not path.is_file():
        raise OnnxModelError(f"{name}: no such ONNX file")
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as error:  # onnx raises ValidationError, DecodeError, InferenceError, ...
        raise OnnxModelError(f"{name} is not a valid ONNX model: {type(error).__name__}: "
                             f"{str(error).strip()[:500]}") from error


def default_providers() -> list:
    """onnxruntime execution providers: CUDA first when this onnxruntime build has it, then CPU."""
    available = ort.get_available_providers()
    return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []) + ["CPUExecutionProvider"]


class OnnxClassifier:
    """An exported classifier run by an onnxruntime InferenceSession.

    path: the ONNX file. intra_op_threads: onnxruntime's intra-op thread count (None or 0: its default, one per
    core). providers: execution providers (default ``default_providers()``: CUDA first when available, else CPU).
    check_inputs: validate every input (shape, finite, in [0, 1]); turn off only to time the bare session.

    ``clf(x)``: logits (B, n_classes) float32 for images x (B, *input_shape); ``clf.predict(x)``: argmax labels
    (B,) int64; ``clf.metadata``: the metadata given to ``export_onnx``; ``clf.input_shape``: one sample's shape.
    """

    def __init__(self, path, intra_op_threads: int | None = None, providers: list | None = None,
                 check_inputs: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            raise OnnxModelError(f"{self.path}: no such ONNX file")
        if intra_op_threads is not None and (isinstance(intra_op_threads, bool)
                                             or not isinstance(intra_op_threads, int) or intra_op_threads < 0):
            raise ValueError(f"intra_op_threads must be None or an int >= 0, got {intra_op_threads!r}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads or 0
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.providers = list(providers) if providers is not None else default_providers()
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=self.providers)
        except Exception as error:  # InvalidProtobuf, Fail, InvalidGraph, ...
            raise OnnxModelError(f"{self.path} is not a loadable ONNX model: {type(error).__name__}: "
                                 f"{str(error).strip()[:500]}") from error
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or not outputs:
            raise OnnxModelError(f"{self.path}: a classifier has one input and at least one output; this model has "
                                 f"inputs {[i.name for i in inputs]} and outputs {[o.name for o in outputs]}")
        if inputs[0].type != "tensor(float)":
            raise OnnxModelError(f"{self.path}: input {inputs[0].name!r} is {inputs[0].type}, expected tensor(float)")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        dims = list(inputs[0].shape)
        self.batch_size = dims[0] if dims and isinstance(dims[0], int) else None  # None: dynamic batch
        self.input_shape = tuple(d if isinstance(d, int) else None for d in dims[1:])
        self.check_inputs = bool(check_inputs)
        props = dict(self.session.get_modelmeta().custom_metadata_map)
        self.metadata_props = props
        self.metadata = _decode_metadata(props)
        self.quantization = props.get(_KEY_QUANTIZATION)  # None for a float model, "int8" after quantize_onnx

    def __repr__(self) -> str:
        batch = "B" if self.batch_size is None else self.batch_size
        return (f"OnnxClassifier({str(self.path)!r}, input=({batch}, {', '.join(map(str, self.input_shape))}), "
                f"providers={self.session.get_providers()})")

    def _check(self, x) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype.kind not in "fiub":
            raise ValueError(f"images must be a numeric array, got dtype {x.dtype}")
        if x.dtype.kind in "iub" and self.check_inputs:
            raise ValueError(f"images must be floats in [0, 1], got dtype {x.dtype} (scale integer pixels first)")
        x = np.ascontiguousarray(x, dtype=np.float32)
        expected = f"(B, {', '.join('?' if d is None else str(d) for d in self.input_shape)})"
        if x.ndim != 1 + len(self.input_shape) or any(
                d is not None and d != n for d, n in zip(self.input_shape, x.shape[1:])):
            raise ValueError(f"images must have shape {expected} for {self.path.name}, got {x.shape}")
        if self.batch_size is not None and x.shape[0] != self.batch_size:
            raise ValueError(f"{self.path.name} was exported with a fixed batch of {self.batch_size}, got a batch of "
                             f"{x.shape[0]} (export with dynamic_batch=True for any batch)")
        if self.check_inputs and x.size:
            lo, hi = float(x.min()), float(x.max())
            if math.isnan(lo) or math.isnan(hi):
                raise ValueError("images contain NaN")
            if lo < 0.0 or hi > 1.0:
                raise ValueError(f"images must lie in [0, 1], got values in [{lo:g}, {hi:g}]")
        return x

    def __call__(self, x, batch_size: int | None = None) -> np.ndarray:
        """Logits (B, n_classes) float32 for images x (B, *input_shape) in [0, 1]; ``batch_size`` splits a large x
        into chunks (not for a fixed-batch export)."""
        x = self._check(x)
        if batch_size is None or x.shape[0] <= batch_size:
            return self.session.run([self.output_name], {self.input_name: x})[0]
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        return np.concatenate([self.session.run([self.output_name], {self.input_name: x[i:i + batch_size]})[0]
                               for i in range(0, x.shape[0], batch_size)])

    def predict(self, x, batch_size: int | None = None) -> np.ndarray:
        """Predicted labels argmax_k logits[:, k], shape (B,), int64."""
        return np.argmax(self(x, batch_size=batch_size), axis=1)


def compare_with_torch(module: torch.nn.Module, path, x, intra_op_threads: int | None = None) -> float:
    """max |logits_onnx(x) - logits_torch(x)| over all entries, for images x (B, *input_shape) in [0, 1].

    The torch side runs ``module`` as it is (its dtype and device, in eval mode, restored afterwards), the ONNX side
    the float32 file on onnxruntime's CPU provider.
    """
    x = np.asarray(x, dtype=np.float32)
    onnx_logits = OnnxClassifier(path, intra_op_threads=intra_op_threads, providers=["CPUExecutionProvider"])(x)
    torch_logits = _torch_logits(module, x)
    if torch_logits.shape != onnx_logits.shape:
        raise ValueError(f"torch logits {torch_logits.shape} and ONNX logits {onnx_logits.shape} differ in shape")
    return float(np.max(np.abs(onnx_logits.astype(np.float64) - torch_logits))) if torch_logits.size else 0.0


def measure_export(module: torch.nn.Module, path, x, y=None, intra_op_threads: int | None = None,
                   batch_size: int | None = None) -> dict:
    """How an exported file (float or int8) stands against the torch module it came from, on images x
    (B, *input_shape) in [0, 1] and optional labels y (B,):

        max_abs_difference    max |logits_onnx - logits_torch|
        prediction_agreement  share of samples with argmax logits_onnx = argmax logits_torch
        accuracy_onnx, accuracy_torch (with y)   share of argmax = y
        n, quantization ("none" or the file's, e.g. "int8")

    Works for every classifier the toolkit exports (dense FeedForward, convolutional LayeredFeedForward, ...): the
    ONNX side runs on onnxruntime's CPU provider, ``batch_size`` chunks it (int8 files quantize activations over
    the chunk); the torch side is run as ``compare_with_torch`` runs it."""
    x = np.asarray(x, dtype=np.float32)
    if y is not None:
        y = np.asarray(y)
        if y.shape != (x.shape[0],):
            raise ValueError(f"{x.shape[0]} images but labels of shape {y.shape}")
    classifier = OnnxClassifier(path, intra_op_threads=intra_op_threads, providers=["CPUExecutionProvider"])
    onnx_logits = classifier(x, batch_size=batch_size).astype(np.float64)
    torch_logits = _torch_logits(module, x)
    if torch_logits.shape != onnx_logits.shape:
        raise ValueError(f"torch logits {torch_logits.shape} and ONNX logits {onnx_logits.shape} differ in shape")
    onnx_pred, torch_pred = onnx_logits.argmax(1), torch_logits.argmax(1)
    out = {"max_abs_difference": float(np.max(np.abs(onnx_logits - torch_logits))) if x.shape[0] else 0.0,
           "prediction_agreement": float(np.mean(onnx_pred == torch_pred)), "n": int(x.shape[0]),
           "quantization": classifier.quantization or "none"}
    if y is not None:
        out.update(accuracy_onnx=float(np.mean(onnx_pred == y)), accuracy_torch=float(np.mean(torch_pred == y)))
    return out


def _torch_logits(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """``module(x)`` as float64 numpy, in the module's dtype and on its device, in eval mode (restored afterwards)."""
    parameter = next(iter(module.parameters()), None)
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    device = parameter.device if parameter is not None else torch.device("cpu")
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            return module(torch.as_tensor(x, dtype=dtype, device=device)).detach().cpu().double().numpy()
    finally:
        module.train(was_training)

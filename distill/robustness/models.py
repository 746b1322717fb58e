"""The models a robustness evaluation attacks, seen alike: what they deploy, and where attack gradients come from.

Every model under test offers
- ``predict(x)``: the deployed prediction for flattened images x (N, n_0) in [0, 1] -> labels (N,). For an EBM this
  is the toolkit's simulator (Numba kernels) with the deployed integrator, tolerance and step cap, argmax of s_L (or
  of its readout): an adversarial example counts only if it fools *this*.
- ``sources``: {name: nn.Module} whose logits and input gradients white-box attacks use. A feedforward model has
  one, ``"backprop"`` (itself). An EBM has up to three (README.md, "Robustness evaluation"):
    ``"bptt"``      backpropagation through every step of the deployed relaxation (``EBMClassifier``),
    ``"implicit"``  implicit differentiation at the fixed point (``ImplicitEBM``),
    ``"transfer"``  its distilled student: adversarial examples crafted on it, judged on the EBM;
  per example the worst case over the sources counts.
  Logits of the EBM sources are the output layer's last update before the clip (or the readout's): its clip is the
  deployed s_L, so a saturated output unit keeps its gradient and, unlike the field of the final states (one step
  ahead of an unconverged relaxation), it decides as deployed. Where they still differ (ties among saturated or
  silent outputs, float rounding between the Torch twin and the Numba kernels), ``agree_with_deployed`` lifts the
  deployed class's logit just above the others by a detached offset: an attack's own success test is then the
  deployed prediction's, and no success is claimed that the deployed model rejects. ``raw_sources`` keeps the
  sources without it (the audit compares them with the deployed prediction).
- ``black_box``: a module that only answers queries (logits of the deployed fixed point), for Square.
``ModuleUnderTest`` wraps any torch classifier the same way (a user's own model); ``FeedForwardUnderTest`` the
toolkit's students and baselines, ``EBMUnderTest`` an EBM network file: a dense ``Network`` (deployed with the Numba
kernels, attacked through the Torch twin) or a ``LayeredNetwork`` (e.g. convolutional: deployed with
``ebm_sim.model.dynamics`` on the Numba interaction backend, attacked through ``ebm_sim.model.classifier``'s
``LayeredEBMClassifier`` and ``LayeredImplicitEBM``).
- ``relaxation_stats(x)`` (EBMs): residuals, convergence and steps of the deployed relaxation, for the audit.
- ``configure(config)``: the evaluation's options that change a model's sources (``evaluate`` calls it first). For a
  layered EBM: ``config.as_published`` adds the side source ``"bptt-truncated"`` (``LayeredEBMClassifier`` with
  ``attack_steps=K``: the published truncated attack; reported beside the worst case, not in it: ``SIDE_SOURCES``),
  and ``config.checkpoint_steps`` sets the BPTT sources' checkpointing. ``source_options(source)``: what besides its
  name identifies a source's attacks (e.g. {"attack_steps": 29}), recorded in the keys of its results.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ebm_sim import storage
from ebm_sim.deployment import Deployment
from ebm_sim.model.network import LayeredNetwork

from .config import AS_PUBLISHED_SOURCE, EBM_GRADIENTS, SIDE_SOURCES


def _batches(n: int, size: int):
    return ((start, min(start + size, n)) for start in range(0, n, size))


class ModelUnderTest:
    """Common part: name, kind ("ebm", "distilled", "standard", "pgd-at"), the file and its content hash, the
    input size, ``image_shape`` (the per-sample shape attacks see, e.g. (1, 28, 28)) and ``native_shape`` (the image
    shape a convolutional model needs, None for a model that takes any shape with its input size)."""

    kind: str
    sources: dict
    black_box: torch.nn.Module
    native_shape: tuple | None = None

    def __init__(self, name: str, path, content_hash: str):
        self.name = name
        self.path = Path(path)
        self.content_hash = content_hash
        self.parameters_hash = content_hash  # subclasses: a hash of the parameters alone

    def set_image_shape(self, image_shape, input_size: int) -> None:
        """image_shape (None: ``native_shape``, else (input_size,)) with input_size pixels, and for a model with a
        ``native_shape`` that shape or the flattened (input_size,); ValueError otherwise."""
        default = self.native_shape or (input_size,)
        shape = default if image_shape is None else tuple(int(n) for n in image_shape)
        if int(np.prod(shape)) != input_size:
            raise ValueError(f"{self.name}: image shape {shape} has {int(np.prod(shape))} pixels but the model takes "
                             f"{input_size} inputs")
        if self.native_shape is not None and shape not in (tuple(self.native_shape), (input_size,)):
            raise ValueError(f"{self.name}: the model takes images {tuple(self.native_shape)} (or flattened, "
                             f"({input_size},)), got image shape {shape}")
        self.image_shape = shape
        self.input_size = input_size

    @property
    def num_classes(self) -> int | None:
        """The number of classes (None where unknown: a user's module without a ``num_classes``)."""
        return getattr(self, "_num_classes", None)

    def configure(self, config) -> None:
        """Apply an evaluation's ``RobustnessConfig`` to the sources (nothing to do but for an EBM)."""

    def source_options(self, source: str) -> dict:
        """What besides its name identifies the attacks of ``source`` ({} unless a side source's settings)."""
        return {}

    def side_sources(self) -> dict:
        """{source: {"label", "paired_with", "paired_label", ...}} of the side sources (``config.SIDE_SOURCES``:
        reported beside the worst case, not in it); none but for a configured EBM."""
        return {}

    def predict(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> dict:
        """What the report records about the model."""
        return {"name": self.name, "kind": self.kind, "file": None if self.path is None else str(self.path),
                "content_hash": self.content_hash, "parameters_hash": self.parameters_hash,
                "gradient_sources": sorted(self.sources)}


class ModuleUnderTest(ModelUnderTest):
    """Any torch classifier (images in [0, 1] -> logits), deployed and attacked as itself: ``module`` in eval mode,
    its one gradient source "backprop". content_hash: its file's (default: SHA-256 of its state_dict);
    parameters_hash: what identifies its behaviour in resumable results (default: the state_dict's SHA-256)."""

    def __init__(self, name: str, module: torch.nn.Module, input_size: int, image_shape: tuple | None = None,
                 kind: str = "custom", content_hash: str | None = None, batch_size: int = 4096):
        self.name, self.path = name, None
        self.model = module.eval()
        self.kind = kind
        self.parameters_hash = state_hash(module)
        self.content_hash = content_hash or self.parameters_hash
        self.set_image_shape(image_shape, int(input_size))
        self.sources = {"backprop": self.model}
        self.black_box = self.model
        self._num_classes = getattr(module, "num_classes", None)
        self.batch_size = batch_size

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32).reshape((len(x),) + self.image_shape)
        with torch.no_grad():
            return np.concatenate([self.model(torch.from_numpy(x[a:b])).argmax(1).numpy()
                                   for a, b in _batches(len(x), self.batch_size)] or [np.zeros(0, np.int64)])


def state_hash(module: torch.nn.Module) -> str:
    """SHA-256 over a module's class name and state_dict (names, shapes, dtypes, bytes)."""
    import hashlib
    digest = hashlib.sha256(type(module).__name__.encode())
    for name, tensor in sorted(module.state_dict().items()):
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{name}{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


class FeedForwardUnderTest(ModuleUnderTest):
    """A distilled student or a baseline from its file (``ebm-feedforward`` version 1: a dense
    ``distill.models.FeedForward``; version 2: a convolutional ``LayeredFeedForward``, whose images are
    (C, H, W): its ``native_shape``): deployed and attacked as itself."""

    def __init__(self, name: str, path, image_shape: tuple | None = None, batch_size: int = 4096):
        from distill.io import load_model
        model = load_model(path)
        shape = tuple(int(n) for n in model.input_shape)
        self.native_shape = shape if len(shape) > 1 else None
        super().__init__(name, model, int(np.prod(shape)), image_shape, model.provenance.kind,
                         model.provenance.content_hash, batch_size)
        self.path = Path(path)


class EBMUnderTest(ModelUnderTest):
    """An EBM network file: deployed with the Numba simulator at ``deployment``; attacked through the sources in
    ``gradients`` (see the module docstring); ``student``: the path of its distilled student for "transfer"."""

    kind = "ebm"

    def __init__(self, name: str, path, image_shape: tuple | None = None, deployment: Deployment | None = None,
                 student=None, gradients=None, batch_size: int = 1024):
        info = storage.artifact_info(path)
        super().__init__(name, path, info["content_hash"])
        self.network = storage.load_network(path)
        self.layered = isinstance(self.network, LayeredNetwork)
        self._num_classes = self.network.num_classes if self.layered else self.network.layer_sizes[-1]
        self.parameters_hash = self.network.content_hash()  # architecture and parameters (not the history)
        if self.layered:
            self.native_shape = tuple(self.network.input_shape)
            self.set_image_shape(image_shape, int(np.prod(self.network.input_shape)))
        else:
            self.set_image_shape(image_shape, self.network.layer_sizes[0])
        self.deployment = deployment or Deployment.of_network_file(path, info)
        gradients = tuple(gradients) if gradients is not None else (
            ("bptt", "implicit") + (("transfer",) if student is not None else ()))
        unknown = [g for g in gradients if g not in EBM_GRADIENTS]
        if unknown or not gradients:
            raise ValueError(f"EBM gradient sources must be some of {', '.join(EBM_GRADIENTS)}, got {list(gradients)}")
        if "transfer" in gradients and student is None:
            raise ValueError(f"{name}: the transfer attack needs the EBM's distilled student (a student file)")
        modules = attack_modules(self.network)
        raw = {g: modules[g](self.network, logits="update", deployment=self.deployment).eval()
               for g in gradients if g in modules}
        self.raw_sources = dict(raw)
        self.sources = {name: AgreeWithDeployed(module, self) for name, module in raw.items()}
        self._source_options = {}
        self.student_path = None
        if "transfer" in gradients:  # the student's own logits: a transfer attack is judged on the EBM afterwards
            self.sources["transfer"] = self.raw_sources["transfer"] = self._load_student(student)
        self.batch_size = batch_size
        self.black_box = DeployedLogits(self)

    def configure(self, config) -> None:
        """The evaluation's EBM options (``RobustnessConfig``): with ``as_published`` the side source
        "bptt-truncated" (``LayeredEBMClassifier(attack_steps=config.as_published_steps)``; layered networks only,
        ValueError for a dense one), without it none; each layered BPTT source's ``checkpoint_steps`` from
        ``config.checkpoint_for`` of the steps it differentiates through. Configuring again replaces both."""
        for table in (self.sources, self.raw_sources):
            table.pop(AS_PUBLISHED_SOURCE, None)
        self._source_options = {}
        if config.as_published:
            if not self.layered:
                raise ValueError(f"{self.name}: the 'as published' truncated attack (as_published) exists for layered "
                                 f"(convolutional) EBMs; {self.path} holds a dense network, whose BPTT (the Torch "
                                 f"twin) is never truncated")
            steps = int(config.as_published_steps)
            module = attack_modules(self.network)["bptt"](self.network, logits="update", deployment=self.deployment,
                                                          attack_steps=steps).eval()
            self.raw_sources[AS_PUBLISHED_SOURCE] = module
            self.sources[AS_PUBLISHED_SOURCE] = AgreeWithDeployed(module, self)
            self._source_options[AS_PUBLISHED_SOURCE] = {"attack_steps": steps}
        for module in self.raw_sources.values():
            if hasattr(module, "checkpoint_steps") and hasattr(module, "attack_steps"):  # a LayeredEBMClassifier
                steps = min(module.attack_steps or self.deployment.max_steps, self.deployment.max_steps)
                module.checkpoint_steps = config.checkpoint_for(steps)

    def source_options(self, source: str) -> dict:
        return dict(self._source_options.get(source, {}))

    def side_sources(self) -> dict:
        """{source: {"label", "attack_steps", "deployed_steps", "paired_with", "paired_label"}} of the side sources
        (reported beside the worst case, not in it)."""
        found = {}
        for source in sorted(set(self.sources) & set(SIDE_SOURCES)):
            steps = self._source_options[source]["attack_steps"]
            label = SIDE_SOURCES[source].label.format(steps=steps)
            if steps >= self.deployment.max_steps:
                label += f" = full BPTT (the deployment has {self.deployment.max_steps} steps)"
            found[source] = {"label": label, "attack_steps": steps, "deployed_steps": self.deployment.max_steps,
                             "paired_with": SIDE_SOURCES[source].paired_with,
                             "paired_label": SIDE_SOURCES[source].paired_label}
        return found

    def _load_student(self, student) -> torch.nn.Module:
        from distill.io import load_model
        model = load_model(student)
        record = model.provenance
        if record.kind != "distilled" or record.network_hash != self.network.content_hash():
            raise ValueError(f"{student} is not a student distilled from {self.path} (kind {record.kind!r}, network "
                             f"hash {str(record.network_hash)[:12]} vs {self.network.content_hash()[:12]}): the "
                             f"transfer attack uses the EBM's own distilled student")
        self.student_path = Path(student)
        return model

    def _relax(self, x: np.ndarray) -> list:
        """The deployed relaxation of x (N, n_0) in batches: a list of ``Relaxed``."""
        relax_batch = relax_layered if self.layered else relax_dense
        x = np.asarray(x, dtype=self.network.dtype).reshape(len(x), -1)
        return [relax_batch(self.network, x[a:b], self.deployment) for a, b in _batches(len(x), self.batch_size)]

    def predict(self, x: np.ndarray) -> np.ndarray:
        results = self._relax(x)
        return np.concatenate([r.predictions for r in results]) if results else np.zeros(0, np.int64)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits of the deployed relaxation (Numba) whose argmax is the deployed prediction: the readout's, or the
        output field a h_L of the final states (dense: a (W_{L-1} s_{L-1} + b_L)) passed through
        ``agree_with_deployed`` with the same relaxation's predictions; (N, C) float32."""
        out = [agree_with_deployed(torch.from_numpy(np.asarray(r.logits, np.float32)),
                                   torch.from_numpy(r.predictions)).numpy() for r in self._relax(x)]
        return np.concatenate(out) if out else np.zeros((0, self.network.num_classes if self.layered else
                                                         self.network.layer_sizes[-1]), np.float32)

    def relaxation_stats(self, x: np.ndarray) -> dict:
        """Of the deployed relaxation on x: {"residual", "converged", "steps"} per sample (numpy arrays)."""
        results = self._relax(x)
        return {key: np.concatenate([getattr(r, key) for r in results]) for key in ("residual", "converged", "steps")}

    def describe(self) -> dict:
        checkpointed = {name: module.checkpoint_steps for name, module in sorted(self.raw_sources.items())
                        if getattr(module, "checkpoint_steps", None)}
        return {**super().describe(), "deployment": self.deployment.as_dict(),
                "student": None if self.student_path is None else str(self.student_path),
                "side_sources": self.side_sources(), "checkpoint_steps": checkpointed}


@dataclass
class Relaxed:
    """One batch's deployed relaxation as the evaluation uses it (numpy, N samples): predictions (N,), logits (N, C)
    (the readout's, or the output field a h_L of the final states), residual, converged and steps (N,)."""

    predictions: np.ndarray
    logits: np.ndarray
    residual: np.ndarray
    converged: np.ndarray
    steps: np.ndarray


def relax_dense(network, x: np.ndarray, deployment: Deployment) -> Relaxed:
    """A dense Network's deployed relaxation (Numba kernels) of flattened images x (N, n_0)."""
    from ebm_sim.relax import relax
    result = relax(network, x, on_divergence="flag", deployment=deployment)
    if "logits" in result.extras:
        logits = result.extras["logits"]
    else:
        below = result.states[-2] if len(result.states) > 1 else x
        logits = network.slope * (below @ network.weights[-1].T + network.biases[-1])
    return Relaxed(result.predictions(), logits, result.residual, result.converged, result.steps)


def relax_layered(network, x: np.ndarray, deployment: Deployment) -> Relaxed:
    """A LayeredNetwork's deployed relaxation (``ebm_sim.model.dynamics`` on the Numba interaction backend) of
    flattened images x (N, prod(input_shape)); logits: ``energy.output`` with a readout, else a h_L."""
    from ebm_sim.model import dynamics, energy
    params = energy.parameters(network, "numba")
    images = np.ascontiguousarray(x.reshape((len(x),) + network.input_shape))
    result = dynamics.relax(network, images, params=params, deployment=deployment)
    scores = energy.output(network, result.states, params)
    if network.cost.kind == "squared_error":
        last = network.num_layers - 1
        h = energy.local_fields(network, network.normalize(images), result.states, params=params, layers=[last])[last]
        logits = network.slope * h.reshape(len(x), -1)
    else:
        logits = scores
    return Relaxed(np.argmax(scores, axis=1), logits, np.asarray(result.residual), np.asarray(result.converged),
                   np.asarray(result.steps))


def attack_modules(network) -> dict:
    """{"bptt": class, "implicit": class} of the torch modules that attack ``network`` (each built as
    ``cls(network, logits=..., deployment=...)``): the Torch twin's for a dense Network, ``ebm_sim.model.classifier``'s
    for a LayeredNetwork."""
    if isinstance(network, LayeredNetwork):
        from ebm_sim.model.classifier import LayeredEBMClassifier, LayeredImplicitEBM
        return {"bptt": LayeredEBMClassifier, "implicit": LayeredImplicitEBM}
    from ebm_sim.torch_twin import EBMClassifier

    from .implicit import ImplicitEBM

    def implicit(net, logits, deployment):  # the dense ImplicitEBM's logits are always the update ones
        return ImplicitEBM(net, deployment=deployment)
    return {"bptt": EBMClassifier, "implicit": implicit}


DEPLOYED_MARGIN = 1e-3  # how far above the others agree_with_deployed lifts the deployed class's logit


def agree_with_deployed(logits: torch.Tensor, predictions: torch.Tensor) -> torch.Tensor:
    """``logits`` (B, C) whose argmax is ``predictions`` (B,): where another class's logit reaches the deployed
    class's, the deployed class's is raised to DEPLOYED_MARGIN above it by a detached offset (values change there,
    gradients do not; elsewhere the logits are returned as they are)."""
    predictions = predictions.to(device=logits.device, dtype=torch.int64).reshape(-1, 1)
    own = logits.gather(1, predictions)
    others = logits.detach().scatter(1, predictions, float("-inf")).amax(dim=1, keepdim=True)
    lift = torch.clamp(others - own.detach() + DEPLOYED_MARGIN, min=0.0)
    lift = torch.where(others >= own.detach(), lift, torch.zeros_like(lift))
    return logits + torch.zeros_like(logits).scatter(1, predictions, lift)


class AgreeWithDeployed(torch.nn.Module):
    """A gradient source whose logits decide as the deployed model does (``agree_with_deployed`` with
    ``model.predict`` on the same images): forward values and gradients are the source's elsewhere."""

    def __init__(self, source: torch.nn.Module, model: "EBMUnderTest"):
        super().__init__()
        self.source = source
        self._model = model

    def forward(self, x):
        logits = self.source(x)
        deployed = self._model.predict(x.detach().reshape(x.shape[0], -1).cpu().numpy())
        return agree_with_deployed(logits, torch.from_numpy(deployed))

    def __getattr__(self, name):  # e.g. the implicit source's last_adjoint_converged
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("source"), name)


class DeployedLogits(torch.nn.Module):
    """The deployed EBM as a query-only module (for score-based black-box attacks): forward(images) -> logits from the
    Numba relaxation (``EBMUnderTest.logits``); no gradients."""

    def __init__(self, model: EBMUnderTest):
        super().__init__()
        self._model = model

    def forward(self, x):
        logits = self._model.logits(x.detach().reshape(x.shape[0], -1).cpu().numpy())
        return torch.from_numpy(logits).to(x.device)


def load_model_under_test(path, name: str | None = None, image_shape: tuple | None = None, *, student=None,
                          deployment: Deployment | None = None, gradients=None) -> ModelUnderTest:
    """A model file (ebm-network or ebm-feedforward) ready for evaluation. name: its label in the report (default:
    the file's stem); image_shape: per-sample shape for the attacks (default: (n_0,)); student, deployment,
    gradients: EBM options (see EBMUnderTest)."""
    from distill.io import artifact_format
    path = Path(path)
    fmt = artifact_format(path)
    name = name or path.stem
    if fmt == "ebm-network":
        return EBMUnderTest(name, path, image_shape, deployment, student, gradients)
    if student is not None or deployment is not None or gradients is not None:
        raise ValueError(f"{path} is a feedforward model ({fmt}): student, deployment and gradient sources apply to "
                         f"EBM network files only")
    return FeedForwardUnderTest(name, path, image_shape)

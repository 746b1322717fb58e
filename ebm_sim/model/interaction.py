"""What an interaction is, and the two registries that make a new layer type a few files.

A layered network is layers s_0 (the clamped input x), s_1 ... s_L, each of shape ``(n,)`` or ``(C, H, W)``, joined by
interactions. Each interaction adds one term to the primitive function (Ernoult et al. 2019)

    Phi(x, s) = sum_i Phi_i(s_pre(i), s_post(i))          E(s) = sum_k ||s_k||^2 / (2a) - Phi(x, s)

and owns, for that term, (1) its value, (2) its field on the post layer dPhi_i/ds_post, (3) its field on the pre layer
dPhi_i/ds_pre, (4) its parameter gradient dPhi_i/dtheta and (5) its synapse count. A layer's local field is the sum of
the fields of the interactions that touch it (:func:`ebm_sim.model.energy.local_fields`), as Scellier et al.'s
energy-based-learning sums ``DenseHopfield`` and ``ConvMaxPoolHopfield`` terms with one ``SumSeparableFunction``.

The classes in this package say *what* an interaction is (kind, layers, hyperparameters, parameter shapes,
initialization, synapse count). *How* it is computed lives in one implementation per backend, registered per kind
and backend (lava-nc's ``@implements(proc=..., protocol=...)`` / ``@tag`` pattern): ``numpy_ops`` (the slow,
obvious reference every other backend is tested against), ``torch_ops`` (CPU and CUDA) and ``numba_ops`` (CPU:
im2col and one BLAS GEMM per convolution). Adding an interaction:
its class here (``@register_interaction``) and one ``@implements(kind, backend)`` class per backend.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

INTERACTIONS: dict = {}      # kind -> Interaction subclass
IMPLEMENTATIONS: dict = {}   # (kind, backend) -> implementation class
BACKENDS = ("numpy", "torch", "numba")


def register_interaction(cls):
    """Class decorator: make ``cls`` (an Interaction subclass with a unique ``kind``) known by its kind."""
    if cls.kind in INTERACTIONS:
        raise ValueError(f"interaction kind {cls.kind!r} is already registered by {INTERACTIONS[cls.kind].__name__}")
    INTERACTIONS[cls.kind] = cls
    return cls


def implements(kind: str, backend: str):
    """Class decorator: ``cls`` computes interactions of ``kind`` on ``backend``.

    An implementation has static methods, every array in the backend's type, batch first:
      post_field(interaction, params, s_pre)           -> dPhi_i/ds_post, shape (B, *post_shape)
      pre_field(interaction, params, s_pre, s_post)    -> dPhi_i/ds_pre,  shape (B, *pre_shape)
      parameter_gradient(interaction, params, s_pre, s_post) -> {name: batch mean of dPhi_i/dtheta}
    A unary interaction (Bias) has instead ``field(interaction, params, s)`` (its field on its layer, shaped like s) and
    ``parameter_gradient(interaction, params, None, s)``. A cost (``cost.py``) has ``output(c, params, s_L)`` (the
    prediction: logits or flat(s_L)), ``value`` (B,), ``state_gradient`` dC/ds_L and ``parameter_gradient`` dC/dtheta.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")

    def decorate(cls):
        IMPLEMENTATIONS[(kind, backend)] = cls
        return cls
    return decorate


def implementation(kind: str, backend: str):
    """The registered implementation of ``kind`` on ``backend`` (importing the backend's module on first use)."""
    if (kind, backend) not in IMPLEMENTATIONS:
        if backend == "numpy":
            from . import numpy_ops  # noqa: F401  (registers)
        elif backend == "torch":
            from . import torch_ops  # noqa: F401  (registers; needs torch)
        elif backend == "numba":
            from . import numba_ops  # noqa: F401  (registers)
        else:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    try:
        return IMPLEMENTATIONS[(kind, backend)]
    except KeyError:
        raise NotImplementedError(f"no {backend} implementation of the {kind!r} interaction") from None


def uniform(rng, bound: float, shape, dtype) -> np.ndarray:
    """U(-bound, bound) samples drawn in float64 and cast (torch.nn.Linear/Conv2d's default: bound = 1/sqrt(fan_in))."""
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


@dataclass
class Interaction:
    """Base of every interaction: ``pre`` and ``post`` are layer indices (0 = the clamped input); ``params`` maps a
    parameter name to its array. Subclasses set ``kind`` and ``param_names`` and implement ``post_shape``,
    ``param_shapes``, ``init_params`` and ``synapses``; ``check`` validates against the layer shapes."""

    kind: ClassVar[str] = ""
    param_names: ClassVar[tuple] = ()
    unary: ClassVar[bool] = False

    pre: int
    post: int
    params: dict = field(default_factory=dict, repr=False)

    def hyperparameters(self) -> dict:
        """The settings besides the layers and parameters (stored with the network, part of its hash)."""
        return {}

    def param_shapes(self, pre_shape, post_shape) -> dict:
        raise NotImplementedError

    def fan_in(self, pre_shape) -> int:
        """Inputs per post unit (sets the initialization bound 1/sqrt(fan_in))."""
        raise NotImplementedError

    def synapses(self, pre_shape, post_shape) -> int:
        """Multiply-adds of one post-field evaluation for one sample (the connections a chip would store/route)."""
        raise NotImplementedError

    def init_params(self, rng, pre_shape, post_shape, dtype, gain: float = 1.0) -> None:
        """torch's default: every parameter ~ U(-g/sqrt(fan_in), g/sqrt(fan_in))."""
        bound = gain / np.sqrt(self.fan_in(pre_shape))
        self.params = {name: uniform(rng, bound, shape, dtype)
                       for name, shape in self.param_shapes(pre_shape, post_shape).items()}

    def check(self, pre_shape, post_shape) -> None:
        """Raise ValueError naming the problem if the parameters do not fit the layers."""
        expected = self.param_shapes(pre_shape, post_shape)
        if set(self.params) != set(expected):
            raise ValueError(f"{self.describe()} needs parameters {sorted(expected)}, got {sorted(self.params)}")
        for name, shape in expected.items():
            array = self.params[name]
            if tuple(array.shape) != tuple(shape):
                raise ValueError(f"{self.describe()}: parameter {name!r} has shape {tuple(array.shape)}, "
                                 f"the layers need {tuple(shape)}")
            if not np.all(np.isfinite(array)):
                raise ValueError(f"{self.describe()}: parameter {name!r} holds NaN or inf")

    def describe(self) -> str:
        where = f"layer {self.post}" if self.unary else f"layers {self.pre} -> {self.post}"
        settings = ", ".join(f"{k}={v}" for k, v in self.hyperparameters().items())
        return f"{self.kind}({where}{', ' + settings if settings else ''})"


def array_ops(backend: str):
    """The backend's small array vocabulary (clip, per-sample where/max, ...) used by the generic relaxation."""
    if backend == "numpy":
        from .numpy_ops import ARRAYS
    elif backend == "torch":
        from .torch_ops import ARRAYS
    elif backend == "numba":
        from .numba_ops import ARRAYS
    else:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return ARRAYS

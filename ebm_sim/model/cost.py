"""Costs of the nudged phase, C(s_L, y), and the softmax readout (Laborieux et al. 2021):

    SquaredError:    C = 1/2 ||flat(s_L) - y||^2                     dC/ds_L = flat(s_L) - y
    SoftmaxReadout:  logits = W flat(s_L) + b  (W: (classes, n_L)), C = -sum y log softmax(logits)
                     dC/ds_L = W^T (softmax(logits) - y);  dC/dW = mean_b (softmax - y) flat(s_L)^T,
                     dC/db = mean_b (softmax - y)
The readout is not part of the relaxation at beta = 0; nudging adds -beta C to Phi, so its parameters' EP gradient is
the plain dC/dtheta at the states (averaged over the two nudged phases of symmetric EP).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from .interaction import uniform

COSTS: dict = {}


def register_cost(cls):
    COSTS[cls.kind] = cls
    return cls


@register_cost
@dataclass
class SquaredError:
    kind: ClassVar[str] = "squared_error"
    params: dict = field(default_factory=dict, repr=False)

    def classes(self, last_shape) -> int:
        return int(np.prod(last_shape))

    def param_shapes(self, last_shape) -> dict:
        return {}

    def init_params(self, rng, last_shape, dtype, gain: float = 1.0) -> None:
        self.params = {}

    def synapses(self, last_shape) -> int:
        return 0


@register_cost
@dataclass
class SoftmaxReadout:
    kind: ClassVar[str] = "softmax_readout"
    num_classes: int = 10
    params: dict = field(default_factory=dict, repr=False)

    def classes(self, last_shape) -> int:
        return int(self.num_classes)

    def param_shapes(self, last_shape) -> dict:
        return {"weight": (int(self.num_classes), int(np.prod(last_shape))), "bias": (int(self.num_classes),)}

    def init_params(self, rng, last_shape, dtype, gain: float = 1.0) -> None:
        bound = gain / np.sqrt(int(np.prod(last_shape)))
        self.params = {name: uniform(rng, bound, shape, dtype) for name, shape in self.param_shapes(last_shape).items()}

    def synapses(self, last_shape) -> int:
        return int(np.prod(last_shape)) * int(self.num_classes)


def readout_parameter_gradient(weight, bias, s_last, target, backend: str = "numpy") -> list:
    """[dC/dW_r, dC/db_r] of the softmax readout's cross-entropy at the states s_last (B, ...), batch mean:
    ((softmax(W_r s + b_r) - y)^T s / B, mean(softmax(W_r s + b_r) - y)). The one implementation per backend that
    layered networks use, for the readout of a dense Network (numpy) and of the Torch twin (torch) too."""
    from .interaction import implementation

    grads = implementation(SoftmaxReadout.kind, backend).parameter_gradient(
        None, {"weight": weight, "bias": bias}, s_last, target)
    return [grads["weight"], grads["bias"]]

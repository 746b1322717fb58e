"""A layered Hopfield-energy network: parameters, initialization and identity (hash).

Layers s_0 = x (clamped input), s_1 ... s_L (s_L is the output). ``weights[k]`` is W_k of shape
(n_{k+1}, n_k) and connects layer k to layer k+1; ``biases[k]`` is b_{k+1} of shape (n_{k+1},), the bias of
layer k+1 (the clamped input has none). States are stored as activations in [0, 1].

Activation rho(u) = clip(slope * u, 0, 1): ``"hard_sigmoid"`` (slope 1, Scellier & Bengio 2017) or
``"hard_sigmoid_half"`` (slope 1/2, the CIFAR recipes of Laborieux et al. 2021).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from .limits import require_memory

ACTIVATIONS = {"hard_sigmoid": 1.0, "hard_sigmoid_half": 0.5}
DTYPES = (np.float32, np.float64)


def _check_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in [np.dtype(d) for d in DTYPES]:
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    return dtype


@dataclass
class Network:
    """Parameters of a dense layered Hopfield network.

    weights: list of L arrays, W_k with shape (n_{k+1}, n_k)
    biases:  list of L arrays, b_{k+1} with shape (n_{k+1},)
    activation: a key of ``ACTIVATIONS``
    readout: when True the last layer is not part of the dynamics but a softmax readout of s_{L-1}:
        logits = W_{L-1} s_{L-1} + b_L, used by the cross-entropy cost (as in the CIFAR recipes of Laborieux et al.
        2021); the states are s_1 .. s_{L-1}. When False (default) every layer is dynamic and s_L is the output.
    """

    weights: list
    biases: list
    activation: str = "hard_sigmoid"
    history: dict = field(default_factory=dict)
    readout: bool = False

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; choose one of {sorted(ACTIVATIONS)}")
        if len(self.weights) == 0:
            raise ValueError("a network needs at least one weight matrix (input -> output)")
        if len(self.weights) != len(self.biases):
            raise ValueError(f"{len(self.weights)} weight matrices but {len(self.biases)} bias vectors")
        if self.readout and len(self.weights) < 2:
            raise ValueError("a network with a softmax readout needs at least one hidden layer before it")
        dtype = _check_dtype(np.asarray(self.weights[0]).dtype)
        self.weights = [np.ascontiguousarray(w, dtype=dtype) for w in self.weights]
        self.biases = [np.ascontiguousarray(b, dtype=dtype) for b in self.biases]
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            if w.ndim != 2 or b.ndim != 1:
                raise ValueError(f"W_{k} must be 2-D and b_{k + 1} 1-D, got shapes {w.shape} and {b.shape}")
            if b.shape[0] != w.shape[0]:
                raise ValueError(f"b_{k + 1} has {b.shape[0]} entries but W_{k} has {w.shape[0]} rows")
            if k > 0 and w.shape[1] != self.weights[k - 1].shape[0]:
                raise ValueError(f"W_{k} has {w.shape[1]} columns but layer {k} has "
                                 f"{self.weights[k - 1].shape[0]} units")
            if not (np.all(np.isfinite(w)) and np.all(np.isfinite(b))):
                raise ValueError(f"W_{k} or b_{k + 1} holds NaN or inf")

    # ------------------------------------------------------------------ shape and type
    @property
    def layer_sizes(self) -> tuple:
        """(n_0, n_1, ..., n_L): input size first."""
        return (self.weights[0].shape[1],) + tuple(w.shape[0] for w in self.weights)

    @property
    def num_layers(self) -> int:
        """L, the number of non-input layers."""
        return len(self.weights)

    @property
    def state_sizes(self) -> tuple:
        """Sizes of the layers that relax: n_1 .. n_L, or n_1 .. n_{L-1} with a readout."""
        return self.layer_sizes[1:-1] if self.readout else self.layer_sizes[1:]

    def dynamics(self) -> "Network":
        """The part that relaxes: the network itself, or without its readout layer (shares the arrays)."""
        if not self.readout:
            return self
        return Network(self.weights[:-1], self.biases[:-1], self.activation)

    def readout_layer(self):
        """(W, b) of the softmax readout, or None."""
        return (self.weights[-1], self.biases[-1]) if self.readout else None

    def logits(self, states) -> np.ndarray:
        """The readout's logits W_{L-1} s_{L-1} + b_L (B, classes); without a readout, the output states s_L."""
        if not self.readout:
            return states[-1]
        return states[-1] @ self.weights[-1].T + self.biases[-1]

    @property
    def slope(self) -> float:
        return ACTIVATIONS[self.activation]

    @property
    def dtype(self) -> np.dtype:
        return self.weights[0].dtype

    def astype(self, dtype) -> "Network":
        """A copy with parameters in ``dtype`` (float32 or float64)."""
        dtype = _check_dtype(dtype)
        return Network([w.astype(dtype) for w in self.weights], [b.astype(dtype) for b in self.biases],
                       self.activation, dict(self.history), self.readout)

    def copy(self) -> "Network":
        return self.astype(self.dtype)

    def scaled(self, factor: float) -> "Network":
        """A copy with every weight and bias multiplied by ``factor`` (to control the contraction rate)."""
        return Network([w * self.dtype.type(factor) for w in self.weights],
                       [b * self.dtype.type(factor) for b in self.biases], self.activation, dict(self.history),
                       self.readout)

    # ------------------------------------------------------------------ construction
    @classmethod
    def init(cls, layer_sizes, seed: int = 0, dtype=np.float32, activation: str = "hard_sigmoid",
             gain: float = 1.0, readout: bool = False) -> "Network":
        """Seeded initialization: W_k ~ U(-g/sqrt(n_k), g/sqrt(n_k)), b ~ U(same) (torch.nn.Linear's default).

        layer_sizes: (n_0, ..., n_L) with at least two entries, all positive integers.
        """
        sizes = tuple(layer_sizes)
        if len(sizes) < 2:
            raise ValueError(f"layer_sizes needs an input and at least one more layer, got {sizes}")
        if not all(isinstance(n, (int, np.integer)) and n > 0 for n in sizes):
            raise ValueError(f"layer sizes must be positive integers, got {sizes}")
        if not np.isfinite(gain) or gain <= 0:
            raise ValueError(f"gain must be positive, got {gain}")
        dtype = _check_dtype(dtype)
        count = sum(n_in * n_out + n_out for n_in, n_out in zip(sizes[:-1], sizes[1:]))
        require_memory(count * (8 + dtype.itemsize), f"a {'-'.join(map(str, sizes))} network ({count:,} parameters, "
                       f"drawn in float64 and stored in {dtype})", "check the layer sizes")
        rng = np.random.default_rng(seed)
        weights, biases = [], []
        for n_in, n_out in zip(sizes[:-1], sizes[1:]):
            bound = gain / np.sqrt(n_in)
            weights.append(rng.uniform(-bound, bound, size=(n_out, n_in)).astype(dtype))
            biases.append(rng.uniform(-bound, bound, size=n_out).astype(dtype))
        return cls(weights, biases, activation, readout=readout)

    # ------------------------------------------------------------------ identity
    def content_hash(self) -> str:
        """SHA-256 over architecture, activation, dtype and the exact parameter bytes."""
        h = hashlib.sha256()
        identity = (self.layer_sizes, self.activation, str(self.dtype))
        h.update(repr(identity + (("readout",) if self.readout else ())).encode())  # unchanged without a readout
        for array in (*self.weights, *self.biases):
            h.update(np.ascontiguousarray(array).tobytes())
        return h.hexdigest()

    def zero_states(self, batch: int) -> list:
        """Initial states (all zeros) of the layers that relax: list of (batch, n_k) arrays."""
        return [np.zeros((batch, n), dtype=self.dtype) for n in self.state_sizes]

    def __repr__(self) -> str:
        return (f"Network(layer_sizes={self.layer_sizes}, activation={self.activation!r}, "
                f"{'readout=True, ' if self.readout else ''}dtype={self.dtype}, hash={self.content_hash()[:12]})")

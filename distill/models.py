"""Feedforward students with the EBM's layer sizes (PyTorch).

A student maps x in [0, 1] (B, n_0) (or images (B, ...) flattened to n_0) through

    u_k = W_{k-1} a_{k-1} + b_k,   a_0 = x
    a_k = rho(u_k) = clip(slope * u_k, 0, 1)        hidden layers, slope = the EBM's (``Network.slope``)

so a_k estimates the EBM's fixed-point state s_k in one pass, without the feedback term W_k^T s_{k+1}.

Output layer and logits:
- EBM with a softmax readout (``network.readout``): the last layer is linear, logits = W_{L-1} a_{L-1} + b_L,
  exactly the EBM's readout; the states are a_1 .. a_{L-1} (estimates of s_1 .. s_{L-1}).
- MSE-trained EBM (no readout): logits = slope * u_L, the output layer's *pre-activation* (scaled by the slope, not
  clipped), and the output state estimate is a_L = clip(logits, 0, 1). Since clip is non-decreasing, argmax(logits)
  equals argmax(a_L) whenever a_L has a unique largest entry, so the prediction convention is the EBM's argmax s_L;
  the unclipped logits keep a gradient when the output saturates (cross-entropy, attacks).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

ACTIVATION_SLOPES = {"hard_sigmoid": 1.0, "hard_sigmoid_half": 0.5}


def hard_sigmoid(u: torch.Tensor, slope: float) -> torch.Tensor:
    """rho(u) = clip(slope * u, 0, 1)."""
    return torch.clamp(u * slope if slope != 1.0 else u, 0.0, 1.0)


class FeedForward(nn.Module):
    """Dense feedforward network n_0 -> n_1 -> ... -> n_L with hard-sigmoid hidden layers.

    layer_sizes: (n_0, ..., n_L); activation: "hard_sigmoid" (slope 1) or "hard_sigmoid_half" (slope 1/2);
    readout: True when the last layer is a linear (softmax) readout, as in an EBM with ``readout=True``.
    ``linears[k]`` holds W_k (weight, (n_{k+1}, n_k)) and b_{k+1} (bias, (n_{k+1},)).
    """

    def __init__(self, layer_sizes, activation: str = "hard_sigmoid", readout: bool = False,
                 dtype=torch.float32, seed: int | None = None):
        super().__init__()
        sizes = tuple(int(n) for n in layer_sizes)
        if len(sizes) < 2 or any(n <= 0 for n in sizes):
            raise ValueError(f"layer_sizes needs at least two positive sizes (input, ..., output), got {layer_sizes}")
        if activation not in ACTIVATION_SLOPES:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATION_SLOPES)}")
        if readout and len(sizes) < 3:
            raise ValueError("a readout needs at least one hidden layer before it")
        self.layer_sizes = sizes
        self.activation = activation
        self.slope = ACTIVATION_SLOPES[activation]
        self.readout = bool(readout)
        self.linears = nn.ModuleList(nn.Linear(n_in, n_out, dtype=dtype) for n_in, n_out in zip(sizes[:-1], sizes[1:]))
        if seed is not None:
            self.reset_parameters(seed)

    # ------------------------------------------------------------------ construction
    def reset_parameters(self, seed: int) -> None:
        """Seeded init, torch.nn.Linear's default: W, b ~ U(-1/sqrt(n_in), 1/sqrt(n_in))."""
        generator = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            for linear in self.linears:
                bound = 1.0 / math.sqrt(linear.in_features)
                for p in (linear.weight, linear.bias):
                    p.copy_(torch.rand(p.shape, generator=generator, dtype=torch.float64).mul_(2 * bound)
                            .sub_(bound).to(p.dtype))

    @classmethod
    def from_network(cls, network, init_from_ebm: bool = False, seed: int = 0, dtype=torch.float32) -> "FeedForward":
        """A student with ``network``'s layer sizes, activation and readout; its forward weights W_k, b_k copied
        from the EBM when ``init_from_ebm`` (else a seeded random init)."""
        model = cls(network.layer_sizes, network.activation, network.readout, dtype=dtype, seed=seed)
        if init_from_ebm:
            model.load_parameters(network.weights, network.biases)
        return model

    def load_parameters(self, weights, biases) -> None:
        """Copy numpy/tensor weights [W_0..W_{L-1}] and biases [b_1..b_L] into the model (shapes checked)."""
        if len(weights) != len(self.linears) or len(biases) != len(self.linears):
            raise ValueError(f"expected {len(self.linears)} weight matrices and bias vectors, got {len(weights)} "
                             f"and {len(biases)}")
        with torch.no_grad():
            for k, (linear, w, b) in enumerate(zip(self.linears, weights, biases)):
                w, b = torch.as_tensor(np.asarray(w)), torch.as_tensor(np.asarray(b))
                if tuple(w.shape) != tuple(linear.weight.shape) or tuple(b.shape) != tuple(linear.bias.shape):
                    raise ValueError(f"layer {k}: W_{k} {tuple(w.shape)} / b_{k + 1} {tuple(b.shape)} do not fit "
                                     f"{tuple(linear.weight.shape)} / {tuple(linear.bias.shape)}")
                linear.weight.copy_(w)
                linear.bias.copy_(b)

    # ------------------------------------------------------------------ shapes
    @property
    def num_layers(self) -> int:
        """L, the number of weight matrices."""
        return len(self.linears)

    @property
    def state_sizes(self) -> tuple:
        """Sizes of the states the student estimates: n_1..n_L, or n_1..n_{L-1} with a readout."""
        return self.layer_sizes[1:-1] if self.readout else self.layer_sizes[1:]

    @property
    def dtype(self) -> torch.dtype:
        return self.linears[0].weight.dtype

    def _flatten(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(np.asarray(x))
        if x.ndim < 2:
            raise ValueError(f"expected a batch (B, {self.layer_sizes[0]}) or (B, ...) images, got shape "
                             f"{tuple(x.shape)}: add a batch dimension")
        x = x.reshape(x.shape[0], -1) if x.ndim != 2 else x
        if not torch.jit.is_tracing() and x.shape[1] != self.layer_sizes[0]:  # (shapes are tensors when traced)
            raise ValueError(f"the model takes {self.layer_sizes[0]} input features per sample, got shape "
                             f"{tuple(x.shape)}")
        return x.to(self.dtype) if x.dtype != self.dtype else x

    # ------------------------------------------------------------------ forward
    def forward_layers(self, x, preactivations: bool = False) -> tuple:
        """(states, logits): states = [a_1, ..., a_L] (no readout; a_L = clip(logits, 0, 1)) or
        [a_1, ..., a_{L-1}] (readout), each (B, n_k); logits (B, n_L) (see the module docstring).
        preactivations=True adds a third item, [z_1, ...] with z_k = slope * u_k and a_k = clip(z_k, 0, 1)."""
        a = self._flatten(x)
        states, zs = [], []
        for linear in self.linears[:-1]:
            z = linear(a)
            z = z * self.slope if self.slope != 1.0 else z
            a = torch.clamp(z, 0.0, 1.0)
            zs.append(z)
            states.append(a)
        u = self.linears[-1](a)
        if self.readout:
            return (states, u, zs) if preactivations else (states, u)
        logits = u * self.slope if self.slope != 1.0 else u
        states.append(torch.clamp(logits, 0.0, 1.0))
        zs.append(logits)
        return (states, logits, zs) if preactivations else (states, logits)

    def forward(self, x) -> torch.Tensor:
        """x in [0, 1], (B, n_0) or (B, ...) with n_0 features per sample -> logits (B, n_L)."""
        a = self._flatten(x)
        for linear in self.linears[:-1]:
            a = hard_sigmoid(linear(a), self.slope)
        u = self.linears[-1](a)
        return u * self.slope if (self.slope != 1.0 and not self.readout) else u

    @torch.no_grad()
    def predict(self, x, batch_size: int = 4096) -> np.ndarray:
        """argmax of the logits, (B,) int64 numpy, in batches."""
        x = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
        return torch.cat([self(x[i:i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)]).numpy()

    def weights_biases(self) -> tuple[list, list]:
        """([W_0..W_{L-1}], [b_1..b_L]) as numpy arrays (copies)."""
        return ([l.weight.detach().cpu().numpy().copy() for l in self.linears],
                [l.bias.detach().cpu().numpy().copy() for l in self.linears])

    def extra_repr(self) -> str:
        return (f"layer_sizes={self.layer_sizes}, activation={self.activation!r}"
                + (", readout=True" if self.readout else ""))

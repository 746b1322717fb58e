"""The Torch twin of the simulator: the same equations (see :mod:`ebm_sim.energy`) in eager PyTorch.

Importing this module needs torch; nothing else in ``ebm_sim``'s core does. This first version covers the
relaxation (Euler, synchronous and alternating fixed-point iteration) the way the reference EP code bases run
it (Laborieux et al. 2021): every step recomputes every layer's field, including the input term W_0 x, and the
whole batch steps together until every sample meets the tolerance, checked every step.
``hoist_input=True`` computes W_0 x + b_1 once instead (the optimisation the Numba kernels use).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .network import Network


@dataclass
class TorchRelaxResult:
    """states: list of (B, n_k) tensors; steps: int, steps the batch took; residual: (B,) tensor;
    converged: (B,) bool tensor (residual < tol)."""

    states: list
    steps: int
    residual: torch.Tensor
    converged: torch.Tensor


def to_torch(network: Network, device="cpu", dtype=None) -> tuple:
    """(weights, biases) as lists of tensors on ``device`` (dtype defaults to the network's)."""
    dtype = dtype or (torch.float32 if network.dtype == np.float32 else torch.float64)
    weights = [torch.as_tensor(w, dtype=dtype, device=device) for w in network.weights]
    biases = [torch.as_tensor(b, dtype=dtype, device=device) for b in network.biases]
    return weights, biases


def local_fields(weights, biases, x, states, beta=0.0, target=None, input_field=None, layers=None) -> list:
    """h_k = W_{k-1} s_{k-1} + W_k^T s_{k+1} + b_k for the layers in ``layers`` (0-based; default all), others
    None. ``input_field`` = x W_0^T + b_1 when precomputed. Nudge: h_L -= beta (s_L - y)."""
    num_layers = len(weights)
    below = [x] + list(states[:-1])
    fields = [None] * num_layers
    for k in (range(num_layers) if layers is None else layers):
        if k == 0 and input_field is not None:
            h = input_field
        else:
            h = torch.addmm(biases[k], below[k], weights[k].t())
        if k < num_layers - 1:
            h = h + states[k + 1] @ weights[k + 1]
        if k == num_layers - 1 and beta != 0.0:
            h = h - beta * (states[k] - target)
        fields[k] = h
    return fields


def relax(network: Network, x, method: str = "fixed_point", tol: float = 1e-4, max_steps: int = 1000,
          dt: float | None = None, beta: float = 0.0, target=None, device="cpu",
          hoist_input: bool = False) -> TorchRelaxResult:
    """Relax x (B, n_0) with the Torch twin; the stopping rule is the batch's: stop when all residuals < tol.

    method: "euler" (dt, default 0.5), "fixed_point" or "alternating" (dt = 1); residual max |s_{t+1}-s_t| / dt.
    """
    if method not in ("euler", "fixed_point", "alternating"):
        raise ValueError(f"the Torch twin relaxes with euler, fixed_point or alternating, not {method!r}")
    dt = (0.5 if method == "euler" else 1.0) if dt is None else dt
    weights, biases = to_torch(network, device)
    dtype = weights[0].dtype
    x = torch.as_tensor(np.asarray(x), dtype=dtype, device=device)
    target = None if target is None else torch.as_tensor(np.asarray(target), dtype=dtype, device=device)
    a = network.slope
    states = [torch.zeros(x.shape[0], n, dtype=dtype, device=device) for n in network.layer_sizes[1:]]
    input_field = torch.addmm(biases[0], x, weights[0].t()) if hoist_input else None
    groups = ([list(range(0, len(weights), 2)), list(range(1, len(weights), 2))] if method == "alternating"
              else [list(range(len(weights)))])
    residual = torch.full((x.shape[0],), float("inf"), dtype=dtype, device=device)
    step = 0
    with torch.no_grad():
        while step < max_steps:
            step += 1
            residual = torch.zeros_like(residual)
            for group in groups:
                fields = local_fields(weights, biases, x, states, beta, target, input_field, group)
                for k in group:
                    new = (a * fields[k] if dt == 1.0 else states[k] + dt * (a * fields[k] - states[k]))
                    new = new.clamp_(0.0, 1.0)
                    residual = torch.maximum(residual, (new - states[k]).abs().amax(dim=1))
                    states[k] = new
            if dt != 1.0:
                residual = residual / dt
            if bool((residual < tol).all()):
                break
    return TorchRelaxResult(states, step, residual, residual < tol)

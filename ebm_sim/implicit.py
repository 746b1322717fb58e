"""Implicit differentiation at a fixed point s* = F(s*, x), for any relaxation of the toolkit (torch).

Every fixed-step integrator (Euler, synchronous and alternating fixed-point iteration) stops at a fixed point of
F(s, x) = clip(a h(s, x), 0, 1), for a dense network (``ebm_sim.torch_twin``) and a layered one
(``ebm_sim.model``) alike. For a loss L(logits(s*)), with J = dF/ds at (s*, x) and g = dL/ds*,

    dL/dx = (dF/dx)^T v,    v = (I - J^T)^{-1} g,

and v is found by the adjoint iteration v <- g + J^T v (a Neumann series: it converges when the relaxation itself
contracts, spectral radius of J below 1), each step one vector-Jacobian product of F by ``torch.autograd.grad``.
This is the gradient of the exact fixed point, whatever the number of steps the forward solve took (Almeida 1987,
Pineda 1987; Bai et al. 2019 for deep equilibrium models); BPTT through the deployed steps gives the gradient of the
truncated relaxation. The two agree when the relaxation has converged.

``FixedPointAdjoint.attach(step, fixed, x)`` returns states equal in value to the fixed point whose backward pass is
this implicit gradient; the dense ``distill.robustness.implicit.ImplicitEBM`` and the layered
``ebm_sim.model.classifier.LayeredImplicitEBM`` both use it (one adjoint loop for both).
"""
from __future__ import annotations

import math
import numbers

import torch


def pack(states) -> torch.Tensor:
    """[(B, *shape_k)] -> (B, sum_k prod(shape_k)): the states as one flat row per sample."""
    return torch.cat([s.reshape(s.shape[0], -1) for s in states], dim=1)


def unpack(flat: torch.Tensor, shapes) -> list:
    """The inverse of ``pack`` for per-sample ``shapes`` [shape_k]."""
    sizes = [math.prod(shape) for shape in shapes]
    return [part.reshape((flat.shape[0],) + tuple(shape)) for part, shape in zip(torch.split(flat, sizes, dim=1),
                                                                                    shapes)]


class FixedPointAdjoint:
    """The adjoint solve of implicit differentiation (see the module docstring).

    tol: a sample's adjoint iteration has converged when max |v_{k+1} - v_k| <= tol * max |v_{k+1}| (relative:
    attacks need the gradient's direction, not 6 digits); the batch iterates until all samples have, or max_steps.
    ``last_steps`` and ``last_converged`` (share of samples) tell how the last backward pass ended."""

    def __init__(self, tol: float = 1e-4, max_steps: int = 100):
        if isinstance(tol, bool) or not (isinstance(tol, numbers.Real) and math.isfinite(tol) and tol >= 0):
            raise ValueError(f"adjoint_tol must be a finite number >= 0, got {tol!r}")
        if isinstance(max_steps, bool) or not isinstance(max_steps, numbers.Integral) or max_steps < 1:
            raise ValueError(f"adjoint_max_steps must be an integer >= 1, got {max_steps!r}")
        self.tol, self.max_steps = float(tol), int(max_steps)
        self.last_steps = 0
        self.last_converged = 1.0

    def attach(self, step, fixed: list, x: torch.Tensor) -> list:
        """States equal in value to ``fixed`` (the fixed point, a list of (B, *shape_k) tensors) whose backward pass
        is the implicit gradient: an incoming g = dL/ds* is replaced by v = (I - J^T)^{-1} g, which then flows
        through one step F(s*, x) into x (dF/dx)^T v. step(states, x) -> list of new states, shaped like states."""
        shapes = [tuple(s.shape[1:]) for s in fixed]
        fixed = [s.detach() for s in fixed]
        star = pack(fixed)
        with torch.enable_grad():
            probe = star.clone().requires_grad_(True)  # vector-Jacobian products wrt s at s*, x held fixed
            probe_out = pack(step(unpack(probe, shapes), x.detach()))
            stepped = pack(step(fixed, x))  # depends on x: carries dF/dx
            states = star + (stepped - stepped.detach())  # the value is s*; the gradient flows through F
        states.register_hook(lambda g: self.solve(probe, probe_out, g))
        return unpack(states, shapes)

    def solve(self, probe: torch.Tensor, probe_out: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """v = g + J^T v (g, v: (B, N)), iterated until every sample's max |v_{k+1} - v_k| <= tol max |v_{k+1}|
        or max_steps (or a non-finite v); J^T v = vjp of probe_out = F(probe) at probe (J = 0 when F does not
        depend on s, e.g. a network with one layer that relaxes: then v = g)."""
        if not probe_out.requires_grad:
            self.last_steps, self.last_converged = 0, 1.0
            return g
        v = g
        steps, done = 0, torch.zeros(g.shape[0], dtype=torch.bool, device=g.device)
        for steps in range(1, self.max_steps + 1):
            (jtv,) = torch.autograd.grad(probe_out, probe, v, retain_graph=True)
            new = g + jtv
            change = (new - v).abs().amax(dim=1)
            done = change <= self.tol * new.abs().amax(dim=1).clamp_min(1e-30)
            v = new
            if bool(done.all()) or not bool(torch.isfinite(new).all()):
                break
        self.last_steps = steps
        self.last_converged = float(done.double().mean()) if done.numel() else 1.0
        return v


class AdjointStatistics:
    """How a module's last backward pass through its ``adjoint`` (a FixedPointAdjoint) ended: ``last_adjoint_steps``
    and ``last_adjoint_converged`` (share of samples), for the implicit EBM modules, dense and layered."""

    adjoint: FixedPointAdjoint

    @property
    def last_adjoint_steps(self) -> int:
        return self.adjoint.last_steps

    @property
    def last_adjoint_converged(self) -> float:
        return self.adjoint.last_converged

"""Equilibrium propagation, written once for every network kind and backend (Scellier & Bengio 2017; symmetric
nudging: Laborieux et al. 2021).

    free phase:     s*     = relax(beta = 0)                                       (free_steps)
    nudged phases:  s^(+b), s^(-b) = relax(+-b, from s*)     "symmetric": high = s^(+b), low = s^(-b), scale = 2 b
                    s^(sb)        = relax(sign b, from s*)   "positive":  high = s^(sb), low = s*,     scale = sign b
    estimate:       g = (dE/dtheta(high) - dE/dtheta(low)) / scale      for the parameters inside the energy E
                      + dC/dtheta(s*)                                   for parameters outside it (a softmax readout)

g estimates dL/dtheta with L = C(s*(theta)): the error is O(b^2) for symmetric nudging, O(b) one-sided; it is a descent
direction (theta <- theta - lr g). The callers supply the two things that differ between network kinds and backends:
how a phase relaxes (the dense Numba kernels, the Torch twin, or the layered interactions on any backend) and
dE/dtheta at a state; the phases, the combination and the statistics are here only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

#: the nudging schemes of the estimator ("random" in training draws the sign of "positive" per batch)
NUDGINGS = ("symmetric", "positive")


@dataclass
class EPStep:
    """What one EP step measured: the gradient estimate (one array per parameter, the caller's order), the free
    phase's states (the prediction), its steps and residual per sample, and the mean steps of the nudged phase(s).
    Arrays are the backend's (numpy, or torch tensors for the torch backends)."""

    gradient: list
    free_states: list
    free_steps: object
    free_residual: object
    nudged_steps: float


def estimator_nudging(nudging: str) -> str:
    """The estimator's scheme for a training's nudging: "random" is "positive" with a sign drawn per batch."""
    return "symmetric" if nudging == "symmetric" else "positive"


def mean_steps(steps) -> float:
    """Mean of a (B,) integer array or tensor of steps, as a float."""
    return float(steps.sum()) / len(steps)


def ep_estimate(relax_phase: Callable, energy_gradient: Callable[[list], Sequence] | None, beta: float,
                nudging: str = "symmetric", sign: float = 1.0, readout_gradient: Callable | None = None,
                energy_contrast: Callable[[list, list, float], Sequence] | None = None) -> EPStep:
    """One EP estimate (see the module docstring).

    relax_phase(beta, initial): relaxes the batch with nudging beta from ``initial`` (None: the free phase's start);
        returns an object with ``states`` (list of (B, ...)), ``steps`` (B,) and ``residual`` (B,)
    energy_gradient(states): dE/dtheta at ``states``, batch mean, a sequence of arrays (the parameters inside E)
    energy_contrast(high, low, scale): (dE/dtheta(high) - dE/dtheta(low)) / scale directly, for a backend that
        computes it more cheaply than the two gradients (the dense trainer: the input layer's term is one product with
        the difference of the states, the scale folded into it); given, it replaces ``energy_gradient``
    readout_gradient(free): dC/dtheta at the free phase's result for parameters outside E, or None
    """
    if energy_contrast is None:
        if energy_gradient is None:
            raise ValueError("ep_estimate needs energy_gradient or energy_contrast")
        energy_contrast = lambda high, low, scale: [(h - l) / scale for h, l in  # noqa: E731
                                                    zip(energy_gradient(high), energy_gradient(low))]
    if nudging not in NUDGINGS:
        raise ValueError(f"nudging must be one of {', '.join(NUDGINGS)}, got {nudging!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if sign not in (1, -1, 1.0, -1.0):
        raise ValueError(f"sign must be +1 or -1, got {sign}")
    free = relax_phase(0.0, None)
    if nudging == "symmetric":
        nudged = [relax_phase(beta, free.states), relax_phase(-beta, free.states)]
        high, low, scale = nudged[0].states, nudged[1].states, 2 * beta
    else:
        nudged = [relax_phase(sign * beta, free.states)]
        high, low, scale = nudged[0].states, free.states, sign * beta
    gradient = list(energy_contrast(high, low, scale))
    if readout_gradient is not None:
        gradient += list(readout_gradient(free))
    return EPStep(gradient, list(free.states), free.steps, free.residual,
                  sum(mean_steps(phase.steps) for phase in nudged) / len(nudged))

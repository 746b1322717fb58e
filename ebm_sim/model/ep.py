"""Equilibrium propagation, written once over interactions and backends.

    free phase:    s* = relax(x)                               (beta = 0, free_steps)
    nudged phases: s^{+beta}, s^{-beta} = relax(x, +-beta, y) from s*   (nudged_steps; "positive": only +beta, sign
                   flips per batch when asked, low = s*)
    interactions:  g_theta = -(dPhi/dtheta(s^high) - dPhi/dtheta(s^low)) / scale,  scale = 2 beta (symmetric) or beta
    cost (readout): g_theta = dC/dtheta(s*)   (exact: the readout is not inside the relaxation)
Symmetric nudging (Laborieux et al. 2021) estimates the loss gradient dC(s*(theta))/dtheta with error O(beta^2), the
one-sided estimate with O(beta). ``g`` is a descent direction: theta <- theta - lr g.
"""
from __future__ import annotations

from dataclasses import dataclass

from .dynamics import relax_clamped
from .energy import cost_parameter_gradient, parameter_gradient, parameters

NUDGINGS = ("symmetric", "positive")


@dataclass
class LayeredEPStep:
    """interactions: one dict of gradients per interaction; cost: the readout's gradients; free: the free phase's
    LayeredRelaxResult (its states are the prediction); nudged_steps: mean steps of the nudged phase(s)."""

    interactions: list
    cost: dict
    free: object
    nudged_steps: float


def ep_gradient(network, x, target, beta: float = 0.5, free_steps: int = 30, nudged_steps: int = 10,
                nudging: str = "symmetric", method: str = "fixed_point", tol: float = 0.0, dt=None,
                sign: float = 1.0, params=None) -> LayeredEPStep:
    """One EP estimate of the loss gradient on the batch (images x, one-hot target) (see the module docstring)."""
    if nudging not in NUDGINGS:
        raise ValueError(f"nudging must be one of {', '.join(NUDGINGS)}, got {nudging!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    params = parameters(network) if params is None else params
    common = dict(method=method, tol=tol, dt=dt, params=params)
    x = network.normalize(x)  # the clamped layer s_0
    free = relax_clamped(network, x, max_steps=free_steps, **common)

    def nudged(b):
        return relax_clamped(network, x, max_steps=nudged_steps, beta=b, target=target, initial=free.states, **common)

    if nudging == "symmetric":
        plus, minus = nudged(beta), nudged(-beta)
        high, low, scale = plus.states, minus.states, 2 * beta
        mean_steps = 0.5 * (float(plus.steps.sum()) + float(minus.steps.sum())) / x.shape[0]
    else:
        one = nudged(sign * beta)
        high, low, scale = one.states, free.states, sign * beta
        mean_steps = float(one.steps.sum()) / x.shape[0]
    grad_high = parameter_gradient(network, x, high, params)
    grad_low = parameter_gradient(network, x, low, params)
    interactions = [{name: -(gh[name] - gl[name]) / scale for name in gh} for gh, gl in zip(grad_high, grad_low)]
    cost = cost_parameter_gradient(network, free.states, target, params)
    return LayeredEPStep(interactions, cost, free, mean_steps)

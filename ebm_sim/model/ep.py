"""Equilibrium propagation on a layered network: :func:`ebm_sim.ep.ep_estimate` (the phases and the combination,
written once) with the layered relaxation and the interactions' parameter gradients, on any backend.

    energy:   E = -Phi, so dE/dtheta = -dPhi/dtheta for every interaction's parameters
    readout:  dC/dtheta(s*) for the cost's own parameters (exact: the readout is not inside the relaxation)
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ep import NUDGINGS, ep_estimate
from .dynamics import relax_clamped
from .energy import cost_parameter_gradient, parameter_gradient, parameters

__all__ = ["NUDGINGS", "LayeredEPStep", "ep_gradient", "parameter_order"]


@dataclass
class LayeredEPStep:
    """interactions: one dict of gradients per interaction; cost: the readout's gradients; free: the free phase's
    LayeredRelaxResult (its states are the prediction); nudged_steps: mean steps of the nudged phase(s)."""

    interactions: list
    cost: dict
    free: object
    nudged_steps: float


def parameter_order(network) -> list:
    """(interaction index or "cost", parameter name) in the order of the flat gradient: each interaction's
    ``param_names``, then the cost's parameters sorted by name."""
    return ([(k, name) for k, i in enumerate(network.interactions) for name in i.param_names]
            + [("cost", name) for name in sorted(network.cost.params)])


def ep_gradient(network, x, target, beta: float = 0.5, free_steps: int = 30, nudged_steps: int = 10,
                nudging: str = "symmetric", method: str = "fixed_point", tol: float = 0.0, dt=None,
                sign: float = 1.0, params=None) -> LayeredEPStep:
    """One EP estimate of the loss gradient on the batch (images x, one-hot target) (see ebm_sim.ep)."""
    params = parameters(network) if params is None else params
    x = network.normalize(x)  # the clamped layer s_0
    free_result = []

    def relax_phase(b, initial):
        result = relax_clamped(network, x, method, tol, nudged_steps if initial is not None else free_steps, dt,
                               b, target if b else None, initial, params)
        if initial is None:
            free_result.append(result)
        return result

    def energy_gradient(states):
        grads = parameter_gradient(network, x, states, params)
        return [-grads[k][name] for k, name in parameter_order(network) if k != "cost"]

    def readout_gradient(free):
        grads = cost_parameter_gradient(network, free.states, target, params)
        return [grads[name] for k, name in parameter_order(network) if k == "cost"]

    step = ep_estimate(relax_phase, energy_gradient, beta, nudging, sign, readout_gradient)
    interactions = [{} for _ in network.interactions]
    cost = {}
    for (k, name), g in zip(parameter_order(network), step.gradient):
        (cost if k == "cost" else interactions[k])[name] = g
    return LayeredEPStep(interactions, cost, free_result[0], step.nudged_steps)

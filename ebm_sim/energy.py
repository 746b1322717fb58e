"""The Hopfield energy, its gradient and the projected dynamics: the plain numpy reference.

Notation (batch-first): x (B, n_0) is the clamped input s_0; ``states`` is a list of L arrays s_k (B, n_k),
k = 1..L, holding activations in [0, 1]; a = network.slope (1 for rho(u) = clip(u, 0, 1), 1/2 for
rho(u) = clip(u/2, 0, 1)).

Local field (the gradient of the primitive function Phi, Ernoult et al. 2019):
    h_k = dPhi/ds_k = W_{k-1} s_{k-1} + W_k^T s_{k+1} + b_k          (the W_k^T term only for k < L)
with the nudge on the output layer, cost C = 1/2 ||s_L - y||^2 (MSE):
    h_L <- h_L - beta (s_L - y)
or, for a network with a softmax readout (``network.readout``; s_L is then the last hidden layer and
logits = W_r s_L + b_r), the cross-entropy C = -sum y log softmax(logits):  h_L <- h_L - beta W_r^T (softmax - y)
Energy (per sample; Scellier & Bengio 2017 with rho(s) = s inside the box):
    E(s) = sum_k ||s_k||^2 / (2a) - sum_k s_{k+1}^T W_k s_k - sum_k b_k^T s_k + beta C(s_L, y)
         = sum_k ||s_k||^2 / (2a) - Phi(x, s)              (Phi: the primitive function below)
    dE/ds_k = s_k / a - h_k
Continuous-time dynamics (a positive rescaling of -dE/ds, so E decreases along it):
    ds_k/dt = -a dE/ds_k = a h_k - s_k,      projected onto [0, 1] after every step
Its fixed points satisfy s = clip(a h, 0, 1) = rho(dPhi/ds): the discrete-time form.
For a = 1 these are exactly the equations of README.md ("The model in brief").

Every function here is slow and obvious on purpose: the fast kernels are tested against it.
"""
from __future__ import annotations

import numpy as np

from .network import Network


def _nudge_target(network: Network, target, batch: int, beta: float):
    """The (B, n_L) target array (n_L = classes with a readout), or None when beta == 0 (no nudge)."""
    if beta == 0.0:
        return None
    if target is None:
        raise ValueError("beta != 0 needs a target for the output layer")
    return np.asarray(target, dtype=network.dtype).reshape(batch, network.layer_sizes[-1])


def softmax(logits) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def cost(network: Network, states, target) -> np.ndarray:
    """C per sample (B,): 1/2 ||s_L - y||^2, or with a readout the cross-entropy -sum y log softmax(W_r s + b_r)."""
    if not network.readout:
        return 0.5 * np.sum((states[-1].astype(np.float64) - target) ** 2, axis=1)
    logits = network.logits([s.astype(np.float64) for s in states]).astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probabilities = shifted - np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))
    return -np.sum(target * log_probabilities, axis=1)


def cost_gradient(network: Network, states, target) -> np.ndarray:
    """dC/ds on the last state layer: s_L - y, or W_r^T (softmax(W_r s + b_r) - y) with a readout."""
    if not network.readout:
        return states[-1] - target
    return (softmax(network.logits(states)) - target) @ network.weights[-1]


def local_fields(network: Network, x, states, beta: float = 0.0, target=None) -> list:
    """h_k = W_{k-1} s_{k-1} + W_k^T s_{k+1} + b_k (nudged on the last state layer: - beta dC/ds); list of (B, n_k).
    With a readout, only the layers that relax have fields (the readout enters through the nudge)."""
    dynamic = network.dynamics()
    layers = [x] + list(states)
    fields = []
    for k in range(1, dynamic.num_layers + 1):
        h = layers[k - 1] @ dynamic.weights[k - 1].T + dynamic.biases[k - 1]
        if k < dynamic.num_layers:
            h = h + layers[k + 1] @ dynamic.weights[k]
        fields.append(h)
    y = _nudge_target(network, target, x.shape[0], beta)
    if y is not None:
        fields[-1] = fields[-1] - beta * cost_gradient(network, states, y)
    return fields


def primitive(network: Network, x, states, beta: float = 0.0, target=None) -> np.ndarray:
    """The primitive function of the discrete-time form (Ernoult et al. 2019), per sample, shape (B,):
        Phi(x, s) = sum_k s_{k+1}^T W_k s_k + sum_k b_k^T s_k - beta C(s, y)
    Its gradient dPhi/ds_k is ``local_fields``; the discrete-time dynamics are s <- rho(dPhi/ds) = clip(a h, 0, 1).
    """
    dynamic = network.dynamics()
    layers = [x] + list(states)
    phi = np.zeros(x.shape[0], dtype=np.float64)
    for k in range(1, dynamic.num_layers + 1):
        s, below = layers[k].astype(np.float64), layers[k - 1].astype(np.float64)
        w, b = dynamic.weights[k - 1].astype(np.float64), dynamic.biases[k - 1].astype(np.float64)
        phi += np.sum(s * (below @ w.T), axis=1) + s @ b
    y = _nudge_target(network, target, x.shape[0], beta)
    if y is not None:
        phi -= beta * cost(network, states, y)
    return phi


def energy(network: Network, x, states, beta: float = 0.0, target=None) -> np.ndarray:
    """E(s) + beta C per sample, shape (B,). See the module docstring for the formula."""
    squares = sum(np.sum(s.astype(np.float64) ** 2, axis=1) for s in states)
    return 0.5 / network.slope * squares - primitive(network, x, states, beta, target)


def energy_gradient(network: Network, x, states, beta: float = 0.0, target=None) -> list:
    """dE/ds_k = s_k / a - h_k, list of (B, n_k)."""
    a = network.slope
    return [s / a - h for s, h in zip(states, local_fields(network, x, states, beta, target))]


def velocity(network: Network, x, states, beta: float = 0.0, target=None) -> list:
    """ds_k/dt = a h_k - s_k (unprojected), list of (B, n_k)."""
    a = network.slope
    return [a * h - s for s, h in zip(states, local_fields(network, x, states, beta, target))]


def project(states) -> list:
    """Projection onto the box [0, 1]."""
    return [np.clip(s, 0.0, 1.0) for s in states]


def projected_velocity(states, velocities) -> list:
    """The velocity with the components that push out of [0, 1] at a bound set to zero.

    This is the right-hand side of the projected dynamical system; it vanishes exactly at the fixed points
    of the projected dynamics, so max |projected_velocity| is the residual of the continuous-time methods.
    """
    out = []
    for s, v in zip(states, velocities):
        blocked = ((s <= 0.0) & (v < 0.0)) | ((s >= 1.0) & (v > 0.0))
        out.append(np.where(blocked, 0.0, v).astype(v.dtype))
    return out


def max_abs(arrays) -> np.ndarray:
    """Per-sample max |.| over a list of (B, n_k) arrays: shape (B,)."""
    return np.max(np.concatenate([np.abs(a) for a in arrays], axis=1), axis=1)

"""The energy of a layered network as the sum of its interactions' terms, written once for every backend.

Notation: x (B, *shape_0) is the clamped input s_0; ``states`` the list s_1 .. s_L, s_k of shape (B, *shape_k), in
[0, 1]; a = network.slope; ``params`` the parameters in the backend's array type (``parameters(network, backend)``).

    Phi(x, s) = sum_i Phi_i(s_pre(i), s_post(i)) - beta C(s_L, y)                     (primitive function)
    h_k = dPhi/ds_k = sum over the interactions touching layer k of their field on it   (local field)
    E(s) = sum_k ||s_k||^2 / (2a) - Phi(x, s),   dE/ds_k = s_k / a - h_k,   ds_k/dt = a h_k - s_k
Fixed points: s = clip(a h, 0, 1) = rho(dPhi/ds). For a dense network these are exactly :mod:`ebm_sim.energy`'s
equations (tests hold the two against each other).
"""
from __future__ import annotations

from dataclasses import dataclass


from .interaction import array_ops, implementation
from .network import LayeredNetwork


@dataclass
class Parameters:
    """A network's parameters in one backend's array type: one dict per interaction, and the cost's dict."""

    interactions: list
    cost: dict
    backend: str = "numpy"


def parameters(network: LayeredNetwork, backend: str = "numpy", **to_backend) -> Parameters:
    """The parameters as ``backend`` arrays: numpy or numba (the network's own arrays) or torch (``device``,
    ``dtype``, ``requires_grad`` passed to :func:`ebm_sim.model.torch_ops.tensors`)."""
    if backend in ("numpy", "numba"):
        return Parameters([i.params for i in network.interactions], network.cost.params, backend)
    if backend == "torch":
        from .torch_ops import tensors
        return Parameters([tensors(i.params, **to_backend) for i in network.interactions],
                          tensors(network.cost.params, **to_backend), "torch")
    raise ValueError(f"unknown backend {backend!r}; choose numpy, numba or torch")


def prepare(network: LayeredNetwork, params: Parameters, batch: int) -> Parameters:
    """``params`` with what each implementation precomputes for a relaxation of ``batch`` samples during which the
    parameters do not change (an implementation's optional ``prepare(i, params, batch, pre_shape)``: e.g. the Numba
    convolutions' Winograd-transformed weights); the same object when no implementation has anything to add."""
    prepared, changed = [], False
    for i, p in zip(network.interactions, params.interactions):
        hook = None if i.unary else getattr(implementation(i.kind, params.backend), "prepare", None)
        q = p if hook is None else hook(i, p, batch, network.layer_shapes[i.pre])
        prepared.append(q)
        changed = changed or q is not p
    return Parameters(prepared, params.cost, params.backend) if changed else params


def _params(network, params):
    return parameters(network) if params is None else params


def _per_sample_dot(a, b):
    """<a_b, b_b> for each sample b: shape (B,)."""
    return (a * b).reshape(a.shape[0], -1).sum(1)


def cost_value(network, states, target, params=None):
    """C(s_L, y) per sample (B,)."""
    params = _params(network, params)
    return implementation(network.cost.kind, params.backend).value(network.cost, params.cost, states[-1], target)


def output(network, states, params=None):
    """The prediction's scores (B, classes): the readout's logits, or flat(s_L)."""
    params = _params(network, params)
    return implementation(network.cost.kind, params.backend).output(network.cost, params.cost, states[-1])


def clamped_fields(network: LayeredNetwork, x, params=None) -> list:
    """The part of every layer's field that no state changes (list of L arrays or None): the post fields of the
    interactions from the clamped input x and the biases. A relaxation computes it once (it is most of a dense first
    layer's work: W_0 x + b_1) and passes it to ``local_fields``."""
    params = _params(network, params)
    fields = [None] * network.num_layers
    for i, p in zip(network.interactions, params.interactions):
        impl = implementation(i.kind, params.backend)
        if i.unary:
            value = impl.field(i, p, array_ops(params.backend).zeros((x.shape[0],) + network.layer_shapes[i.post], x))
        elif i.pre == 0:
            value = impl.post_field(i, p, x)
        else:
            continue
        k = i.post - 1
        fields[k] = value if fields[k] is None else fields[k] + value
    return fields


def local_fields(network: LayeredNetwork, x, states, beta: float = 0.0, target=None, params=None,
                 layers=None, clamped=None, memo: dict | None = None) -> list:
    """h_k for the layers that relax (list of L arrays shaped like the states; None for layers not in ``layers``,
    0-based state indices, default all), nudged on s_L: h_L -= beta dC/ds_L (needs ``target`` when beta != 0).
    ``clamped``: ``clamped_fields(network, x, params)`` when precomputed (then those terms are not recomputed).

    An implementation with ``forward(i, params, s_pre) -> (post field, routing)`` (a convolution: one convolution of
    s_pre gives the pooled post field and the max-pool routing its pre field needs, ``pre_field(..., routing)``)
    computes both fields from one convolution when both are wanted. ``memo`` (a dict the caller keeps, e.g. one per
    relaxation) keeps each interaction's last forward with the s_pre it came from, and reuses it while that same
    array object is s_pre: with alternating updates the post field of one half-step and the pre field of the next
    share a convolution. The caller must not change a state array in place while it is in the memo."""
    params = _params(network, params)
    wanted = set(range(network.num_layers)) if layers is None else set(layers)
    every = [x] + list(states)
    fields = [None] * network.num_layers

    def add(layer, value):
        k = layer - 1
        fields[k] = value if fields[k] is None else fields[k] + value

    if clamped is not None:
        for k in wanted:
            if clamped[k] is not None:
                fields[k] = clamped[k]
    for index, (i, p) in enumerate(zip(network.interactions, params.interactions)):
        if clamped is not None and (i.unary or i.pre == 0):
            continue  # its field is in ``clamped`` (an interaction from the clamped input has no pre field)
        impl = implementation(i.kind, params.backend)
        if i.unary:
            if i.post - 1 in wanted:
                add(i.post, impl.field(i, p, every[i.post]))
            continue
        want_post, want_pre = i.post - 1 in wanted, i.pre >= 1 and i.pre - 1 in wanted
        s_pre = every[i.pre]
        if hasattr(impl, "forward"):
            known = memo.get(index) if memo is not None else None  # (s_pre, (post field, routing))
            known = known[1] if known is not None and known[0] is s_pre else None
            if known is None and want_post and (want_pre or memo is not None):
                known = tuple(impl.forward(i, p, s_pre))
                if memo is not None:
                    memo[index] = (s_pre, known)
            if want_post:
                add(i.post, known[0] if known is not None else impl.post_field(i, p, s_pre))
            if want_pre:  # (without a known routing the pre field finds its own)
                add(i.pre, impl.pre_field(i, p, s_pre, every[i.post], None if known is None else known[1]))
            continue
        if want_post:
            add(i.post, impl.post_field(i, p, s_pre))
        if want_pre:
            add(i.pre, impl.pre_field(i, p, s_pre, every[i.post]))
    last = network.num_layers - 1
    if beta != 0.0 and last in wanted:
        if target is None:
            raise ValueError("beta != 0 needs a target for the cost")
        fields[last] = fields[last] - beta * implementation(network.cost.kind, params.backend).state_gradient(
            network.cost, params.cost, states[-1], target)
    return fields


def primitive(network: LayeredNetwork, x, states, beta: float = 0.0, target=None, params=None):
    """Phi(x, s) per sample (B,): sum_i <field_i on post, s_post> - beta C."""
    params = _params(network, params)
    every = [x] + list(states)
    phi = 0.0
    for i, p in zip(network.interactions, params.interactions):
        impl = implementation(i.kind, params.backend)
        term = impl.field(i, p, every[i.post]) if i.unary else impl.post_field(i, p, every[i.pre])
        phi = phi + _per_sample_dot(term, every[i.post])
    if beta != 0.0:
        phi = phi - beta * cost_value(network, states, target, params)
    return phi


def energy(network: LayeredNetwork, x, states, beta: float = 0.0, target=None, params=None):
    """E(s) + beta C per sample (B,) = sum_k ||s_k||^2 / (2a) - Phi."""
    squares = sum(_per_sample_dot(s, s) for s in states)
    return 0.5 / network.slope * squares - primitive(network, x, states, beta, target, params)


def velocity(network: LayeredNetwork, x, states, beta: float = 0.0, target=None, params=None) -> list:
    """ds_k/dt = a h_k - s_k (unprojected)."""
    a = network.slope
    return [a * h - s for s, h in zip(states, local_fields(network, x, states, beta, target, params))]


def parameter_gradient(network: LayeredNetwork, x, states, params=None) -> list:
    """dPhi/dtheta (beta = 0), batch mean, one dict per interaction (the cost's parameters are not in Phi at beta 0)."""
    params = _params(network, params)
    every = [x] + list(states)
    grads = []
    for i, p in zip(network.interactions, params.interactions):
        impl = implementation(i.kind, params.backend)
        grads.append(impl.parameter_gradient(i, p, None if i.unary else every[i.pre], every[i.post]))
    return grads


def cost_parameter_gradient(network: LayeredNetwork, states, target, params=None) -> dict:
    """dC/dtheta of the cost's own parameters (the readout's), batch mean."""
    params = _params(network, params)
    return implementation(network.cost.kind, params.backend).parameter_gradient(
        network.cost, params.cost, states[-1], target)

"""The Torch twin of the simulator: the same equations (see :mod:`ebm_sim.energy`) in eager PyTorch, CPU or CUDA.

Importing this module needs torch; nothing else in ``ebm_sim``'s core does. It provides
- ``relax``: Euler, synchronous and alternating fixed-point iteration, with the Numba kernels' stopping rule (each
  sample stops when its residual meets tol: ``per_sample=True``) or the reference EP code bases' (the whole batch
  steps until every sample meets tol, checked every step: ``per_sample=False``); optionally differentiable, so that
  gradients flow through every step (BPTT);
- ``EBMClassifier``: an ``nn.Module`` mapping images in [0, 1] to logits by running the deployed relaxation;
- ``ep_gradient``: the EP step of :mod:`ebm_sim.training` on a torch device (``TrainConfig(backend="torch")``).
``hoist_input=True`` computes W_0 x + b_1 once per relaxation (the Numba kernels always do; the reference codes
recompute it every step).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import integrators
from .deployment import Deployment
from .deployment import resolve as resolve_deployment
from .ep import EPStep, ep_estimate, estimator_nudging
from .network import Network

TWIN_METHODS = integrators.methods("dense", "torch")  # the fixed-step family


@dataclass
class TorchNetwork:
    """A network's parameters as tensors: the layers that relax, and the softmax readout (W, b) if any."""

    weights: list
    biases: list
    slope: float
    readout: tuple | None = None

    @classmethod
    def from_network(cls, network: Network, device="cpu", dtype=None, requires_grad: bool = False):
        dtype = dtype or (torch.float32 if network.dtype == np.float32 else torch.float64)

        def tensor(a):
            return torch.tensor(a, dtype=dtype, device=device, requires_grad=requires_grad)

        dynamic = network.dynamics()
        readout = network.readout_layer()
        return cls([tensor(w) for w in dynamic.weights], [tensor(b) for b in dynamic.biases], network.slope,
                   None if readout is None else (tensor(readout[0]), tensor(readout[1])))

    @property
    def dtype(self):
        return self.weights[0].dtype

    @property
    def device(self):
        return self.weights[0].device

    def logits(self, states):
        """Readout logits W_r s_L + b_r, or the output states s_L without a readout."""
        if self.readout is None:
            return states[-1]
        return torch.addmm(self.readout[1], states[-1], self.readout[0].t())

    def output_field(self, x, states):
        """Logits that keep a gradient where the output saturates: a h_L = a (W_{L-1} s_{L-1} + b_L), the output
        layer's field before the clip (s_L = clip(a h_L, 0, 1) at a fixed point, so argmax agrees with s_L's
        wherever s_L has a unique largest entry); with a readout, the readout logits. x: (B, n_0) (used when
        L = 1)."""
        if self.readout is not None:
            return self.logits(states)
        below = states[-2] if len(states) > 1 else x.to(self.dtype)
        return self.slope * torch.addmm(self.biases[-1], below, self.weights[-1].t())


def to_torch(network: Network, device="cpu", dtype=None) -> tuple:
    """(weights, biases) of the layers that relax, as lists of tensors on ``device``."""
    net = TorchNetwork.from_network(network, device, dtype)
    return net.weights, net.biases


def cost_gradient(net: TorchNetwork, states, target):
    """dC/ds on the last state layer: s_L - y (MSE), or W_r^T (softmax(W_r s + b_r) - y) with a readout."""
    if net.readout is None:
        return states[-1] - target
    return (torch.softmax(net.logits(states), dim=1) - target) @ net.readout[0]


def local_fields(net, biases_or_none, x, states, beta=0.0, target=None, input_field=None, layers=None) -> list:
    """h_k = W_{k-1} s_{k-1} + W_k^T s_{k+1} + b_k for the layers in ``layers`` (0-based; default all), others None;
    the last state layer is nudged: h -= beta dC/ds. ``net`` is a TorchNetwork (then ``biases_or_none`` is None), or
    a list of weight tensors with their biases (MSE only). ``input_field`` = x W_0^T + b_1 when precomputed."""
    if not isinstance(net, TorchNetwork):
        net = TorchNetwork(list(net), list(biases_or_none), 1.0)
    weights, biases = net.weights, net.biases
    num_layers = len(weights)
    below = [x] + list(states[:-1])
    fields = [None] * num_layers
    for k in (range(num_layers) if layers is None else layers):
        h = input_field if (k == 0 and input_field is not None) else torch.addmm(biases[k], below[k], weights[k].t())
        if k < num_layers - 1:
            h = h + states[k + 1] @ weights[k + 1]
        if k == num_layers - 1 and beta != 0.0:
            h = h - beta * cost_gradient(net, states, target)
        fields[k] = h
    return fields


@dataclass
class TorchRelaxResult:
    """states: list of (B, n_k) tensors; steps: (B,) int tensor (per sample; with per_sample=False every entry is
    the batch's step count); residual: (B,) tensor; converged: (B,) bool tensor (residual < tol); logits (B, n_L);
    output_update (B, n_L): the last layer's last update before the clip, s_L = clip(output_update, 0, 1) exactly
    (a h_L of the states it was computed from with dt = 1; with Euler s_L + dt (a h_L - s_L)); the initial s_L if
    no step ran."""

    states: list
    steps: torch.Tensor
    residual: torch.Tensor
    converged: torch.Tensor
    logits: torch.Tensor
    output_update: torch.Tensor | None = None


def relax(network, x, method: str = "fixed_point", tol: float = 1e-4, max_steps: int = 1000,
          dt: float | None = None, beta: float = 0.0, target=None, initial=None, device="cpu",
          hoist_input: bool = False, per_sample: bool = True, differentiable: bool = False,
          deployment=None) -> TorchRelaxResult:
    """Relax x (B, n_0) with the Torch twin: the update and residual of :func:`ebm_sim.relax.relax` for
    "euler" (dt, default 0.5), "fixed_point" and "alternating" (dt = 1); residual max |s_{t+1} - s_t| / dt.

    network: a Network or a TorchNetwork (whose tensors may require grad). tol = 0 runs exactly max_steps steps.
    per_sample: freeze each sample when it meets tol (the Numba kernels' rule, same steps and states) or step the
    whole batch until every sample does (the reference codes' rule). differentiable: keep the autograd graph of
    every step (x and the parameters may require grad); otherwise run under no_grad. deployment: an
    ``ebm_sim.deployment.Deployment`` that supplies method, tol, max_steps and dt (leave those at their defaults).
    """
    method, tol, max_steps, dt = resolve_deployment(deployment, relax, method, tol, max_steps, dt)
    integrator = integrators.get(method, "dense", "torch", "the Torch twin")
    dt = integrator.resolve_dt(dt)
    net = network if isinstance(network, TorchNetwork) else TorchNetwork.from_network(network, device)
    dtype, device = net.dtype, net.device

    def tensor(a):
        return a.to(device=device, dtype=dtype) if torch.is_tensor(a) else torch.as_tensor(
            np.asarray(a), dtype=dtype, device=device)

    x = tensor(x)
    target = None if target is None else tensor(target)
    a = net.slope
    if initial is None:
        states = [torch.zeros(x.shape[0], w.shape[0], dtype=dtype, device=device) for w in net.weights]
    else:
        states = [tensor(s) for s in initial]
    groups = integrator.update_groups(len(net.weights))
    batch = x.shape[0]
    active = torch.ones(batch, dtype=torch.bool, device=device)
    steps = torch.zeros(batch, dtype=torch.int64, device=device)
    residual = torch.full((batch,), float("inf"), dtype=dtype, device=device)
    last = len(net.weights) - 1
    with torch.set_grad_enabled(differentiable):
        update = states[last]
        input_field = torch.addmm(net.biases[0], x, net.weights[0].t()) if hoist_input else None
        for _ in range(max_steps):
            change = torch.zeros(batch, dtype=dtype, device=device)
            for group in groups:
                fields = local_fields(net, None, x, states, beta, target, input_field, group)
                for k in group:
                    raw = a * fields[k] if dt == 1.0 else states[k] + dt * (a * fields[k] - states[k])
                    new = raw.clamp(0.0, 1.0)
                    change = torch.maximum(change, (new - states[k]).abs().amax(dim=1).detach())
                    states[k] = torch.where(active[:, None], new, states[k]) if per_sample else new
                    if k == last:
                        update = torch.where(active[:, None], raw, update) if per_sample else raw
            change = change / dt if dt != 1.0 else change
            residual = torch.where(active, change, residual) if per_sample else change
            steps = steps + active.long()
            if per_sample:
                active = active & ~(residual < tol) & torch.isfinite(residual)
                if not bool(active.any()):
                    break
            elif bool((residual < tol).all()):
                break
    return TorchRelaxResult(states, steps, residual, residual < tol, net.logits(states), update)


LOGITS = ("state", "field", "update")


def twin_deployment(deployment, callee, method, tol, max_steps, dt, who: str = "the Torch twin",
                    kind: str = "dense") -> Deployment:
    """The Deployment a module built on the twin relaxes with: ``deployment``, or method, tol, max_steps and dt
    (``callee``'s arguments; not both), refused unless torch steps its method for networks of ``kind`` ("dense":
    the twin; "layered": ``ebm_sim.model.dynamics``) (``who`` names the module)."""
    method, tol, max_steps, dt = resolve_deployment(deployment, callee, method, tol, max_steps, dt)
    integrators.get(method, kind, "torch", who)
    return Deployment(method=method, dt=dt, tol=float(tol), max_steps=int(max_steps))


class EBMClassifier(torch.nn.Module):
    """An EBM as a classifier: forward(images in [0, 1], (B, n_0) or (B, ...)) -> logits, by running the deployed
    relaxation (same integrator, step cap, tolerance, zero initial state and clamping as prediction) with autograd
    through every step (BPTT), so attacks see what is deployed. Logits: the readout's; without a readout, the
    output states s_L (``logits="state"``), the output field a h_L of the final states before the clip
    (``logits="field"``, see ``TorchNetwork.output_field``: a saturated output unit keeps its gradient, which attacks
    need), or the output layer's last update before the clip (``logits="update"``: it keeps that gradient too, and
    is the value whose clip *is* the deployed s_L, where "field" is one step ahead of an unconverged relaxation).
    The relaxation: ``deployment`` (an ``ebm_sim.deployment.Deployment``), or method, max_steps, tol and dt."""

    def __init__(self, network: Network, method: str = "fixed_point", max_steps: int = 30, tol: float = 1e-4,
                 dt: float | None = None, device="cpu", logits: str = "state", deployment: Deployment | None = None):
        super().__init__()
        if logits not in LOGITS:
            raise ValueError(f"logits must be one of {', '.join(LOGITS)}, got {logits!r}")
        self.deployment = twin_deployment(deployment, EBMClassifier.__init__, method, tol, max_steps, dt)
        self.logits = logits
        self.layer_sizes = network.layer_sizes
        net = TorchNetwork.from_network(network, device)
        self._weights = torch.nn.ParameterList([torch.nn.Parameter(w) for w in net.weights])
        self._biases = torch.nn.ParameterList([torch.nn.Parameter(b) for b in net.biases])
        self._readout = (torch.nn.ParameterList([torch.nn.Parameter(p) for p in net.readout])
                         if net.readout is not None else None)
        self.slope = net.slope

    def twin(self) -> TorchNetwork:
        readout = None if self._readout is None else (self._readout[0], self._readout[1])
        return TorchNetwork(list(self._weights), list(self._biases), self.slope, readout)

    def relax(self, x) -> TorchRelaxResult:
        x = x.reshape(x.shape[0], -1)
        return relax(self.twin(), x, differentiable=True, deployment=self.deployment)

    def forward(self, x):
        result = self.relax(x)
        if self.logits == "state" or self._readout is not None:
            return result.logits
        if self.logits == "update":
            return result.output_update
        return self.twin().output_field(x.reshape(x.shape[0], -1), result.states)


def ep_gradient(network: Network, x, target, config, sign: float = 1.0, device="cpu"):
    """The EP step of :func:`ebm_sim.training.ep_gradient` computed with the Torch twin on ``device``: the same
    estimator (:func:`ebm_sim.ep.ep_estimate`), phases and stopping rule; returns an ``ebm_sim.ep.EPStep`` of numpy
    arrays."""
    net = TorchNetwork.from_network(network, device)
    xt = torch.as_tensor(np.asarray(x), dtype=net.dtype, device=device)
    yt = torch.as_tensor(np.asarray(target), dtype=net.dtype, device=device)

    def relax_phase(beta, initial):
        steps = config.free_steps if initial is None else config.nudged_steps
        return relax(net, xt, method=config.method, tol=config.tol, dt=config.dt, max_steps=steps, beta=beta,
                     target=yt if beta else None, initial=initial)

    def energy_gradient(states):
        """dE/dtheta, batch mean: [-s_1^T x, -s_1, -s_2^T s_1, ...] (the order of Network.parameters)."""
        grads = []
        for above, below in zip(states, [xt] + list(states[:-1])):
            grads += [-(above.t() @ below) / xt.shape[0], -above.mean(dim=0)]
        return grads

    def readout_gradient(free):
        from .model.cost import readout_parameter_gradient
        return readout_parameter_gradient(*net.readout, free.states[-1], yt, backend="torch")

    step = ep_estimate(relax_phase, energy_gradient, config.beta, estimator_nudging(config.nudging), sign,
                       readout_gradient if net.readout is not None else None)
    return EPStep([g.detach().cpu().numpy() for g in step.gradient], [s.cpu().numpy() for s in step.free_states],
                  step.free_steps.cpu().numpy(), step.free_residual.double().cpu().numpy(), step.nudged_steps)

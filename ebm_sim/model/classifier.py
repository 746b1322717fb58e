"""Layered (e.g. convolutional) EBMs as torch classifiers for attacks: the deployed relaxation, differentiable.

    LayeredEBMClassifier(network, deployment=d)                 BPTT through every deployed step
    LayeredEBMClassifier(network, deployment=d, attack_steps=K)   "as published": the value of every step, the
                                                                  gradient of the first K
    LayeredEBMClassifier(..., checkpoint_steps=C)               the same gradients, memory of one chunk of C steps
    LayeredImplicitEBM(network, deployment=d)                   implicit differentiation at the fixed point

forward(images (B, C, H, W) in [0, 1], or flattened (B, C*H*W)) -> logits (B, classes). The relaxation is
:func:`ebm_sim.model.dynamics.relax_clamped` on the torch interaction backend, with the deployment's integrator,
dt, tol and step cap: zero start, the clamped layer s_0 = network.normalize(x) (normalization inside the model, so
budgets stay in pixel space), each sample frozen once its residual is below tol. Logits: the softmax readout's
W flat(s_L) + b; for a SquaredError network (no readout), as ``ebm_sim.torch_twin.EBMClassifier``: the output states
flat(s_L) ("state"), the output field a h_L of the final states ("field") or the last update before the clip, whose
clip is the deployed s_L ("update"; both keep a gradient where s_L saturates).

Running the relaxation in pieces (``advance``): n more steps from a ``Progress`` (states, last update, steps,
residual, which samples still run) relax only the samples still running, from their states, and leave the others as
they are. Every sample's steps depend on its own states alone, so pieces of n_1 + n_2 + ... steps give the states of
one relaxation of max_steps steps (equal up to float rounding of a smaller batch), which is what checkpointing and
truncation need. ``dynamics.relax_clamped`` takes initial states but not a per-sample "still running" mask; a
``Progress``-aware entry point there would let ``advance`` drop its row selection.

Truncated gradients ("as published", ``attack_steps=K``). The published attacks on convolutional EBMs (lanl/AdvEP, as
the toolkit's robustness issue describes them) predicted with every step but backpropagated through the first K
unrolled steps only. Here: the first K steps run with autograd (logits z_K), the rest under no_grad from their detached
states (logits z_T of the whole relaxation), and

    logits = z_K + stopgrad(z_T - z_K):   value z_T (what is deployed), gradient dz_K/dx (the K-step relaxation's).

Straight-through at the logits rather than at the states: the readout is affine (W flat(s) + b, or flat(s)), so
d z/d s is the same at s_K and s_T and the two choices give the same gradient, while the logits form also covers
"update" logits (the update of step K, not a function of s_K). K >= max_steps is full BPTT.

Memory. BPTT keeps every step's saved tensors (conv inputs, pooling indices, clip masks): linear in steps and batch.
``checkpoint_steps=C`` wraps each piece of C steps in ``torch.utils.checkpoint`` (non-reentrant): the forward keeps
only the states between pieces, the backward recomputes one piece at a time (about one more forward pass), and the
gradient is the same. Measured peak memory (cifar10-cpu and Laborieux presets): README.md, "Robustness evaluation"
(benchmarks/conv_attack_memory.py).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace

import torch
from torch.utils.checkpoint import checkpoint

from ..deployment import Deployment
from ..implicit import AdjointStatistics, FixedPointAdjoint
from ..torch_twin import LOGITS, twin_deployment
from .dynamics import relax_clamped
from .energy import Parameters, local_fields, output, parameters
from .network import LayeredNetwork


@dataclass
class Progress:
    """Where a relaxation of B samples stands: states [(B, *shape_k)], update (B, *shape_L) (the last layer's last
    update before the clip), steps (B,) int64, residual (B,), active (B,) bool (still running)."""

    states: list
    update: torch.Tensor
    steps: torch.Tensor
    residual: torch.Tensor
    active: torch.Tensor

    @classmethod
    def start(cls, network: LayeredNetwork, x0: torch.Tensor) -> "Progress":
        """Zero states (the deployment's initial state), every sample running."""
        states = [x0.new_zeros((x0.shape[0],) + shape) for shape in network.state_shapes]
        batch, device = x0.shape[0], x0.device
        return cls(states, states[-1], torch.zeros(batch, dtype=torch.int64, device=device),
                   torch.full((batch,), float("inf"), dtype=torch.float64, device=device),
                   torch.ones(batch, dtype=torch.bool, device=device))

    def detached(self) -> "Progress":
        return replace(self, states=[s.detach() for s in self.states], update=self.update.detach())


def advance(network: LayeredNetwork, x0, params: Parameters, deployment: Deployment, progress: Progress,
            n: int) -> Progress:
    """``n`` more steps of the deployed relaxation for the samples still running (``progress.active``), from their
    states; the others keep theirs. x0: the clamped layer (B, *input_shape), normalized. Differentiable when grad
    mode is on (out-of-place row selection and ``index_copy``)."""
    rows = progress.active.nonzero().reshape(-1)
    if n < 1 or rows.numel() == 0:
        return progress
    every = rows.numel() == x0.shape[0]

    def pick(a):
        return a if every else a.index_select(0, rows)

    sub = relax_clamped(network, pick(x0), deployment.method, deployment.tol, n, deployment.dt,
                        initial=[pick(s) for s in progress.states], params=params)

    def put(old, new):
        return new if every else old.index_copy(0, rows, new.to(old.dtype))

    active = ~sub.converged & torch.isfinite(sub.residual)  # relax_clamped's own rule for going on
    return Progress([put(s, t) for s, t in zip(progress.states, sub.states)], put(progress.update, sub.output_update),
                    put(progress.steps, pick(progress.steps) + sub.steps),
                    put(progress.residual, sub.residual), put(progress.active, active))


def relax_progress(network: LayeredNetwork, x0, params: Parameters, deployment: Deployment, n: int,
                   progress: Progress | None = None, chunk: int | None = None) -> Progress:
    """``n`` steps from ``progress`` (default: the zero start), in one piece or, with ``chunk`` and grad mode on,
    in pieces of ``chunk`` steps each under ``torch.utils.checkpoint`` (same values and gradients, the memory of one
    piece: see the module docstring)."""
    progress = Progress.start(network, x0) if progress is None else progress
    if chunk is None or not torch.is_grad_enabled():
        return advance(network, x0, params, deployment, progress, n)
    for done in range(0, n, chunk):
        size = min(chunk, n - done)
        if not bool(progress.active.any()):
            break

        def piece(x0_, update, steps, residual, active, *states, size=size):
            p = advance(network, x0_, params, deployment, Progress(list(states), update, steps, residual, active),
                        size)
            return (p.update, p.steps, p.residual, p.active, *p.states)

        update, steps, residual, active, *states = checkpoint(
            piece, x0, progress.update, progress.steps, progress.residual, progress.active, *progress.states,
            use_reentrant=False)
        progress = Progress(states, update, steps, residual, active)
    return progress


def _steps_option(value, name: str) -> int | None:
    """None, or an integer >= 1 (ValueError naming ``name`` otherwise)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}")
    return int(value)


class _LayeredModule(torch.nn.Module):
    """What both layered classifiers share: the network's parameters as (frozen) torch parameters, the deployment,
    the logits choice, the input check and the clamped layer."""

    def __init__(self, network: LayeredNetwork, deployment: Deployment, logits: str, device, who: str):
        super().__init__()
        if not isinstance(network, LayeredNetwork):
            raise ValueError(f"{who} takes an ebm_sim.model.LayeredNetwork, got {type(network).__name__} (a dense "
                             "Network: ebm_sim.torch_twin.EBMClassifier)")
        if logits not in LOGITS:
            raise ValueError(f"logits must be one of {', '.join(LOGITS)}, got {logits!r}")
        self.network, self.deployment, self.logits = network, deployment, logits
        params = parameters(network, "torch", device=device)
        # parameters (not trained here) so that attack libraries find the device and dtype, and .to() moves them
        self._interactions = torch.nn.ModuleList(
            [torch.nn.ParameterDict({n: torch.nn.Parameter(t, requires_grad=False) for n, t in p.items()})
             for p in params.interactions])
        self._cost = torch.nn.ParameterDict(
            {n: torch.nn.Parameter(t, requires_grad=False) for n, t in params.cost.items()})

    def params(self) -> Parameters:
        """The parameters as ``energy.Parameters`` on the module's device (for ``dynamics``)."""
        return Parameters([dict(p) for p in self._interactions], dict(self._cost), "torch")

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self._interactions[0].values())).dtype

    def clamped(self, x: torch.Tensor) -> torch.Tensor:
        """s_0 = normalize(x) for images (B, *input_shape) or (B, prod(input_shape)); ValueError on another shape."""
        shape = self.network.input_shape
        if not torch.is_tensor(x) or x.dim() < 2 or x.shape[0] < 1:
            raise ValueError(f"images must be a tensor (B, {', '.join(map(str, shape))}) with B >= 1, got "
                             f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
        if tuple(x.shape[1:]) == (math.prod(shape),):
            x = x.reshape((x.shape[0],) + shape)
        elif tuple(x.shape[1:]) != shape:
            raise ValueError(f"images have shape {tuple(x.shape[1:])} per sample; the network's input layer is "
                             f"{shape} (or flattened, ({math.prod(shape)},))")
        return self.network.normalize(x.to(self.dtype))

    def field_logits(self, x0, states, params: Parameters) -> torch.Tensor:
        """The output field a h_L of ``states``, flattened (B, n_L)."""
        last = self.network.num_layers - 1
        h = local_fields(self.network, x0, states, params=params, layers=[last])[last]
        return (self.network.slope * h).reshape(h.shape[0], -1)

    def progress_logits(self, x0, progress: Progress, params: Parameters) -> torch.Tensor:
        """Logits of a relaxation's states (see the module docstring)."""
        if self.logits == "state" or self.network.cost.kind != "squared_error":
            return output(self.network, progress.states, params)
        if self.logits == "update":
            return progress.update.reshape(progress.update.shape[0], -1)
        return self.field_logits(x0, progress.states, params)


class LayeredEBMClassifier(_LayeredModule):
    """A layered EBM as a classifier with gradients by BPTT through the deployed relaxation (module docstring).

    deployment: an ``ebm_sim.deployment.Deployment`` (e.g. ``Deployment.of_network_file(path)``), or method,
    max_steps, tol and dt (not both). logits: "state", "field" or "update" (SquaredError networks; a readout
    network's logits are the readout's). attack_steps: K >= 1, or None for every step. checkpoint_steps: C >= 1 steps
    per checkpointed piece, or None. Parameters are frozen (requires_grad False): attacks need input gradients only.
    ``last_progress``: the bookkeeping (steps, residual, active) of the last forward's full relaxation."""

    def __init__(self, network: LayeredNetwork, method: str = "fixed_point", max_steps: int = 30, tol: float = 1e-4,
                 dt: float | None = None, device="cpu", logits: str = "state", deployment: Deployment | None = None,
                 attack_steps: int | None = None, checkpoint_steps: int | None = None):
        deployment = twin_deployment(deployment, LayeredEBMClassifier.__init__, method, tol, max_steps, dt,
                                     "LayeredEBMClassifier", kind="layered")
        attack = _steps_option(attack_steps, "attack_steps")
        chunk = _steps_option(checkpoint_steps, "checkpoint_steps")
        super().__init__(network, deployment, logits, device, "LayeredEBMClassifier")
        self.attack_steps, self.checkpoint_steps = attack, chunk
        self.last_progress = None

    def forward(self, x):
        x0 = self.clamped(x)
        params, d = self.params(), self.deployment
        truncated = self.attack_steps is not None and self.attack_steps < d.max_steps and torch.is_grad_enabled()
        head = relax_progress(self.network, x0, params, d, self.attack_steps if truncated else d.max_steps,
                              chunk=self.checkpoint_steps)
        head_logits = self.progress_logits(x0, head, params)
        if not truncated:
            self.last_progress = head.detached()
            return head_logits
        with torch.no_grad():
            full = relax_progress(self.network, x0.detach(), params, d, d.max_steps - self.attack_steps,
                                  head.detached())
            full_logits = self.progress_logits(x0.detach(), full, params)
        self.last_progress = full
        return head_logits + (full_logits - head_logits).detach()


class LayeredImplicitEBM(AdjointStatistics, _LayeredModule):
    """A layered EBM as a classifier with input gradients by implicit differentiation at the deployed fixed point
    (:mod:`ebm_sim.implicit`): forward value the deployed relaxation's logits (as ``LayeredEBMClassifier``); the
    gradient that of the fixed point s* = F(s*, x0), F(s, x0) = clip(a h(s, x0), 0, 1) (one synchronous update of
    every layer: the fixed point of every integrator), x0 = normalize(x). "update" logits are differentiated as the
    output field a h_L at s* (their value at a fixed point; ``distill.robustness.implicit.ImplicitEBM`` does the
    same). adjoint_tol, adjoint_max_steps: ``FixedPointAdjoint``'s; ``last_adjoint_steps`` and
    ``last_adjoint_converged`` tell how the last backward pass ended."""

    def __init__(self, network: LayeredNetwork, method: str = "fixed_point", max_steps: int = 30, tol: float = 1e-4,
                 dt: float | None = None, adjoint_tol: float = 1e-4, adjoint_max_steps: int = 100, device="cpu",
                 logits: str = "state", deployment: Deployment | None = None):
        deployment = twin_deployment(deployment, LayeredImplicitEBM.__init__, method, tol, max_steps, dt,
                                     "LayeredImplicitEBM", kind="layered")
        adjoint = FixedPointAdjoint(adjoint_tol, adjoint_max_steps)
        super().__init__(network, deployment, logits, device, "LayeredImplicitEBM")
        self.adjoint = adjoint
        self.last_progress = None

    def step(self, states: list, x0, params: Parameters) -> list:
        """F(s, x0): one synchronous update clip(a h_k, 0, 1) of every layer."""
        a = self.network.slope
        return [torch.clamp(a * h, 0.0, 1.0) for h in local_fields(self.network, x0, states, params=params)]

    def forward(self, x):
        x0 = self.clamped(x)
        params = self.params()
        with torch.no_grad():
            fixed = relax_progress(self.network, x0.detach(), params, self.deployment, self.deployment.max_steps)
            deployed = self.progress_logits(x0.detach(), fixed, params)
        self.last_progress = fixed
        if not torch.is_grad_enabled() or not x0.requires_grad:
            return deployed
        states = self.adjoint.attach(lambda s, xx: self.step(s, xx, params), fixed.states, x0)
        if self.logits == "state" or self.network.cost.kind != "squared_error":
            differentiable = output(self.network, states, params)
        else:
            differentiable = self.field_logits(x0, states, params)
        return differentiable + (deployed - differentiable).detach()

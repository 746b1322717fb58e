"""Equilibrium propagation (EP) training on the Numba simulator.

One training step on a minibatch (x, y), with the dynamics of :mod:`ebm_sim.energy`:
  1. free phase: relax from zero to the free fixed point s^0 (at most ``free_steps`` steps, or until ``tol``);
  2. nudged phase(s) from s^0 with E + beta C (at most ``nudged_steps`` steps each):
       "positive"  one-sided +beta:          g = (dE/dtheta(s^+) - dE/dtheta(s^0)) / beta
       "symmetric" +beta and -beta (default): g = (dE/dtheta(s^+) - dE/dtheta(s^-)) / (2 beta)   (Laborieux 2021)
       "random"    one-sided with a random sign per minibatch (seeded)
     With E = ... - sum_k s_{k+1}^T W_k s_k - sum_k b_k^T s_k:  dE/dW_k = -s_{k+1} s_k^T, dE/db_k = -s_k
     (batch means), and g -> dL/dtheta as beta -> 0, L = C(s^0) (Scellier & Bengio 2017);
  3. the optimizer (SGD with momentum or Adam, per-layer learning rates, weight decay, constant or cosine schedule)
     descends g.

Costs: "mse" C = 1/2 ||s_L - y||^2 on the output state; "cross_entropy" C = -sum y log softmax(W_r s_L + b_r) through
a softmax readout that is not part of the dynamics (a network made with ``readout=True``, as in the CIFAR recipes of
Laborieux et al. 2021); its nudge is -beta W_r^T (softmax - y) and the readout's own gradient (softmax - y) s_L^T is
taken directly at the free fixed point. Minibatches come from a permutation seeded by
(seed, epoch), and random nudging signs from (seed, epoch, batch), so a run is reproducible and an interrupted
run resumed from its last epoch checkpoint ends with exactly the weights of an uninterrupted one.
"""
from __future__ import annotations

import functools
import math
import numbers
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np

from . import energy
from .deployment import Deployment
from .model.network import is_layered
from .network import Network
from .ep import EPStep, ep_estimate, estimator_nudging
from .optimizers import SGD, Adam
from . import integrators
from .relax import relax

NUDGINGS = ("symmetric", "positive", "random")
COSTS = ("mse", "cross_entropy")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine")
BACKENDS = ("numba", "torch")
AUGMENTATIONS = ("none", "crop_flip")


# ------------------------------------------------------------------------------------------------ configuration
@dataclass
class TrainConfig:
    """Hyperparameters of EP training (validated on creation; every field is stored with the checkpoints)."""

    epochs: int = 10
    batch_size: int = 50
    beta: float = 0.5
    nudging: str = "symmetric"
    cost: str = "mse"
    method: str = "fixed_point"
    free_steps: int = 30
    nudged_steps: int = 10
    tol: float = 1e-4  # a phase stops when its residual falls below tol; 0: always the full step counts
    dt: float | None = None
    optimizer: str = "adam"
    lr: float | list = 5e-4
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"
    seed: int = 0
    eval_batch_size: int = 1000
    backend: str = "numba"  # or "torch": the EP step runs on the Torch twin, on ``device`` (e.g. "cuda")
    device: str = "cpu"
    augment: str = "none"  # or "crop_flip": random crop with 4 pixels of zero padding and horizontal flip (images)

    def __post_init__(self):
        def positive_int(name):
            value = getattr(self, name)
            if not (isinstance(value, numbers.Integral) and value >= 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        def real(name, low=None, low_inclusive=True, high=None):
            value = getattr(self, name)
            if not (isinstance(value, numbers.Real) and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            if low is not None and (value < low or (value == low and not low_inclusive)):
                raise ValueError(f"{name} must be {'>=' if low_inclusive else '>'} {low}, got {value!r}")
            if high is not None and value >= high:
                raise ValueError(f"{name} must be < {high}, got {value!r}")

        for name in ("epochs", "batch_size", "free_steps", "nudged_steps", "eval_batch_size"):
            positive_int(name)
        for name, allowed in (("nudging", NUDGINGS), ("cost", COSTS), ("optimizer", OPTIMIZERS),
                              ("schedule", SCHEDULES), ("augment", AUGMENTATIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        trainable = integrators.methods(backend=self.backend, deployable=True)
        if self.method not in trainable:
            raise ValueError(f"the {self.backend} backend trains with method {', '.join(trainable)}, not "
                             f"{self.method!r}")
        if self.backend == "torch":
            import torch
            try:
                torch.device(self.device)
            except RuntimeError as error:
                raise ValueError(f"unknown torch device {self.device!r}: {error}") from None
        real("beta", 0.0, low_inclusive=False)  # every nudging mode needs beta > 0 (the sign is the mode's job)
        real("tol", 0.0, low_inclusive=not integrators.INTEGRATORS[self.method].adaptive)  # 0: fixed step counts, no early stopping
        real("momentum", 0.0, high=1.0)
        real("weight_decay", 0.0)
        lrs = self.lr if isinstance(self.lr, (list, tuple)) else [self.lr]
        for value in lrs:
            if not (isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0):
                raise ValueError(f"learning rates must be finite and >= 0, got {self.lr!r}")
        if isinstance(self.lr, tuple):
            self.lr = list(self.lr)
        if not isinstance(self.seed, numbers.Integral):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    def layer_rates(self, num_layers: int) -> list:
        """One learning rate per weight matrix (its bias shares it)."""
        if isinstance(self.lr, list):
            if len(self.lr) != num_layers:
                raise ValueError(f"{len(self.lr)} learning rates given for a network with {num_layers} weight "
                                 f"matrices: give one per layer or a single value")
            return [float(v) for v in self.lr]
        return [float(self.lr)] * num_layers

    def as_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ costs
def one_hot(labels, num_classes: int, dtype) -> np.ndarray:
    return np.eye(num_classes, dtype=dtype)[labels]


def batch_loss(network: Network, states, target) -> np.ndarray:
    """C per sample: MSE on s_L, or cross-entropy of the softmax readout (see ``energy.cost``)."""
    if is_layered(network):
        from .model.energy import cost_value
        return cost_value(network, states, target)
    return energy.cost(network, states, target)


def predictions(network: Network, states) -> np.ndarray:
    """argmax of s_L, or of the readout's logits."""
    if is_layered(network):
        from .model.energy import output
        return np.argmax(output(network, states), axis=1)
    return np.argmax(network.logits(states), axis=1)


def num_outputs(network) -> int:
    """Units of the prediction: classes of the readout, or of the output layer."""
    return network.num_classes if is_layered(network) else network.layer_sizes[-1]


def check_cost(network: Network, cost: str) -> None:
    """The cost fixes the output: MSE on the last state layer, cross-entropy through a softmax readout."""
    if is_layered(network):
        readout = network.cost.kind == "softmax_readout"
        if (cost == "cross_entropy") != readout:
            raise ValueError(f"cost {cost!r} does not fit a network whose cost is {network.cost.kind}: a spec that "
                             f"ends in 'readout N' trains with cross_entropy, one without it with mse")
        return
    if cost == "cross_entropy" and not network.readout:
        raise ValueError("cost 'cross_entropy' needs a network with a softmax readout: "
                         "Network.init(..., readout=True) (ebm train --cost cross_entropy makes one)")
    if cost == "mse" and network.readout:
        raise ValueError("this network ends in a softmax readout: train it with cost 'cross_entropy'")


# ------------------------------------------------------------------------------------------------ EP gradient
def energy_parameter_gradient(x, states) -> list:
    """dE/dtheta at ``states``, batch mean: [dE/dW_0, dE/db_1, dE/dW_1, ...] = [-s_1 x^T, -s_1, -s_2 s_1^T, ...]."""
    below = [x] + list(states[:-1])
    batch = x.shape[0]
    grads = []
    for s_above, s_below in zip(states, below):
        grads.append(-(s_above.T @ s_below) / batch)
        grads.append(-s_above.mean(axis=0))
    return grads


def energy_parameter_contrast(x, high, low, scale: float = 1.0) -> list:
    """(dE/dtheta(high) - dE/dtheta(low)) / scale (batch means, the order of ``energy_parameter_gradient``), with
    SciPy's BLAS single-threaded (``kernels.weight_contrast``, the scale folded into the products) and one product
    for the input layer's weights: x is clamped in both states, so -s_1 x^T differs by -(s_1^h - s_1^l) x^T.
    Arrays: x (B, n_0), states (B, n_k), one dtype."""
    from .blas import make_handle, single_threaded
    from .kernels import weight_contrast

    blas = make_handle(x.dtype)
    below_high, below_low = [x] + list(high[:-1]), [x] + list(low[:-1])
    grads = []
    with single_threaded:
        for k in range(len(high)):
            grads.append(weight_contrast(blas, high[k], below_high[k], low[k], below_low[k], k == 0, float(scale)))
            grads.append((low[k].mean(axis=0) - high[k].mean(axis=0)) / scale)
    return grads


@functools.lru_cache(maxsize=64)
def _phase_settings(method: str, tol: float, dt, max_steps: int, beta: float):
    """The RelaxSettings of one EP phase, validated once per distinct phase rather than once per minibatch."""
    from .relax_types import RelaxSettings
    return RelaxSettings(method=method, tol=tol, max_steps=max_steps, dt=dt, beta=beta)


def _dense_inputs(network: Network, x, target):
    """A minibatch as the kernels take it: contiguous, in the network's dtype, shapes checked (values were checked
    once for the whole data set by ``fit``'s ``check_data``)."""
    x = np.ascontiguousarray(x, dtype=network.dtype)
    target = np.ascontiguousarray(target, dtype=network.dtype)
    if x.ndim != 2 or x.shape[1] != network.layer_sizes[0] or target.shape != (x.shape[0], num_outputs(network)):
        raise ValueError(f"a minibatch of this network needs x (B, {network.layer_sizes[0]}) and target "
                         f"(B, {num_outputs(network)}), got {x.shape} and {target.shape}")
    return x, target


#: the fewest rows a worker thread relaxes in a phase of the dense Numba EP step: below it, fewer threads. At 32 a
#: minibatch of 50 relaxes on one thread: split in two it measured 3.55-5.04 s per issue-17 epoch against 3.08-3.67
#: on one thread (2026-12-03, interleaved runs; the free phase alone gained 1.4-1.6x in isolation, not in the epoch)
MIN_ROWS_PER_SHARD = 32


def ep_gradient(network: Network, x, target, config: TrainConfig, sign: float = 1.0) -> EPStep:
    """The EP estimate of dL/dtheta on a minibatch (:func:`ebm_sim.ep.ep_estimate`). ``sign`` (+1 or -1) is the sign
    of beta for one-sided nudging ("positive" uses +1; "random" draws it). With ``config.backend == "torch"`` the
    same step runs on the Torch twin (``config.device``).

    On the Numba backend the phases call the kernels directly (``numba_backend.relax_numba``): the input projection
    x W_0^T + b_1 is computed once for all phases, the network's kernel arrays and each phase's settings once, and
    the gradient is the contrast of the two states (``energy_parameter_contrast``). Samples relax independently, so
    each phase splits the minibatch's rows over the cores (chunks of at least MIN_ROWS_PER_SHARD rows, each in its own
    thread: the kernels release the GIL); the projection and the contrast are one product each over the whole
    minibatch. (Running each shard's whole EP step in its own thread and averaging the shards' gradients cost four
    passes over every weight-sized array per minibatch and ran the products at half the rows: slower than one core on
    some days, measured.)"""
    if is_layered(network):
        return layered_ep_gradient(network, x, target, config, sign)
    if config.backend == "torch":
        from .torch_twin import ep_gradient as torch_ep_gradient
        return torch_ep_gradient(network, x, target, config, sign, config.device)
    from .blas import single_threaded
    from .numba_backend import KernelArrays

    x, target = _dense_inputs(network, x, target)
    with single_threaded:  # held across the phases: the worker threads call BLAS on one thread each
        return _dense_ep_step(network, KernelArrays.of(network), x, target, config, sign)


def _dense_ep_step(network: Network, arrays, x, target, config: TrainConfig, sign: float) -> EPStep:
    """``ep_gradient`` of a dense network on the Numba kernels (checked arrays); each phase on one worker thread per
    core with at least MIN_ROWS_PER_SHARD rows."""
    from .numba_backend import relax_numba

    x_proj = arrays.input_projection(x)

    def relax_phase(beta, initial):
        steps = config.free_steps if initial is None else config.nudged_steps
        settings = _phase_settings(config.method, float(config.tol), config.dt, steps, float(beta))
        result = relax_numba(network, x, settings, target if beta else None, initial, False, None, x_proj,
                             arrays, min_rows=MIN_ROWS_PER_SHARD)
        if result.diverged.any():
            from .relax import DivergenceError, divergence_remedy
            raise DivergenceError(f"the {config.method} dynamics produced NaN or inf for "
                                  f"{int(result.diverged.sum())} of {x.shape[0]} samples of a minibatch (beta "
                                  f"{beta:g}); {divergence_remedy(config.method)}")
        return result

    def readout_gradient(free):  # the readout is outside the energy: its loss gradient is direct, at the free state
        from .model.cost import readout_parameter_gradient
        return readout_parameter_gradient(*network.readout_layer(), free.states[-1], target)

    return ep_estimate(relax_phase, None, config.beta, estimator_nudging(config.nudging), sign,
                       readout_gradient if network.readout else None,
                       energy_contrast=lambda high, low, scale: energy_parameter_contrast(x, high, low, scale))


def layered_params(network, config: TrainConfig):
    """A LayeredNetwork's parameters for ``config.backend``: numba (the network's own numpy arrays), or torch tensors
    sharing the numpy arrays' memory on the CPU (the optimizer's in-place updates are seen without a copy), copies
    on another device."""
    from .model.energy import Parameters, parameters as model_parameters

    if config.backend == "numba":
        return model_parameters(network, "numba")
    if config.device == "cpu":
        import torch
        return Parameters([{k: torch.from_numpy(v) for k, v in i.params.items()} for i in network.interactions],
                          {k: torch.from_numpy(v) for k, v in network.cost.params.items()}, "torch")
    return model_parameters(network, "torch", device=config.device)


def _on_backend(array, config: TrainConfig):
    """A numpy batch as the backend's array (a tensor on ``config.device`` for torch)."""
    if config.backend == "numba":
        return np.asarray(array)
    import torch
    return torch.as_tensor(array, device=config.device)


def _numpy(array) -> np.ndarray:
    return array.detach().cpu().numpy() if hasattr(array, "detach") else np.asarray(array)


def _no_autograd(config: TrainConfig):
    if config.backend == "numba":
        from contextlib import nullcontext
        return nullcontext()
    import torch
    return torch.no_grad()


def layered_relax(network, x, config: TrainConfig, max_steps: int):
    """The free phase of a LayeredNetwork on numpy images x: numpy states, steps and residuals."""
    from .model.dynamics import relax as layered_relax_fn

    with _no_autograd(config):
        result = layered_relax_fn(network, _on_backend(x, config), config.method, config.tol, max_steps, config.dt,
                                  params=layered_params(network, config))
    return [_numpy(s) for s in result.states], _numpy(result.steps), _numpy(result.residual)


def layered_ep_gradient(network, x, target, config: TrainConfig, sign: float = 1.0) -> EPStep:
    """``ep_gradient`` for a LayeredNetwork: :func:`ebm_sim.model.ep.ep_gradient` on ``config.backend`` (numba or
    torch), gradients in the order of ``parameters(network)``."""
    from .model.ep import ep_gradient as model_ep_gradient, parameter_order

    params = layered_params(network, config)
    with _no_autograd(config):
        step = model_ep_gradient(network, _on_backend(x, config), _on_backend(target, config), config.beta,
                                 config.free_steps, config.nudged_steps, estimator_nudging(config.nudging), config.method,
                                 config.tol, config.dt, sign, params)
    gradient = [step.cost[name] if k == "cost" else step.interactions[k][name] for k, name in parameter_order(network)]
    return EPStep([_numpy(g) for g in gradient], [_numpy(s) for s in step.free.states], _numpy(step.free.steps),
                  _numpy(step.free.residual), step.nudged_steps)


# ------------------------------------------------------------------------------------------------ augmentation
def crop_flip(x, rng, padding: int = 4) -> np.ndarray:
    """Random crop of each (C, H, W) image from its zero-padded copy (offsets 0..2 padding) and a horizontal flip
    with probability 1/2 (the CIFAR recipes' augmentation): x (B, C, H, W) -> (B, C, H, W)."""
    batch, _, height, width = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    rows = rng.integers(0, 2 * padding + 1, batch)
    cols = rng.integers(0, 2 * padding + 1, batch)
    flips = rng.random(batch) < 0.5
    out = np.empty_like(x)
    for b in range(batch):
        crop = padded[b, :, rows[b]:rows[b] + height, cols[b]:cols[b] + width]
        out[b] = crop[:, :, ::-1] if flips[b] else crop
    return out


def augment(config: TrainConfig, x, epoch: int, batch: int) -> np.ndarray:
    """The batch as the step sees it: unchanged, or ``crop_flip`` seeded by (seed, epoch, batch) (reproducible and
    resumable)."""
    if config.augment == "none":
        return x
    return crop_flip(x, np.random.default_rng([config.seed, epoch, batch, 2]))


# ------------------------------------------------------------------------------------------------ optimizers
def parameters(network: Network) -> list:
    """The trainable arrays in EP order: [W_0, b_1, W_1, b_2, ...] (views: updating them updates the network); for a
    LayeredNetwork, each interaction's parameters in order, then the readout's."""
    if is_layered(network):
        return network.parameter_arrays()
    return [p for pair in zip(network.weights, network.biases) for p in pair]


def rate_groups(network) -> list:
    """The learning-rate index of each array of ``parameters``: layer k's incoming weights and bias share rate k - 1;
    a readout has the last rate. A dense network has one rate per weight matrix (the readout's included)."""
    if is_layered(network):
        groups = [i.post - 1 for i in network.interactions for _ in i.param_names]
        return groups + [network.num_layers] * len(network.cost.params)
    return [k for k in range(network.num_layers) for _ in range(2)]


def num_rates(network) -> int:
    return max(rate_groups(network)) + 1


def make_optimizer(network: Network, config: TrainConfig):
    layer_rates = config.layer_rates(num_rates(network))
    rates = [layer_rates[group] for group in rate_groups(network)]
    params = parameters(network)
    if config.optimizer == "sgd":
        return SGD(params, rates, config.momentum, config.weight_decay)
    return Adam(params, rates, weight_decay=config.weight_decay)


def schedule_scale(config: TrainConfig, epoch: int) -> float:
    """Learning-rate multiplier of an epoch (0-based): 1, or cosine annealing 1/2 (1 + cos(pi epoch / epochs))."""
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / config.epochs))
    return 1.0


# ------------------------------------------------------------------------------------------------ data checks
def check_data(network: Network, x, labels, num_classes: int, what: str) -> None:
    """Clear errors before any work: sizes that do not fit the network, labels out of range, NaN inputs."""
    x = np.asarray(x)
    labels = np.asarray(labels)
    if is_layered(network):
        if x.shape[1:] != network.input_shape:
            raise ValueError(f"the network's input layer has shape {network.input_shape} but the {what} inputs have "
                             f"shape {x.shape}: give (N, {', '.join(map(str, network.input_shape))}) images "
                             f"(Dataset.images() reshapes flattened ones)")
        sizes = (int(np.prod(network.input_shape)), network.num_classes)
    else:
        sizes = network.layer_sizes
        if x.ndim != 2 or x.shape[1] != sizes[0]:
            raise ValueError(f"the network's input layer has {sizes[0]} units but the {what} inputs have shape "
                             f"{x.shape}: layer sizes {'-'.join(map(str, sizes))} do not fit this dataset")
    if sizes[-1] != num_classes:
        raise ValueError(f"the network's output layer has {sizes[-1]} units but the dataset has {num_classes} "
                         f"classes: layer sizes {'-'.join(map(str, sizes))} do not fit this dataset")
    if labels.shape != (x.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{what} labels must be integers of shape ({x.shape[0]},), got {labels.dtype} "
                         f"{labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{what} labels must lie in [0, {num_classes}) (the output layer's {sizes[-1]} units), "
                         f"found {labels.min()}..{labels.max()}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what} inputs hold NaN or inf")


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate(network: Network, x, labels, config: TrainConfig, world=None) -> dict:
    """Free phase on (x, labels) in batches: accuracy, mean loss, mean steps, largest residual. world (an
    ``ebm_sim.distributed.World`` or None): each rank relaxes its contiguous share of the samples and the sums are
    reduced, so every rank returns the same figures."""
    from .distributed import single

    n = x.shape[0]
    if not single(world):
        mine = world.share(n)
        x, labels = x[mine], labels[mine]
    num_classes = num_outputs(network)
    correct, loss, steps, residual = 0, 0.0, 0.0, 0.0
    for start in range(0, x.shape[0], config.eval_batch_size):
        xb, yb = x[start:start + config.eval_batch_size], labels[start:start + config.eval_batch_size]
        if is_layered(network):
            states, batch_steps, batch_residual = layered_relax(network, xb, config, config.free_steps)
        else:
            result = relax(network, xb, method=config.method, tol=config.tol, max_steps=config.free_steps,
                           dt=config.dt)
            states, batch_steps, batch_residual = result.states, result.steps, result.residual
        correct += int(np.sum(predictions(network, states) == yb))
        loss += float(np.sum(batch_loss(network, states, one_hot(yb, num_classes, network.dtype))))
        steps += float(np.sum(batch_steps))
        residual = max(residual, float(batch_residual.max()))
    if not single(world):
        correct, loss, steps = world.sum([correct, loss, steps])
        residual = float(world.max([residual])[0])
    return {"accuracy": int(correct) / n, "loss": loss / n, "steps_mean": steps / n, "residual_max": residual}


# ------------------------------------------------------------------------------------------------ training
HISTORY_KEYS = ("epoch", "lr_scale", "loss", "train_acc", "test_acc", "test_loss", "free_steps_mean",
                "free_residual_max", "nudged_steps_mean", "seconds")


@dataclass
class TrainState:
    """Everything a resumed run needs besides the network: the next epoch, optimizer state and history."""

    epoch: int = 0
    history: dict = field(default_factory=lambda: {key: [] for key in HISTORY_KEYS})
    saved: int = 0  # epochs the checkpoint file holds (for the messages of an interrupted run)


def batch_order(config: TrainConfig, epoch: int, num_samples: int) -> np.ndarray:
    """The seeded permutation of an epoch: depends only on (seed, epoch), so a resumed run sees the same one."""
    return np.random.default_rng([config.seed, epoch]).permutation(num_samples)


def nudge_sign(config: TrainConfig, epoch: int, batch: int) -> float:
    if config.nudging != "random":
        return 1.0
    return 1.0 if np.random.default_rng([config.seed, epoch, batch, 1]).random() < 0.5 else -1.0


def train_epoch(network: Network, optimizer, x, labels, config: TrainConfig, epoch: int, progress=None,
                world=None) -> dict:
    """One epoch of EP over (x, labels); updates ``network`` in place. Returns the epoch's training statistics.

    world: an ``ebm_sim.distributed.World`` of several processes, or None (one process). Every rank then computes
    the EP estimate of its contiguous slice of each global minibatch (``World.share``) and the estimates are averaged
    weighted by the slices' rows (one all_reduce per minibatch, ``World.average``): every rank applies the same
    update; the statistics are summed over the ranks once, at the end of the epoch."""
    from .distributed import single

    num_classes = num_outputs(network)
    params = parameters(network)
    scale = schedule_scale(config, epoch)
    order = batch_order(config, epoch, x.shape[0])
    correct, loss, free_steps, nudged_steps, residual, batches, seen = 0, 0.0, 0.0, 0.0, 0.0, 0, 0
    for index, start in enumerate(range(0, x.shape[0], config.batch_size)):
        rows = order[start:start + config.batch_size]
        if single(world):
            xb, yb = augment(config, x[rows], epoch, index), labels[rows]
        else:  # this rank's slice of the global minibatch (augmented as a whole: its draws are per batch)
            mine = world.share(len(rows))
            xb = x[rows[mine]] if config.augment == "none" else augment(config, x[rows], epoch, index)[mine]
            yb = labels[rows[mine]]
        target = one_hot(yb, num_classes, network.dtype)
        if single(world):
            step = ep_gradient(network, xb, target, config, nudge_sign(config, epoch, index))
            gradient = step.gradient
        else:
            try:
                step = ep_gradient(network, xb, target, config, nudge_sign(config, epoch, index)) if len(yb) else None
            except Exception:
                world.average(None, 0.0, like=params, failed=True)  # the other ranks stop instead of waiting
                raise
            gradient, _ = world.average(None if step is None else step.gradient, len(yb) / len(rows), like=params)
        optimizer.step(params, gradient, scale)
        batches += 1
        if step is not None:  # None: this rank's slice of a short last minibatch is empty
            correct += int(np.sum(predictions(network, step.free_states) == yb))
            loss += float(np.sum(batch_loss(network, step.free_states, target)))
            free_steps += float(np.sum(step.free_steps))
            nudged_steps += step.nudged_steps * len(yb)
            residual = max(residual, float(step.free_residual.max()))
            seen += len(yb)
        if progress is not None:
            progress.update(len(rows))
            progress.set_postfix(loss=f"{loss / max(seen, 1):.4f}", acc=f"{correct / max(seen, 1):.3f}",
                                 refresh=False)
    if not single(world):
        correct, loss, free_steps, nudged_steps = world.sum([correct, loss, free_steps, nudged_steps])
        residual = float(world.max([residual])[0])
    n = x.shape[0]
    return {"loss": loss / n, "train_acc": correct / n, "free_steps_mean": free_steps / n,
            "free_residual_max": residual, "nudged_steps_mean": nudged_steps / n, "lr_scale": scale}


def data_fingerprint(x, labels) -> str:
    """SHA-256 of the training data (exact bytes): a resumed run must see the same data."""
    import hashlib
    digest = hashlib.sha256()
    for array in (np.ascontiguousarray(x), np.ascontiguousarray(labels)):
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def fit(network: Network, x_train, y_train, x_test, y_test, config: TrainConfig, checkpoint_path=None,
        resume: bool = False, progress: bool = True, log=print, extra_attrs: dict | None = None,
        num_classes: int | None = None, world=None) -> Network:
    """Train ``network`` in place with EP and return it; its ``history`` holds one entry per epoch of every key of
    HISTORY_KEYS (loss, train and test accuracy, mean free-phase steps, largest residual, seconds per epoch...).

    checkpoint_path: the network's HDF5 file, rewritten atomically after every epoch with the weights, the history
    and a checkpoint (next epoch, optimizer state, configuration, data fingerprint); its ``extra`` attributes hold
    ``extra_attrs``, the training configuration (``config``) and how the network is deployed (``deployment``: the
    free phase's method, dt, tol and step cap, an ``ebm_sim.deployment.Deployment``). resume=True continues from that
    file (same configuration and data required) and ends with exactly the weights of an uninterrupted run.
    num_classes: the dataset's (default: the network's output size); the output layer must have that many units and
    every label must lie in [0, num_classes).
    All inputs are checked, and the checkpoint file claimed (``ebm_sim.outputs``: one writer, writable, room for a
    checkpoint), before any work.
    world: None (one process) or an ``ebm_sim.distributed.World``: data-parallel EP over its processes (every rank
    calls fit with the same arguments and data; see ``train_epoch``), ending with the weights of one process trained
    on the same global minibatches up to float rounding; rank 0 alone logs, shows progress and writes the checkpoint
    file, and every rank reads it on resume.
    """
    from .distributed import log_on_main, single

    if not single(world):
        if config.batch_size < world.size:
            raise ValueError(f"a minibatch of {config.batch_size} samples cannot give each of {world.size} processes "
                             f"a slice: use a batch size of at least {world.size} or fewer processes")
        log, progress = log_on_main(world, log), progress and world.is_main
    if num_classes is None:
        num_classes = num_outputs(network)
    check_data(network, x_train, y_train, num_classes, "training")
    check_data(network, x_test, y_test, num_classes, "test")
    config.layer_rates(num_rates(network))  # per-layer rates must match the depth
    if config.augment != "none" and np.asarray(x_train).ndim != 4:
        raise ValueError(f"augment {config.augment!r} crops and flips (N, C, H, W) images; the training inputs have "
                         f"shape {np.asarray(x_train).shape}")
    check_cost(network, config.cost)
    integrators.get(config.method, "layered" if is_layered(network) else "dense", config.backend,
                    f"a {'layered' if is_layered(network) else 'dense'} network trained on the {config.backend} backend")
    if resume and checkpoint_path is None:
        raise ValueError("resume needs the checkpoint file (the network file written by a previous run)")
    if checkpoint_path is None:
        return _fit(network, x_train, y_train, x_test, y_test, config, None, resume, progress, log, extra_attrs,
                    world)
    from contextlib import ExitStack

    from .outputs import check_output, exclusive, require_space

    if not single(world) and not world.is_main:  # rank 0 claims and writes the file
        world.agree(True, "claiming the checkpoint file")
        return _fit(network, x_train, y_train, x_test, y_test, config, checkpoint_path, resume, progress, log,
                    extra_attrs, world)
    with ExitStack() as claimed:  # one writer; writable, with room for a checkpoint, before the first epoch
        try:
            claimed.enter_context(exclusive(checkpoint_path) if single(world) else world.output_lock(checkpoint_path))
            check_output(checkpoint_path, overwrite=True)
            require_space(checkpoint_path, checkpoint_bytes(network, config))
        except Exception:
            if not single(world):
                world.agree(False, "claiming the checkpoint file")
            raise
        if not single(world):
            world.agree(True, "claiming the checkpoint file")
        return _fit(network, x_train, y_train, x_test, y_test, config, checkpoint_path, resume, progress, log,
                    extra_attrs, world)


def _fit(network, x_train, y_train, x_test, y_test, config, checkpoint_path, resume, progress, log, extra_attrs,
         world=None):
    """``fit`` once its inputs and output are checked."""
    x_train = np.ascontiguousarray(x_train, dtype=network.dtype)
    x_test = np.ascontiguousarray(x_test, dtype=network.dtype)
    fingerprint = data_fingerprint(x_train, y_train)
    settings = {"config": config.as_dict(), "data": fingerprint}
    optimizer = make_optimizer(network, config)
    state = TrainState()
    if resume:
        network, state = _resume(checkpoint_path, network, optimizer, settings, log)
    if state.epoch >= config.epochs:
        log(f"nothing to do: {checkpoint_path} already holds {state.epoch} of {config.epochs} epochs")
        return network
    with _checkpoint_notes(checkpoint_path, state, config, log):
        _fit_epochs(network, optimizer, x_train, y_train, x_test, y_test, config, state, settings, checkpoint_path,
                    progress, log, extra_attrs, world)
    return network


def checkpoint_bytes(network: Network, config: TrainConfig) -> int:
    """About the room one checkpoint file needs: the parameters, the optimizer's float64 state (Adam: two moments,
    SGD: one velocity), a history of ``config.epochs`` entries and HDF5's headers (as ``storage`` counts them)."""
    from .storage import HDF5_OBJECT_BYTES

    arrays = parameters(network)
    moments = 2 if config.optimizer == "adam" else 1
    datasets = len(arrays) * (1 + moments) + len(HISTORY_KEYS) + 4  # + epoch, settings, step count, root
    return (sum(p.size for p in arrays) * (network.dtype.itemsize + 8 * moments)
            + 8 * len(HISTORY_KEYS) * config.epochs + HDF5_OBJECT_BYTES * datasets)


@contextmanager
def _checkpoint_notes(path, state: "TrainState", config: TrainConfig, log):
    """Say what the checkpoint file holds, and how to go on, when training stops on Ctrl-C or a full disk."""
    from .outputs import DiskFullError

    def saved() -> str:
        if path is None:
            return "nothing is saved (no checkpoint file)"
        if state.saved == 0:
            return f"no epoch was saved in {path}"
        return (f"{path} holds the first {state.saved} of {config.epochs} epochs; run the same command with --resume "
                f"to continue")

    try:
        yield
    except KeyboardInterrupt:
        log(f"interrupted in epoch {state.saved + 1}: {saved()}")
        raise
    except DiskFullError as error:
        raise DiskFullError(error.errno, f"{error.strerror}; {saved()}") from None
    except FloatingPointError as error:
        raise FloatingPointError(f"{error}; {saved()}") from None


def _fit_epochs(network, optimizer, x_train, y_train, x_test, y_test, config, state, settings, checkpoint_path,
                progress, log, extra_attrs, world=None) -> None:
    """The epochs of ``fit`` from ``state.epoch`` on, checkpointing after each (see ``fit``; with several processes
    rank 0 writes the checkpoint and every rank waits for it)."""
    from tqdm import tqdm

    from . import storage
    from .distributed import single
    from .outputs import interrupts_deferred

    for epoch in range(state.epoch, config.epochs):
        start = time.perf_counter()
        with tqdm(total=x_train.shape[0], desc=f"epoch {epoch + 1}/{config.epochs}", unit="sample",
                  disable=not progress, leave=False, dynamic_ncols=True) as bar:
            stats = train_epoch(network, optimizer, x_train, y_train, config, epoch, bar, world)
        test = evaluate(network, x_test, y_test, config, world)
        stats.update(epoch=epoch + 1, test_acc=test["accuracy"], test_loss=test["loss"],
                     seconds=time.perf_counter() - start)
        if not np.all([np.all(np.isfinite(p)) for p in parameters(network)]):
            raise FloatingPointError(f"training diverged in epoch {epoch + 1}: the parameters hold NaN or inf; "
                                     f"lower the learning rate or beta")
        for key in HISTORY_KEYS:
            state.history[key].append(float(stats[key]))
        network.history = {key: list(values) for key, values in state.history.items()}
        log(f"epoch {epoch + 1}/{config.epochs}: loss {stats['loss']:.4f}, train {100 * stats['train_acc']:.2f}%, "
            f"test {100 * stats['test_acc']:.2f}%, free steps {stats['free_steps_mean']:.1f}, "
            f"{stats['seconds']:.1f} s")
        if checkpoint_path is not None:
            checkpoint = {"epoch": np.int64(epoch + 1), "settings": _json(settings),
                          "optimizer": optimizer.state()}
            # the training configuration travels with the network: it defines the deployed relaxation (free phase)
            extra = {"config": config.as_dict(), "deployment": Deployment.of_train_config(config).as_dict(),
                     **(extra_attrs or {})}
            if single(world):
                with interrupts_deferred():  # Ctrl-C after the checkpoint is written and counted
                    storage.save_network(checkpoint_path, network, extra_attrs=extra, checkpoint=checkpoint)
                    state.saved = epoch + 1
                continue
            try:
                if world.is_main:
                    with interrupts_deferred():
                        storage.save_network(checkpoint_path, network, extra_attrs=extra, checkpoint=checkpoint)
            except Exception:
                world.agree(False, f"writing the checkpoint of epoch {epoch + 1}")
                raise
            world.agree(True, f"writing the checkpoint of epoch {epoch + 1}")  # written before any rank goes on
            state.saved = epoch + 1


def architecture(network) -> str:
    """The architecture in words (layer sizes or shapes and interactions), for comparisons and messages."""
    if is_layered(network):
        return _json(network.describe())
    return str(network.layer_sizes)


def _json(value) -> str:
    import json
    return json.dumps(value, sort_keys=True)


def _resume(path, network: Network, optimizer, settings: dict, log):
    """Load the network and training state saved at ``path``; refuse a file made by another configuration/data."""
    import json

    from . import storage

    stored_network = storage.load_network(path)
    checkpoint = storage.load_checkpoint(path)
    if checkpoint is None:
        raise ValueError(f"{path} holds a network but no training checkpoint: nothing to resume")
    stored = json.loads(str(checkpoint["settings"]))
    if stored["data"] != settings["data"]:
        raise ValueError(f"cannot resume from {path}: it was trained on other data (fingerprints "
                         f"{stored['data'][:12]} vs {settings['data'][:12]})")
    # with a constant schedule more epochs extend the run exactly; a cosine schedule depends on the epoch count
    # (backend and device may change: the same equations, up to float rounding)
    free_keys = {"backend", "device"} | ({"epochs"} if settings["config"]["schedule"] == "constant" else set())
    differing = sorted(key for key in settings["config"]
                       if key not in free_keys and stored["config"].get(key) != settings["config"][key])
    if differing:
        details = ", ".join(f"{key}: {stored['config'].get(key)!r} -> {settings['config'][key]!r}"
                            for key in differing)
        raise ValueError(f"cannot resume from {path}: the training configuration differs ({details})")
    if architecture(stored_network) != architecture(network):
        raise ValueError(f"cannot resume from {path}: it holds a {architecture(stored_network)} network, "
                         f"not {architecture(network)}")
    # the optimizer was built for ``network``'s arrays: copy the stored parameters into them
    for mine, theirs in zip(parameters(network), parameters(stored_network)):
        mine[...] = theirs
    optimizer.load(checkpoint["optimizer"])
    state = TrainState(epoch=int(checkpoint["epoch"]), saved=int(checkpoint["epoch"]),
                       history={key: list(stored_network.history.get(key, [])) for key in HISTORY_KEYS})
    network.history = dict(stored_network.history)
    log(f"resuming from {path} after epoch {state.epoch}")
    return network, state

"""Equilibrium-propagation training in eager torch on CPU, written the way the reference EP code does it.

    python benchmarks/torch_ep_reference.py --dataset fashion-mnist --layers 784,512,10 --epochs 1 --limit 6000

This is the speed baseline our Numba trainer is compared against ("seconds per epoch, same network, same steps").
It follows ``P_MLP`` of Laborieux et al. 2021 (github.com/Laborieux-Axel/Equilibrium-Propagation):

- the dynamics are computed by autograd on the primitive function Phi at every step::

      phi = Phi(x, neurons, beta, target)
      grads = torch.autograd.grad(phi.sum(), neurons)
      neurons = [rho(g).requires_grad_() for g in grads]

  (synchronous fixed-point iteration s <- rho(dPhi/ds), all layers from the old states: the same update as
  ``ebm_sim.relax.relax(method="fixed_point")``), with a fixed number of steps and no tolerance check;
- free phase: T1 steps from zeros -> s0; symmetric nudging: T2 steps with +beta from s0 -> s+, and T2 steps with
  -beta from s0 -> s-;
- the parameter gradient by autograd on Phi as well (``compute_syn_grads`` of the reference)::

      delta_phi = (Phi(s-).sum() / B - Phi(s+).sum() / B) / (beta - (-beta));  delta_phi.backward()

  so that ``.grad`` is the EP estimate of the loss gradient, ready for an optimizer that minimizes:
      grad W_k     = -(1 / (2 beta)) mean_batch(s+_{k+1} s+_k^T - s-_{k+1} s-_k^T)      (s_0 = x)
      grad b_{k+1} = -(1 / (2 beta)) mean_batch(s+_{k+1} - s-_{k+1})
- then ``optimizer.step()`` (Adam, or SGD with momentum; per-layer learning rates through parameter groups).

Model (see ebm_sim/energy.py): states s_1..s_L in [0, 1], rho(u) = clip(a u, 0, 1) with a = network.slope,
    Phi(x, s) = sum_k s_{k+1}^T (W_k s_k + b_{k+1}) - beta / 2 ||s_L - y||^2        (per sample; y one-hot)

API
    TorchEPNet.from_network(network) / module.to_network()
    train_epoch(network_or_module, x, y, *, batch_size=50, beta=0.5, T1=30, T2=10, lr=5e-4, optimizer="adam",
                seed=0, epoch=0, threads=None, momentum=0.9, weight_decay=0.0) -> dict(seconds, loss, train_acc)
    evaluate(module, x, y, T1) -> accuracy
    free_phase / nudged_phase / ep_gradients: the pieces, for tests

The CLI prints one JSON object on its last line (seconds per epoch measured, and scaled to 60,000 images).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ebm_sim.network import ACTIVATIONS, Network  # noqa: E402

_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


# --------------------------------------------------------------------------------------------- the module
class TorchEPNet(nn.Module):
    """A layered Hopfield network as ``nn.Linear`` synapses (weight W_k (n_{k+1}, n_k), bias b_{k+1})."""

    def __init__(self, layer_sizes, activation: str = "hard_sigmoid", dtype=torch.float32):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
        self.layer_sizes = tuple(int(n) for n in layer_sizes)
        self.activation = activation
        self.slope = ACTIVATIONS[activation]
        self.synapses = nn.ModuleList(nn.Linear(n_in, n_out, bias=True, dtype=dtype)
                                      for n_in, n_out in zip(self.layer_sizes[:-1], self.layer_sizes[1:]))
        self.optimizer = None          # created by train_epoch, kept across epochs
        self._optimizer_key = None

    @property
    def dtype(self) -> torch.dtype:
        return self.synapses[0].weight.dtype

    @classmethod
    def from_network(cls, network: Network) -> "TorchEPNet":
        if getattr(network, "readout", False):
            raise ValueError("the torch EP reference implements the MSE cost on the output state only; "
                             "a network with a softmax readout (readout=True) is not supported")
        module = cls(network.layer_sizes, network.activation, _TORCH_DTYPES[np.dtype(network.dtype)])
        with torch.no_grad():
            for syn, w, b in zip(module.synapses, network.weights, network.biases):
                syn.weight.copy_(torch.from_numpy(np.asarray(w)))
                syn.bias.copy_(torch.from_numpy(np.asarray(b)))
        return module

    def to_network(self) -> Network:
        weights = [syn.weight.detach().cpu().numpy().copy() for syn in self.synapses]
        biases = [syn.bias.detach().cpu().numpy().copy() for syn in self.synapses]
        return Network(weights, biases, self.activation)

    def rho(self, u: torch.Tensor) -> torch.Tensor:
        return (self.slope * u).clamp(0.0, 1.0) if self.slope != 1.0 else u.clamp(0.0, 1.0)

    def init_neurons(self, batch: int) -> list:
        return [torch.zeros(batch, n, dtype=self.dtype, requires_grad=True) for n in self.layer_sizes[1:]]

    def Phi(self, x, neurons, beta: float = 0.0, target=None) -> torch.Tensor:
        """Primitive function per sample, shape (B,): sum_k s_{k+1} . (W_k s_k + b_{k+1}) - beta/2 ||s_L - y||^2."""
        layers = [x] + list(neurons)
        phi = 0.0
        for k, syn in enumerate(self.synapses):
            phi = phi + torch.sum(syn(layers[k]) * layers[k + 1], dim=1)
        if beta != 0.0:
            phi = phi - beta * 0.5 * torch.sum((layers[-1] - target) ** 2, dim=1)
        return phi

    def forward(self, x, neurons, T: int, beta: float = 0.0, target=None) -> list:
        """T synchronous steps s <- rho(dPhi/ds), dPhi/ds by autograd (no tolerance check)."""
        for _ in range(T):
            phi = self.Phi(x, neurons, beta, target)
            grads = torch.autograd.grad(phi.sum(), neurons)
            neurons = [self.rho(g).requires_grad_() for g in grads]
        return neurons


def _copy(neurons) -> list:
    """The reference's ``copy``: fresh leaves holding the same values."""
    return [n.detach().clone().requires_grad_() for n in neurons]


def free_phase(module: TorchEPNet, x, T1: int) -> list:
    return module(x, module.init_neurons(x.shape[0]), T1)


def nudged_phase(module: TorchEPNet, x, free_states, target, T2: int, beta: float) -> list:
    return module(x, _copy(free_states), T2, beta, target)


def ep_gradients(module: TorchEPNet, x, s_plus, s_minus, target, beta: float) -> None:
    """Set ``.grad`` of every parameter to the symmetric EP estimate of the loss gradient (reference's
    ``compute_syn_grads`` with betas (beta, -beta)): delta_phi = (Phi(s-) - Phi(s+)) / (2 beta) / B, backward."""
    module.zero_grad(set_to_none=False)
    batch = x.shape[0]
    phi_1 = module.Phi(x, [s.detach() for s in s_plus], beta, target).sum() / batch
    phi_2 = module.Phi(x, [s.detach() for s in s_minus], -beta, target).sum() / batch
    delta_phi = (phi_2 - phi_1) / (beta - (-beta))
    delta_phi.backward()


# --------------------------------------------------------------------------------------------- training
def _param_groups(module: TorchEPNet, lr):
    lrs = list(lr) if isinstance(lr, (list, tuple)) else [float(lr)] * len(module.synapses)
    if len(lrs) != len(module.synapses):
        raise ValueError(f"{len(lrs)} learning rates for {len(module.synapses)} layers")
    return [{"params": list(syn.parameters()), "lr": float(r)} for syn, r in zip(module.synapses, lrs)]


def make_optimizer(module: TorchEPNet, optimizer: str = "adam", lr=5e-4, momentum: float = 0.9,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Adam or SGD (with momentum); ``lr`` a float or one per layer (parameter groups)."""
    groups = _param_groups(module, lr)
    if optimizer == "adam":
        return torch.optim.Adam(groups, weight_decay=weight_decay)
    if optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")


def _as_tensor(a, dtype) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype)


def train_epoch(network, x, y, *, batch_size: int = 50, beta: float = 0.5, T1: int = 30, T2: int = 10, lr=5e-4,
                optimizer: str = "adam", seed: int = 0, epoch: int = 0, threads: int | None = None,
                momentum: float = 0.9, weight_decay: float = 0.0) -> dict:
    """One epoch of symmetric EP over (x (N, n_0) in [0, 1], y (N,) int labels).

    ``network``: a TorchEPNet (trained in place; its optimizer, created on the first call, keeps its state across
    epochs as long as the optimizer settings do not change) or an ``ebm_sim.network.Network`` (converted, trained,
    and its weights and biases overwritten in place; the optimizer state is then not kept between calls).
    Minibatches: ``np.random.default_rng(seed + epoch).permutation(N)`` cut in chunks of ``batch_size`` (the last
    may be smaller). Returns dict(seconds: wall time of the epoch's loop, loss: mean 1/2 ||s_L - y||^2 at the free
    state, train_acc: accuracy of argmax s_L at the free state, during training).
    """
    if beta == 0.0:
        raise ValueError("beta must be non-zero for EP")
    if threads is not None:
        torch.set_num_threads(int(threads))
    is_network = isinstance(network, Network)
    module = TorchEPNet.from_network(network) if is_network else network
    key = (optimizer, tuple(lr) if isinstance(lr, (list, tuple)) else float(lr), momentum, weight_decay)
    if module.optimizer is None or module._optimizer_key != key:
        module.optimizer = make_optimizer(module, optimizer, lr, momentum, weight_decay)
        module._optimizer_key = key
    opt = module.optimizer
    dtype = module.dtype
    n_out = module.layer_sizes[-1]
    x_all = _as_tensor(np.asarray(x).reshape(len(x), -1), dtype)
    y_all = torch.as_tensor(np.asarray(y), dtype=torch.long)
    order = torch.from_numpy(np.random.default_rng(seed + epoch).permutation(len(x_all)))
    module.train()
    total_loss, correct = 0.0, 0
    start = time.perf_counter()
    for first in range(0, len(x_all), batch_size):
        idx = order[first:first + batch_size]
        xb, yb = x_all[idx], y_all[idx]
        target = torch.nn.functional.one_hot(yb, n_out).to(dtype)
        s0 = free_phase(module, xb, T1)
        with torch.no_grad():
            out = s0[-1]
            total_loss += float(0.5 * ((out - target) ** 2).sum())
            correct += int((out.argmax(dim=1) == yb).sum())
        s_plus = nudged_phase(module, xb, s0, target, T2, beta)
        s_minus = nudged_phase(module, xb, s0, target, T2, -beta)
        ep_gradients(module, xb, s_plus, s_minus, target, beta)
        opt.step()
    seconds = time.perf_counter() - start
    if is_network:
        trained = module.to_network()
        for k in range(network.num_layers):
            network.weights[k][...] = trained.weights[k]
            network.biases[k][...] = trained.biases[k]
    n = max(len(x_all), 1)
    return {"seconds": seconds, "loss": total_loss / n, "train_acc": correct / n}


def evaluate(module, x, y, T1: int = 30, batch_size: int = 1000) -> float:
    """Accuracy of argmax s_L after a free phase of T1 steps (autograd dynamics, as in training)."""
    if isinstance(module, Network):
        module = TorchEPNet.from_network(module)
    module.eval()
    x_all = _as_tensor(np.asarray(x).reshape(len(x), -1), module.dtype)
    y_all = torch.as_tensor(np.asarray(y), dtype=torch.long)
    correct = 0
    for first in range(0, len(x_all), batch_size):
        xb = x_all[first:first + batch_size]
        out = free_phase(module, xb, T1)[-1]
        correct += int((out.detach().argmax(dim=1) == y_all[first:first + batch_size]).sum())
    return correct / max(len(x_all), 1)


# --------------------------------------------------------------------------------------------- CLI
def _floats(text: str):
    values = [float(v) for v in text.split(",")]
    return values[0] if len(values) == 1 else values


def main(argv=None) -> dict:
    from ebm_sim.datasets import load_dataset

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--layers", default="784,512,10", help="comma-separated layer sizes, input first")
    p.add_argument("--activation", default="hard_sigmoid", choices=sorted(ACTIVATIONS))
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--limit", type=int, default=None, help="train on a seeded stratified subsample of N images")
    p.add_argument("--limit-test", type=int, default=None, help="evaluate on N test images (default: all)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--T1", type=int, default=30)
    p.add_argument("--T2", type=int, default=10)
    p.add_argument("--lr", type=_floats, default=5e-4, help="one value, or one per layer (comma-separated)")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)

    layers = tuple(int(n) for n in args.layers.split(","))
    ds = load_dataset(args.dataset, data_dir=args.data_dir, limit_train=args.limit, limit_test=args.limit_test,
                      seed=args.seed)
    if ds.x_train.shape[1] != layers[0]:
        p.error(f"--layers starts with {layers[0]} but {ds.name} images have {ds.x_train.shape[1]} pixels")
    network = Network.init(layers, seed=args.seed, dtype=np.dtype(args.dtype), activation=args.activation)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    module = TorchEPNet.from_network(network)
    history = []
    for epoch in range(args.epochs):
        stats = train_epoch(module, ds.x_train, ds.y_train, batch_size=args.batch_size, beta=args.beta, T1=args.T1,
                            T2=args.T2, lr=args.lr, optimizer=args.optimizer, seed=args.seed, epoch=epoch,
                            momentum=args.momentum, weight_decay=args.weight_decay)
        t0 = time.perf_counter()
        stats["test_acc"] = evaluate(module, ds.x_test, ds.y_test, args.T1)
        stats["eval_seconds"] = time.perf_counter() - t0
        history.append(stats)
        print(f"epoch {epoch + 1}: {stats['seconds']:.2f} s train ({len(ds.x_train)} images), "
              f"loss {stats['loss']:.4f}, train acc {stats['train_acc']:.4f}, test acc {stats['test_acc']:.4f}",
              file=sys.stderr, flush=True)
    n_train = len(ds.x_train)
    mean_seconds = float(np.mean([h["seconds"] for h in history]))
    result = {
        "implementation": "torch eager CPU, autograd on Phi every step (Laborieux et al. 2021 P_MLP style)",
        "dataset": ds.name, "layers": list(layers), "activation": args.activation, "dtype": args.dtype,
        "n_train": n_train, "n_test": len(ds.x_test), "epochs": args.epochs,
        "batch_size": args.batch_size, "beta": args.beta, "T1": args.T1, "T2": args.T2, "lr": args.lr,
        "optimizer": args.optimizer, "seed": args.seed,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "seconds_per_epoch": mean_seconds,
        "seconds_per_60000": mean_seconds * 60000 / max(n_train, 1),
        "seconds_per_epoch_each": [h["seconds"] for h in history],
        "train_acc": [h["train_acc"] for h in history],
        "loss": [h["loss"] for h in history],
        "test_acc": [h["test_acc"] for h in history],
        "final_test_acc": history[-1]["test_acc"] if history else None,
    }
    line = json.dumps(result)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(line + "\n")
    print(line)
    return result


if __name__ == "__main__":
    main()

"""Baselines with the EBM's architecture (``distill.models.FeedForward`` for dense layer sizes,
``distill.models.LayeredFeedForward`` -- same convolutions, pooling, normalization and readout -- for a layered
``ebm_sim.model.LayeredNetwork``): standard backprop and PGD adversarial training (Madry et al. 2018), and the
L-infinity PGD attack they use.

standard: minimize CE(f(x), y) on the training set.
pgd-at:   minimize CE(f(x + delta*), y), delta* = PGD's approximate maximizer of CE(f(x + delta), y) over
          ||delta||_inf <= eps with x + delta in [0, 1] (every training example replaced by its adversarial one).

PGD (Linf, Madry et al. 2018): x_0 = clip(x + U(-eps, eps), 0, 1) with a random start (else x), then ``steps`` times
    x_{t+1} = clip(clip(x_t + step_size * sign(grad_x CE(f(x_t), y)), x - eps, x + eps), 0, 1).
Budgets are in pixel space (inputs in [0, 1]). The default eps 0.1, 10 steps of 0.025 (2.5 eps / steps) suit
(Fashion-)MNIST; CIFAR uses 8/255 with Madry et al.'s 7 steps of 2/255 (``BaselineConfig.for_dataset("cifar10")``,
the presets of ``distill.config.PGD_PRESETS``).
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch
import torch.nn.functional as F

from .config import BaselineConfig
from .fitting import fingerprint, fit_model, split_indices
from .models import FeedForward, LayeredFeedForward

# ---------------------------------------------------------------------------------------------- attack
def pgd_attack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 10,
               step_size: float | None = None, random_start: bool = True,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Untargeted L-infinity PGD on the cross-entropy (see the module docstring). x (B, ...) in [0, 1], y (B,)
    int64; returns x_adv (same shape and dtype, detached) with ||x_adv - x||_inf <= eps and x_adv in [0, 1].
    step_size defaults to 2.5 eps / steps. Only input gradients are computed (parameters' .grad is untouched)."""
    if not (isinstance(eps, numbers.Real) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if not (isinstance(steps, numbers.Integral) and steps >= 0):
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    step_size = 2.5 * eps / max(steps, 1) if step_size is None else step_size
    if not (isinstance(step_size, numbers.Real) and math.isfinite(step_size) and step_size >= 0):
        raise ValueError(f"step_size must be a finite number >= 0, got {step_size!r}")
    x = x.detach()
    if eps == 0:
        return x.clone()
    low, high = torch.clamp(x - eps, min=0.0), torch.clamp(x + eps, max=1.0)
    if random_start:
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        x_adv = torch.clamp(x + (2 * noise - 1) * eps, 0.0, 1.0)
    else:
        x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(x_adv), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = torch.minimum(torch.maximum(x_adv.detach() + step_size * grad.sign(), low), high)
    return x_adv.detach()


def robust_accuracy(model: torch.nn.Module, x, y, eps: float, steps: int = 10, step_size: float | None = None,
                    random_start: bool = True, restarts: int = 1, seed: int = 0, batch_size: int = 1000) -> dict:
    """Accuracy under PGD (worst case over ``restarts`` random starts per example) and clean accuracy:
    {"clean_accuracy", "robust_accuracy", "eps", "steps", "step_size", "restarts", "n"}."""
    x = torch.as_tensor(np.asarray(x, dtype=np.float32)) if not isinstance(x, torch.Tensor) else x
    y = torch.as_tensor(np.asarray(y), dtype=torch.int64) if not isinstance(y, torch.Tensor) else y
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(int(seed))
    clean = robust = 0
    for begin in range(0, x.shape[0], batch_size):
        xb, yb = x[begin:begin + batch_size], y[begin:begin + batch_size]
        with torch.no_grad():
            correct = model(xb).argmax(1) == yb
        clean += int(correct.sum())
        for _ in range(max(1, restarts) if random_start else 1):
            adv = pgd_attack(model, xb, yb, eps, steps, step_size, random_start, generator)
            with torch.no_grad():
                correct &= model(adv).argmax(1) == yb
        robust += int(correct.sum())
    model.train(was_training)
    n = int(x.shape[0])
    return {"clean_accuracy": clean / n, "robust_accuracy": robust / n, "eps": float(eps), "steps": int(steps),
            "step_size": float(2.5 * eps / max(steps, 1) if step_size is None else step_size),
            "restarts": int(restarts), "n": n}


# ---------------------------------------------------------------------------------------------- training
def baseline_model(architecture, activation: str = "hard_sigmoid", readout: bool = False, seed: int = 0):
    """A freshly initialized (seeded) baseline: ``FeedForward(layer_sizes, activation, readout)`` for dense layer
    sizes, or ``LayeredFeedForward`` with a LayeredNetwork's architecture (its activation, normalization and readout;
    not its weights -- ``activation`` and ``readout`` must then be left at their defaults)."""
    if hasattr(architecture, "layer_shapes"):
        if activation != "hard_sigmoid" or readout:
            raise ValueError("activation and readout come from the LayeredNetwork: leave them at their defaults")
        return LayeredFeedForward.from_network(architecture, seed=seed)
    sizes = tuple(int(n) for n in architecture)
    return FeedForward(sizes, activation, readout, seed=seed)


def training_tensors(model, x_train, y_train) -> tuple:
    """(x, y) tensors for ``model``: x float32 (N, *model.input_shape) in [0, 1] (a sample's values in any shape of the
    same size are reshaped), y int64 (N,) in [0, classes); ValueError naming the problem."""
    x = np.asarray(x_train)
    shape = tuple(model.input_shape)
    if x.ndim < 1 or int(np.prod(x.shape[1:])) != int(np.prod(shape)):
        shown = shape[0] if len(shape) == 1 else "x".join(map(str, shape))
        raise ValueError(f"the model takes {shown} inputs but the training data has shape {x.shape}")
    x = torch.from_numpy(np.ascontiguousarray(x.reshape((len(x),) + shape), dtype=np.float32))
    y = torch.from_numpy(np.asarray(y_train).astype(np.int64))
    if y.shape != (x.shape[0],):
        raise ValueError(f"{x.shape[0]} inputs but labels of shape {tuple(y.shape)}")
    classes = model.num_classes
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise ValueError(f"labels must lie in [0, {classes}) for {classes} output units, found "
                         f"{int(y.min())}..{int(y.max())}")
    if not torch.isfinite(x).all() or float(x.min()) < 0 or float(x.max()) > 1:
        raise ValueError("training inputs must be finite and lie in [0, 1]")
    return x, y


def train_baseline(layer_sizes, x_train, y_train, config: BaselineConfig | None = None, *,
                   activation: str = "hard_sigmoid", readout: bool = False, checkpoint_path=None,
                   resume: bool = False, progress: bool = True, log=print, dataset: str | None = None,
                   provenance: dict | None = None):
    """Train ``baseline_model(layer_sizes, activation, readout)`` -- a FeedForward for dense layer sizes, or a
    LayeredFeedForward when ``layer_sizes`` is a LayeredNetwork (its architecture, fresh weights) -- on
    (x_train (N, *input_shape) in [0, 1], y_train (N,)) by standard backprop or PGD adversarial training; return
    (model in eval mode, history).

    history: per epoch epoch, train_loss, val_loss, val_accuracy (clean), val_robust_accuracy (pgd-at: under the
    training PGD, fixed seed), lr, seconds; best_epoch. checkpoint_path: the model's ebm-feedforward file,
    rewritten atomically after every epoch; resume=True continues from it exactly.
    """
    config = config or BaselineConfig()
    model = baseline_model(layer_sizes, activation, readout, seed=config.seed)
    x, y = training_tensors(model, x_train, y_train)
    train_rows, val_rows = split_indices(x.shape[0], config.val_fraction, config.seed)
    train_index, val_index = torch.from_numpy(train_rows), torch.from_numpy(val_rows)
    x_val, y_val = x[val_index], y[val_index]
    adversarial = config.kind == "pgd-at"
    if config.augment != "none" and x.dim() != 4:
        raise ValueError(f"augment={config.augment!r} crops and flips images: it needs a convolutional model of "
                         f"(C, H, W) inputs, not {tuple(x.shape[1:])}")
    if config.augment == "crop_flip":
        from ebm_sim.training import crop_flip

    def batch_loss(rows, generator):
        index = train_index[torch.from_numpy(rows)]
        xb, yb = x[index], y[index]
        if config.augment == "crop_flip":  # seeded by the epoch's generator: reproducible and resumable
            seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
            xb = torch.from_numpy(crop_flip(xb.numpy(), np.random.default_rng(seed)))
        if adversarial:
            model.eval()
            xb = pgd_attack(model, xb, yb, config.eps, config.pgd_steps, config.step_size, config.random_start,
                            generator)
            model.train()
        return F.cross_entropy(model(xb), yb)

    def validate():
        if len(val_rows) == 0:
            return {"loss": math.nan}
        logits = model(x_val)
        stats = {"accuracy": float((logits.argmax(1) == y_val).float().mean())}
        if adversarial:
            generator = torch.Generator().manual_seed(int(config.seed))
            adv = pgd_attack(model, x_val, y_val, config.eps, config.pgd_steps, config.step_size,
                             config.random_start, generator)
            logits = model(adv)
            stats["robust_accuracy"] = float((logits.argmax(1) == y_val).float().mean())
        return {"loss": float(F.cross_entropy(logits, y_val)), **stats}

    settings = {"config": config.as_dict(), **model.architecture, "data": fingerprint(x.numpy(), y.numpy())}
    info = {"num_train": int(len(train_rows)), "num_validation": int(len(val_rows)), **(provenance or {})}

    def save(path, trained, history, checkpoint, checkpoint_state):
        from .io import save_model
        save_model(path, trained, config.kind, config.as_dict(), dataset=dataset, provenance=info, history=history,
                   checkpoint=checkpoint, checkpoint_state=checkpoint_state)

    from .io import load_feedforward
    return fit_model(model, len(train_rows), batch_loss, validate, config, settings, save=save,
                     checkpoint_path=checkpoint_path, resume=resume, progress=progress, log=log,
                     desc=config.kind, load_record=load_feedforward)

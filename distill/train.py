"""Distillation: train a feedforward student to reproduce an EBM's fixed points in one forward pass.

Given fixed points (x, s_1..s_L) of a network (an ``ebm-fixed-points`` file written by ``ebm relax``, or any object
with ``inputs`` (N, *input_shape), ``labels`` (N,), ``states`` [(N, *shape_k)], ``settings`` and ``network_hash``),
the student (``distill.models.student_for``: ``FeedForward`` for a dense ``ebm_sim`` Network, ``LayeredFeedForward``
-- same convolutions, pooling and readout -- for a layered ``ebm_sim.model.LayeredNetwork``; the EBM's slope)
minimizes, over minibatches,

    loss = sum_k w_k MSE(a_k(x), s_k)  +  w_out CE(logits(x), t)

with a_k = clip(z_k, 0, 1) the student's layer-k activation (k = 1..L, or 1..L-1 for a dense softmax-readout EBM;
(B, n_k) or (B, C, H, W)), MSE the mean over units (channels and positions) and samples (``state_loss="mse"``) or,
by default (``"matching"``), the hard sigmoid's matching loss of z_k, which equals that MSE while z_k is in [0, 1]
and grows linearly outside, so saturated units with a wrong state still get a gradient (see ``matching_loss``),
w_k = ``layer_weight`` (one value or one per state layer), w_out = ``output_weight`` and t the target class: the
EBM's own prediction argmax of its logits (``output_target="ebm"``, default: the student imitates the EBM, mistakes
included) or the true label (``"labels"``). Adam, seeded minibatches, early stopping on a held-out
split of the fixed points (validation loss, ``patience`` epochs), a checkpoint after every epoch and an exact resume
(see :mod:`distill.fitting`).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .config import DistillConfig
from .fitting import fingerprint, fit_model, split_indices
from .models import student_for

# ---------------------------------------------------------------------------------------------- data
def ebm_logits(network, states) -> np.ndarray:
    """The EBM's output scores at states [s_1..s_L]: ``network.logits`` (dense) or the cost's output (layered:
    the readout's logits, or flat(s_L)), (N, classes)."""
    if hasattr(network, "logits"):
        return network.logits(states)
    from ebm_sim.model.energy import output
    return output(network, list(states))


def ebm_predictions(network, fixed_points) -> np.ndarray:
    """The EBM's predictions at its fixed points: argmax of its logits (argmax s_L without a readout), (N,) int64."""
    return np.asarray(np.argmax(ebm_logits(network, fixed_points.states), axis=1), dtype=np.int64)


def network_shapes(network) -> tuple:
    """(input shape, [state shapes]) of one sample: ((n_0,), [(n_1,), ...]) for a dense Network (its relaxing
    layers), (input_shape, state_shapes) for a LayeredNetwork."""
    if hasattr(network, "layer_shapes"):
        return tuple(network.input_shape), [tuple(s) for s in network.state_shapes]
    return (network.layer_sizes[0],), [(n,) for n in network.state_sizes]


def check_fixed_points(network, fixed_points) -> None:
    """Refuse (ValueError) fixed points of another network or with shapes that do not fit it: inputs
    (N, *input_shape) and states [(N, *shape_k)] of the network's relaxing layers, N >= 2."""
    if fixed_points.network_hash != network.content_hash():
        raise ValueError(f"these fixed points were computed by another network (stored network_hash "
                         f"{fixed_points.network_hash[:12]}, given network {network.content_hash()[:12]})")
    inputs = np.shape(fixed_points.inputs)
    shapes = [tuple(inputs[1:])] + [tuple(np.shape(s)[1:]) for s in fixed_points.states]
    input_shape, state_shapes = network_shapes(network)
    expected = [input_shape] + state_shapes
    if shapes != expected:
        raise ValueError(f"the fixed points have input and state shapes {shapes} but the network's input and states "
                         f"are {expected}")
    counts = {np.shape(a)[0] for a in [fixed_points.inputs, fixed_points.labels, *fixed_points.states]}
    if len(counts) != 1:
        raise ValueError(f"the fixed points' inputs, labels and states hold different sample counts {sorted(counts)}")
    if len(fixed_points) < 2:
        raise ValueError(f"need at least 2 fixed points to distill, got {len(fixed_points)}")


def matching_loss(z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Mean over the batch and units of the hard sigmoid's matching loss (Helmbold, Kivinen & Warmuth 1999),
    2 * integral_{s}^{z} (clip(t, 0, 1) - s) dt = (c - s)^2 + 2 (z - c)(c - s), c = clip(z, 0, 1):
    equal to the squared error (c - s)^2 of the state while z lies in [0, 1] and continued linearly outside, so
    its gradient 2 (clip(z) - s) also reaches saturated units whose state is wrong (the plain MSE of clip(z) gives
    them none, and units at 0 whose target is positive would never recover). Convex in z."""
    c = torch.clamp(z, 0.0, 1.0)
    return torch.mean((c - s) ** 2 + 2.0 * (z - c) * (c - s))


def _tensor(array, dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=dtype))


def state_losses(model: torch.nn.Module, x: torch.Tensor, states: list, batch_size: int = 4096) -> tuple:
    """(per-layer MSE list, logits) of the student on (x, states) in batches, without gradients."""
    sums = [0.0] * len(states)
    logits = []
    with torch.no_grad():
        for begin in range(0, x.shape[0], batch_size):
            a, out = model.forward_layers(x[begin:begin + batch_size])
            for k, (ak, sk) in enumerate(zip(a, states)):
                sums[k] += float(F.mse_loss(ak, sk[begin:begin + batch_size], reduction="sum"))
            logits.append(out)
    return [s / st.numel() for s, st in zip(sums, states)], torch.cat(logits)


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate(model: torch.nn.Module, x, y, batch_size: int = 4096) -> dict:
    """Accuracy and mean cross-entropy of ``model`` (inputs (N, ...) in [0, 1], labels (N,)):
    {"accuracy", "loss", "n"}; also works for any module mapping inputs to logits."""
    x = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    y = torch.as_tensor(np.asarray(y), dtype=torch.int64) if not isinstance(y, torch.Tensor) else y
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x.shape[0]} inputs but {y.shape[0]} labels")
    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for begin in range(0, x.shape[0], batch_size):
            logits = model(x[begin:begin + batch_size].to(torch.float32))
            yb = y[begin:begin + batch_size]
            correct += int((logits.argmax(1) == yb).sum())
            loss += float(F.cross_entropy(logits.to(torch.float64), yb, reduction="sum"))
    model.train(was_training)
    n = int(x.shape[0])
    return {"accuracy": correct / n, "loss": loss / n, "n": n}


def compare_with_ebm(model: torch.nn.Module, network, fixed_points, batch_size: int = 4096) -> dict:
    """Student vs EBM on a fixed-point set: {"accuracy" (student vs labels), "ebm_accuracy", "agreement"
    (share of equal predictions), "state_mse" (per layer: mean (a_k - s_k)^2), "n"}."""
    check_fixed_points(network, fixed_points)
    x = _tensor(fixed_points.inputs, np.float32)
    states = [_tensor(s, np.float32) for s in fixed_points.states]
    mse, logits = state_losses(model, x, states, batch_size)
    student = logits.argmax(1).numpy()
    ebm = ebm_predictions(network, fixed_points)
    labels = np.asarray(fixed_points.labels)
    return {"accuracy": float(np.mean(student == labels)), "ebm_accuracy": float(np.mean(ebm == labels)),
            "agreement": float(np.mean(student == ebm)), "state_mse": mse, "n": int(len(labels))}


# ---------------------------------------------------------------------------------------------- training
def distill(network, fixed_points, config: DistillConfig | None = None, *, checkpoint_path=None,
            resume: bool = False, progress: bool = True, log=print, fixed_points_hash: str | None = None,
            dataset: str | None = None, provenance: dict | None = None, world=None):
    """Distill ``network`` (ebm_sim Network or LayeredNetwork) from its fixed points (storage.FixedPointDataset);
    return (student -- ``student_for(network)``: FeedForward or LayeredFeedForward -- in eval mode with the best
    validation parameters, history).

    history: per epoch epoch, train_loss, val_loss, val_mse_s{k} (per state layer), val_agreement, val_accuracy,
    lr, seconds; best_epoch. checkpoint_path: the student's ebm-feedforward file, rewritten atomically after every
    epoch (needs ``fixed_points_hash``, the fixed-point file's content hash, for the provenance); resume=True
    continues an interrupted run from it exactly. dataset / provenance: stored with the model.
    world: None (one process) or an ``ebm_sim.distributed.World`` (data parallel over its processes, every rank
    calling distill with the same arguments; see ``distill.fitting.fit_model``).
    """
    config = config or DistillConfig()
    check_fixed_points(network, fixed_points)
    weights = config.layer_weights(len(fixed_points.states))
    if checkpoint_path is not None and fixed_points_hash is None:
        raise ValueError("saving a distilled model needs fixed_points_hash, the fixed-point file's content hash")
    x = _tensor(fixed_points.inputs, np.float32)
    states = [_tensor(s, np.float32) for s in fixed_points.states]
    labels = np.asarray(fixed_points.labels, dtype=np.int64)
    ebm = ebm_predictions(network, fixed_points)
    target = torch.from_numpy(ebm if config.output_target == "ebm" else labels)
    train_rows, val_rows = split_indices(len(labels), config.val_fraction, config.seed)
    model = student_for(network, init_from_ebm=config.init_from_ebm, seed=config.seed)
    train_index = torch.from_numpy(train_rows)
    val_index = torch.from_numpy(val_rows)
    x_val, states_val = x[val_index], [s[val_index] for s in states]

    def objective(layer_mse, logits, target_rows):
        loss = sum(w * m for w, m in zip(weights, layer_mse))
        if config.output_weight:
            loss = loss + config.output_weight * F.cross_entropy(logits, target_rows)
        return loss

    def layer_losses(inputs, targets):
        a, logits, zs = model.forward_layers(inputs, preactivations=True)
        if config.state_loss == "matching":
            return [matching_loss(z, s) for z, s in zip(zs, targets)], logits
        return [F.mse_loss(ak, sk) for ak, sk in zip(a, targets)], logits

    def batch_loss(rows, generator):
        index = train_index[torch.from_numpy(rows)]
        losses, logits = layer_losses(x[index], [s[index] for s in states])
        return objective(losses, logits, target[index])

    def validate():
        if len(val_rows) == 0:
            return {"loss": math.nan}
        mse, logits = state_losses(model, x_val, states_val)
        predicted = logits.argmax(1).numpy()
        loss = float(objective(layer_losses(x_val, states_val)[0], logits, target[val_index]))
        return {"loss": loss, **{f"mse_s{k + 1}": m for k, m in enumerate(mse)},
                "agreement": float(np.mean(predicted == ebm[val_rows])),
                "accuracy": float(np.mean(predicted == labels[val_rows]))}

    settings = {"config": config.as_dict(), "network_hash": network.content_hash(),
                "data": fingerprint(fixed_points.inputs, labels, *fixed_points.states)}
    if dataset is None:
        dataset = fixed_points.settings.get("dataset")
    info = {"fixed_points_settings": fixed_points.settings, "num_fixed_points": len(labels),
            "num_validation": int(len(val_rows)), **(provenance or {})}

    def save(path, student, history, checkpoint, checkpoint_state):
        from .io import save_model
        save_model(path, student, "distilled", config.as_dict(), dataset=dataset,
                   network_hash=network.content_hash(), fixed_points_hash=fixed_points_hash, provenance=info,
                   history=history, checkpoint=checkpoint, checkpoint_state=checkpoint_state)

    from .io import load_feedforward
    return fit_model(model, len(train_rows), batch_loss, validate, config, settings, save=save,
                     checkpoint_path=checkpoint_path, resume=resume, progress=progress, log=log, desc="distill",
                     load_record=load_feedforward, world=world)

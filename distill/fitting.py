"""The training loop shared by distillation and the baselines: Adam on minibatches, seeded, early stopping on a
held-out split, a tqdm bar per epoch, a checkpoint after every epoch and an exact resume.

Reproducibility: the minibatch order of epoch e is ``numpy.random.default_rng([seed, e]).permutation(N)`` and any
randomness inside a batch loss (PGD's random start) comes from a torch generator seeded by (seed, e), so a run
interrupted after any epoch and resumed from its checkpoint ends with exactly the parameters of an uninterrupted run.

Checkpoint (the output file itself, rewritten atomically after every epoch, see ``distill.io``): the model stored
as the file's weights is the best so far (lowest validation loss; the last one without a validation split), so the
file is always usable; ``checkpoint/`` holds the current parameters and Adam's state, and ``checkpoint_state`` the
next epoch, the early-stopping counters and a fingerprint of the configuration and data. The final file has no
checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Callable

import numpy as np
import torch

from .config import FitConfig


def fingerprint(*arrays) -> str:
    """SHA-256 of arrays' dtypes, shapes and bytes (a resumed run must see the same data)."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def split_indices(num: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, validation) index split; the validation part has round(val_fraction * num) rows (at least
    one when val_fraction > 0), the training part at least one."""
    order = np.random.default_rng([seed, 7919]).permutation(num)
    num_val = 0 if val_fraction == 0 else min(num - 1, max(1, int(round(val_fraction * num))))
    if num < 2 and num_val:
        raise ValueError(f"cannot hold out a validation split from {num} sample(s)")
    return np.sort(order[num_val:]), np.sort(order[:num_val])


def batch_generator(seed: int, epoch: int) -> torch.Generator:
    """The torch generator of an epoch's in-batch randomness (depends only on (seed, epoch))."""
    return torch.Generator().manual_seed(int(np.random.default_rng([seed, epoch, 1]).integers(2 ** 62)))


# ---------------------------------------------------------------------------------------------- checkpoints
def _flat_state(model: torch.nn.Module, optimizer: torch.optim.Adam) -> dict:
    """The checkpoint: ``current/<name>`` for every array of ``model.parameter_state()`` and Adam's state."""
    state = {f"current/{name}": array for name, array in model.parameter_state().items()}
    for i, p in enumerate(model.parameters()):
        s = optimizer.state.get(p)
        if s:
            state[f"adam/step/{i}"] = s["step"].detach().cpu().numpy().copy()
            state[f"adam/exp_avg/{i}"] = s["exp_avg"].detach().cpu().numpy().copy()
            state[f"adam/exp_avg_sq/{i}"] = s["exp_avg_sq"].detach().cpu().numpy().copy()
    return state


def _restore_state(model: torch.nn.Module, optimizer: torch.optim.Adam, flat: dict) -> None:
    model.load_parameter_state({name[len("current/"):]: a for name, a in flat.items() if name.startswith("current/")})
    for i, p in enumerate(model.parameters()):
        if f"adam/step/{i}" in flat:
            optimizer.state[p] = {"step": torch.as_tensor(flat[f"adam/step/{i}"]).clone(),
                                  "exp_avg": torch.as_tensor(flat[f"adam/exp_avg/{i}"]).clone(),
                                  "exp_avg_sq": torch.as_tensor(flat[f"adam/exp_avg_sq/{i}"]).clone()}


def _copy_parameters(model: torch.nn.Module) -> list:
    return [p.detach().clone() for p in model.parameters()]


def _set_parameters(model: torch.nn.Module, values: list) -> None:
    with torch.no_grad():
        for p, v in zip(model.parameters(), values):
            p.copy_(v)


# ---------------------------------------------------------------------------------------------- the loop
def fit_model(model: torch.nn.Module, num_train: int, batch_loss: Callable, validate: Callable, config: FitConfig,
              settings: dict, save: Callable | None = None, checkpoint_path=None, resume: bool = False,
              progress: bool = True, log=print, desc: str = "train", load_record: Callable | None = None,
              world=None):
    """Train ``model`` in place; return (model with the best validation parameters, history). ``model``: a student
    (``FeedForward`` or ``LayeredFeedForward``: ``parameter_state``/``load_parameter_state``, ``architecture``).

    batch_loss(rows (np.ndarray of training indices), generator) -> scalar loss tensor (and may return a dict of
    extra statistics as a second value); validate() -> dict of floats with at least "loss" (computed without
    gradients; empty-split runs may return {"loss": nan}). settings: JSON dict identifying the configuration and
    data (a resume with other settings is refused; only "epochs" may differ, with a constant schedule). save(path, model, history,
    checkpoint, checkpoint_state): writes the output file (checkpoint None for the final one).
    load_record(path) -> distill.io.ModelRecord, to resume from ``checkpoint_path``.
    History: one entry per epoch of epoch, train_loss, every key of validate(), lr, seconds.

    world: None (one process) or an ``ebm_sim.distributed.World``: data parallel over its processes, every rank
    calling fit_model with the same model, data and configuration. Each rank takes its contiguous slice of every
    global minibatch (``World.share``), backpropagates its own batch_loss and the parameter gradients are averaged
    weighted by the slices' rows, with the loss sums, in one explicit all_reduce per minibatch (a batch mean loss
    then gives the gradient of the global minibatch's mean loss); every rank applies the same Adam step. Explicit
    rather than DistributedDataParallel: batch_loss is a closure, not the forward() of one wrapped module, the
    models are small (DDP's bucketing and overlap buy nothing), the checkpoints keep the module's own parameter
    names, and ranks with an empty slice of a short last minibatch still take part. Validation runs on every rank
    (identical parameters, identical early stopping); rank 0 alone logs and writes ``checkpoint_path``, every rank
    reads it on resume. In-batch randomness (``generator``: PGD's random start) is drawn per slice, so a PGD baseline
    differs from one process by its random draws; distillation has none.
    """
    from tqdm import tqdm

    from ebm_sim.distributed import log_on_main, single

    if not single(world):
        if config.batch_size < world.size:
            raise ValueError(f"a minibatch of {config.batch_size} samples cannot give each of {world.size} processes "
                             f"a slice: use a batch size of at least {world.size} or fewer processes")
        log, progress = log_on_main(world, log), progress and world.is_main
        writes = world.is_main
    else:
        writes = True
    params = list(model.parameters())

    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    history: dict = {}
    start_epoch, best_loss, best_epoch, bad_epochs = 0, math.inf, 0, 0
    best = _copy_parameters(model)
    if resume:
        if checkpoint_path is None or load_record is None:
            raise ValueError("resume needs the output file of an interrupted run (checkpoint_path)")
        record = load_record(checkpoint_path)
        if record.checkpoint is None:
            raise ValueError(f"{checkpoint_path} holds a finished model (no training checkpoint): nothing to resume; "
                             f"train again with --overwrite")
        state = record.checkpoint_state
        stored, settings = state["settings"], json.loads(json.dumps(settings, sort_keys=True))
        differing = sorted(k for k in set(stored) | set(settings)
                           if k != "config" and stored.get(k) != settings.get(k))
        free = {"epochs"} if settings["config"].get("schedule") == "constant" else set()  # cosine depends on it
        differing += sorted(f"config.{k}" for k in set(stored.get("config", {})) | set(settings.get("config", {}))
                            if k not in free and stored.get("config", {}).get(k) != settings.get("config", {}).get(k))
        if differing:
            raise ValueError(f"cannot resume from {checkpoint_path}: its configuration or data differ "
                             f"({', '.join(differing)})")
        if record.model.architecture != model.architecture:
            raise ValueError(f"cannot resume from {checkpoint_path}: it holds another architecture "
                             f"({record.model.architecture}, not {model.architecture})")
        _restore_state(model, optimizer, record.checkpoint)
        best = _copy_parameters(record.model)
        history = {k: list(v) for k, v in record.history.items()}
        start_epoch, bad_epochs, best_epoch = state["epoch"], state["bad_epochs"], state["best_epoch"]
        best_loss = math.inf if state["best_loss"] is None else state["best_loss"]
        log(f"resuming from {checkpoint_path} after epoch {start_epoch}")
    stopped = bool(resume and config.patience is not None and bad_epochs >= config.patience)
    for epoch in range(start_epoch, config.epochs):
        if stopped:
            break
        start = time.perf_counter()
        model.train()
        order = np.random.default_rng([config.seed, epoch]).permutation(num_train)
        generator = batch_generator(config.seed, epoch)
        lr = config.epoch_lr(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        total, count = 0.0, 0
        with tqdm(total=num_train, desc=f"{desc} epoch {epoch + 1}/{config.epochs}", unit="sample",
                  disable=not progress, leave=False, dynamic_ncols=True) as bar:
            for begin in range(0, num_train, config.batch_size):
                rows = order[begin:begin + config.batch_size]
                if single(world):
                    loss = batch_loss(rows, generator)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    value = float(loss.detach())
                else:
                    value = _distributed_step(world, model, params, optimizer, batch_loss, rows, generator)
                if not math.isfinite(value):
                    kept = (f"{checkpoint_path} keeps the checkpoint of epoch {epoch}" if checkpoint_path is not None
                            and epoch > 0 else "no checkpoint was written")
                    raise FloatingPointError(f"training diverged in epoch {epoch + 1}: the loss is {value}; lower "
                                             f"the learning rate ({kept})")
                total += value * len(rows)
                count += len(rows)
                bar.update(len(rows))
                bar.set_postfix(loss=f"{total / count:.4f}", refresh=False)
        model.eval()
        with torch.no_grad():
            val = validate()
        entry = {"epoch": epoch + 1, "train_loss": total / count, **{f"val_{k}": v for k, v in val.items()},
                 "lr": lr, "seconds": time.perf_counter() - start}
        for key, value in entry.items():
            history.setdefault(key, []).append(float(value))
        val_loss = float(val.get("loss", math.nan))
        if not math.isfinite(val_loss) or val_loss < best_loss:
            best_loss = val_loss if math.isfinite(val_loss) else math.inf
            best, best_epoch, bad_epochs = _copy_parameters(model), epoch + 1, 0
        else:
            bad_epochs += 1
        shown = ", ".join(f"{k} {v:.4f}" for k, v in val.items() if isinstance(v, float) and math.isfinite(v))
        log(f"epoch {epoch + 1}/{config.epochs}: train loss {total / count:.4f}" + (f", val {shown}" if shown else "")
            + f", {entry['seconds']:.1f} s")
        stopped = config.patience is not None and config.val_fraction > 0 and bad_epochs >= config.patience
        if save is not None and checkpoint_path is not None and epoch + 1 < config.epochs and not stopped:
            current = _copy_parameters(model)
            flat = _flat_state(model, optimizer)
            _set_parameters(model, best)
            state = {"epoch": epoch + 1, "bad_epochs": bad_epochs, "best_epoch": best_epoch,
                     "best_loss": best_loss if math.isfinite(best_loss) else None, "settings": settings}
            try:
                _save_on_main(world, writes, lambda: save(checkpoint_path, model, history, flat, state),
                              f"writing the checkpoint of epoch {epoch + 1}")
            finally:
                _set_parameters(model, current)
        if stopped:
            log(f"early stopping after epoch {epoch + 1}: no lower validation loss for {bad_epochs} epochs; "
                f"keeping epoch {best_epoch}")
    _set_parameters(model, best)
    history["best_epoch"] = [float(best_epoch)]
    model.eval()
    if save is not None and checkpoint_path is not None:
        _save_on_main(world, writes, lambda: save(checkpoint_path, model, history, None, None),
                      "writing the final model")
    return model, history


def _save_on_main(world, writes: bool, write: Callable, what: str) -> None:
    """write() in one process, or on rank 0 with every rank waiting for it (a failed write stops them all)."""
    from ebm_sim.distributed import single

    if single(world):
        write()
        return
    try:
        if writes:
            write()
    except Exception:
        world.agree(False, what)
        raise
    world.agree(True, what)


def _distributed_step(world, model, params: list, optimizer, batch_loss: Callable, rows, generator) -> float:
    """One minibatch of ``fit_model`` on ``world``: this rank's slice, the row-weighted all_reduce of the gradients
    and loss sums, the same Adam step on every rank; returns the global minibatch's mean loss."""
    mine = rows[world.share(len(rows))]
    optimizer.zero_grad(set_to_none=True)
    like = [p.detach() for p in params]
    try:
        loss = batch_loss(mine, generator) if len(mine) else None
        if loss is not None:
            loss.backward()
    except Exception:
        world.average(None, 0.0, like=like, extras=[0.0], failed=True)  # the other ranks stop instead of waiting
        raise
    grads = None if loss is None else [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    local_sum = float(loss.detach()) * len(mine) if loss is not None else 0.0
    reduced, (loss_sum,) = world.average(grads, len(mine) / len(rows), like=like, extras=[local_sum])
    for p, g in zip(params, reduced):
        p.grad = g.to(device=p.device, dtype=p.dtype)
    optimizer.step()
    return loss_sum / len(rows)

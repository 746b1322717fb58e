"""The pipeline's own plots (the robustness and hardware plots come from distill.robustness.report and
hardware.targets): the relaxation per integrator, and the training curves. PNG files, written atomically."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ebm_sim import integrators
from ebm_sim.storage import save_figure

DYNAMICS_METHODS = integrators.DEPLOYABLE


def _figure(width: float, height: float, columns: int):
    """A figure with ``columns`` axes, made without pyplot (the caller's matplotlib backend stays as it is)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height))
    return fig, fig.subplots(1, columns)


def relaxation_traces(network, x, tol: float, max_steps: int) -> dict:
    """Relax x with every integrator of DYNAMICS_METHODS, recording the trajectory; per method the mean
    energy E(s_t) over the samples and the median residual r(s_t) = max |projected ds/dt| (the same measure for
    every integrator: it vanishes exactly at a fixed point), per step, and steps / time to tol.

    network: a dense ``Network`` (x (B, n_0), ebm_sim.relax) or a ``LayeredNetwork`` (x (B, C, H, W),
    ebm_sim.model.dynamics; an adaptive method such as rk45 is not recorded there: its trace holds the start and the
    end state only, and ``"recorded": False`` says so).

    Returns {method: {"energy": [...], "residual": [...], "steps_mean", "converged", "seconds", "recorded"}}."""
    import time

    from ebm_sim.energy import max_abs, projected_velocity

    if hasattr(network, "layer_shapes"):
        from ebm_sim.model.energy import energy

        run, velocity_of, x = _layered_relaxation(network, x, tol, max_steps)

        def energy_of(states):
            return np.asarray(energy(network, x, states))
    else:
        from ebm_sim.energy import velocity
        from ebm_sim.relax import relax

        def run(method, record):
            return relax(network, x, method=method, tol=tol, max_steps=max_steps, record=record)

        def velocity_of(states):
            return velocity(network, x, states)

    def residual_of(states) -> float:
        flows = projected_velocity(states, velocity_of(states))
        return float(np.median(max_abs([f.reshape(f.shape[0], -1) for f in flows])))

    traces = {}
    for method in DYNAMICS_METHODS:
        recorded = not (hasattr(network, "layer_shapes") and integrators.INTEGRATORS[method].adaptive)
        start = time.perf_counter()
        result = run(method, recorded)
        seconds = time.perf_counter() - start
        if recorded:
            frames = [[layer[t] for layer in result.trajectory] for t in range(result.trajectory[0].shape[0])]
            energies = [float(e) for e in np.asarray(result.energy).mean(axis=1)]
        else:  # the start (zero states) and the end state
            frames = [[np.zeros_like(s) for s in result.states], result.states]
            energies = [float(np.mean(energy_of(states))) for states in frames]
        traces[method] = {"energy": energies, "residual": [residual_of(states) for states in frames],
                          "steps_mean": float(np.mean(result.steps)), "converged": float(np.mean(result.converged)),
                          "seconds": seconds, "recorded": recorded}
    return traces


def _layered_relaxation(network, x, tol: float, max_steps: int):
    """(run(method, record), velocity_of(states), clamped inputs) for a LayeredNetwork on images x: the numpy
    reference relaxation of ebm_sim.model.dynamics and the unprojected velocity a h - s of its states."""
    from ebm_sim.model.dynamics import relax_clamped
    from ebm_sim.model.energy import velocity

    clamped = network.normalize(np.asarray(x, dtype=network.dtype))

    def run(method, record):
        return relax_clamped(network, clamped, method, tol=tol, max_steps=max_steps, record=record)

    def velocity_of(states):
        return velocity(network, clamped, states)
    return run, velocity_of, clamped


def plot_relaxation(traces: dict, path: Path, title: str = "") -> Path:
    """Energy (mean over samples) and residual (median, log scale) against the step, one line per integrator."""
    fig, (left, right) = _figure(11, 4, 2)
    for method, trace in traces.items():
        label = f"{method} ({trace['steps_mean']:.1f} steps)"
        if trace.get("recorded", True):
            left.plot(trace["energy"], label=label)
            right.semilogy(np.maximum(trace["residual"], 1e-12), label=label)
        else:  # start and end only (an adaptive method on a layered network): the end at its mean step count
            steps = [0, trace["steps_mean"]]
            label += ", start and end only"
            left.plot(steps, trace["energy"], "o--", label=label)
            right.semilogy(steps, np.maximum(trace["residual"], 1e-12), "o--", label=label)
    left.set_xlabel("step")
    left.set_ylabel("energy E(s) (mean over samples)")
    left.set_title("energy descends during relaxation")
    right.set_xlabel("step")
    right.set_ylabel("residual max |projected ds/dt| (median)")
    right.set_title("residual falls to the fixed point")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110, bbox_inches="tight")
    return path


def plot_training(histories: dict, path: Path) -> Path:
    """Training curves: EP training of the EBM (loss, train and test accuracy per epoch) and the feedforward
    models' validation loss and accuracy per epoch. histories: {name: history dict}."""
    fig, axes = _figure(11, 4, 2)
    def curve(ax, values, label, style="-"):
        if values:
            ax.plot(range(1, len(values) + 1), values, style, label=label)

    for name, history in histories.items():
        if "test_acc" in history:  # the EBM (ebm_sim.training)
            curve(axes[0], list(history["loss"]), f"{name}: EP loss (train)")
            curve(axes[1], [100 * a for a in history["test_acc"]], f"{name}: test")
            curve(axes[1], [100 * a for a in history["train_acc"]], f"{name}: train", "--")
        else:  # distill.fitting histories
            curve(axes[0], list(history.get("val_loss") or []), f"{name}: validation loss")
            curve(axes[1], [100 * a for a in history.get("val_accuracy") or []], f"{name}: validation")
    axes[0].set_ylabel("loss")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("accuracy (%)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_title("training losses")
    axes[1].set_title("accuracy during training")
    fig.tight_layout()
    save_figure(fig, path, dpi=110, bbox_inches="tight")
    return path

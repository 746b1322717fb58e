"""One call to relax a batch to equilibrium, over every integrator and backend.

    result = relax(network, x, method="fixed_point", tol=1e-4, max_steps=1000, beta=0.0, target=None,
                   record=False, backend="numba")

Methods: "euler", "fixed_point", "alternating", "rk45", "solve_ivp", with their updates, residuals and step rules in
the one table of :mod:`ebm_sim.integrators` (the dynamics are in :mod:`ebm_sim.energy`).
Backends: "numba" (fast kernels), "numpy" (the plain reference of :mod:`ebm_sim.reference`).
"""
from __future__ import annotations

import numpy as np

from . import integrators
from .deployment import resolve as resolve_deployment
from .network import Network
from .relax_types import BACKENDS, DEFAULT_DT, MAX_TRAJECTORY_BYTES, METHODS, DivergenceError, RelaxResult, \
    RelaxSettings

__all__ = ["BACKENDS", "DEFAULT_DT", "METHODS", "DivergenceError", "RelaxResult", "RelaxSettings", "check_inputs",
           "divergence_remedy", "relax"]


def check_inputs(network: Network, x, beta: float, target, initial):
    """Validate and convert the data of a relaxation; returns (x, target, initial) as contiguous arrays in the
    network's dtype: x (B, n_0), target (B, n_L) or None, initial list of (B, n_k) or None."""
    x = np.asarray(x)
    n_in = network.layer_sizes[0]
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != n_in:
        raise ValueError(f"x must have shape (batch, {n_in}) for this network, got {x.shape}")
    if x.shape[0] == 0:
        raise ValueError("x holds no samples")
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"x must be numeric, got dtype {x.dtype}")
    if not np.all(np.isfinite(x)):
        bad = np.unique(np.nonzero(~np.isfinite(x))[0])
        raise ValueError(f"x holds NaN or inf in {len(bad)} sample(s), first: {bad[:5].tolist()}")
    x = np.ascontiguousarray(x, dtype=network.dtype)
    batch = x.shape[0]
    if beta != 0.0:
        if target is None:
            raise ValueError("beta != 0 needs a target for the output layer")
        target = np.asarray(target)
        n_out = network.layer_sizes[-1]
        if target.shape != (batch, n_out):
            raise ValueError(f"target must have shape ({batch}, {n_out}), got {target.shape}")
        if not np.all(np.isfinite(target)):
            raise ValueError("target holds NaN or inf")
        target = np.ascontiguousarray(target, dtype=network.dtype)
    else:
        target = None
    if initial is not None:
        sizes = network.state_sizes
        if len(initial) != len(sizes):
            raise ValueError(f"initial needs {len(sizes)} arrays (one per layer that relaxes), got {len(initial)}")
        checked = []
        for k, (s, n) in enumerate(zip(initial, sizes), start=1):
            s = np.asarray(s)
            if s.shape != (batch, n):
                raise ValueError(f"initial state of layer {k} must have shape ({batch}, {n}), got {s.shape}")
            if not np.all(np.isfinite(s)):
                raise ValueError(f"initial state of layer {k} holds NaN or inf")
            checked.append(np.clip(np.ascontiguousarray(s, dtype=network.dtype), 0.0, 1.0))
        initial = checked
    return x, target, initial


def relax(network: Network, x, method: str = "fixed_point", tol: float = 1e-4, max_steps: int = 1000,
          beta: float = 0.0, target=None, record: bool = False, *, dt: float | None = None,
          initial=None, backend: str = "numba", rtol: float | None = None, atol: float | None = None,
          dt_max: float = 10.0,
          on_divergence: str = "raise", threads: int | None = None, deployment=None) -> RelaxResult:
    """Relax x (B, n_0) in [0, 1] to equilibrium of E + beta C; see the module docstring for the methods.

    deployment: an ``ebm_sim.deployment.Deployment`` (e.g. ``Deployment.of_network_file(path)``) that supplies
    method, tol, max_steps and dt (then leave those at their defaults).

    initial: optional list of (B, n_k) starting states (default zeros). target: (B, n_L), needed when beta != 0.
    on_divergence: "raise" (DivergenceError naming the samples) or "flag" (only result.diverged is set).
    threads: worker threads of the Numba backend (default: one per available core; samples are split between them).
    Computation runs in the network's dtype (float32 or float64).
    """
    method, tol, max_steps, dt = resolve_deployment(deployment, relax, method, tol, max_steps, dt)
    if on_divergence not in ("raise", "flag"):
        raise ValueError(f"on_divergence must be 'raise' or 'flag', got {on_divergence!r}")
    settings = RelaxSettings(method=method, tol=tol, max_steps=max_steps, dt=dt, beta=float(beta), rtol=rtol,
                             atol=atol, dt_max=dt_max, backend=backend)
    x, target, initial = check_inputs(network, x, settings.beta, target, initial)
    if record:
        frames = settings.max_steps + 1
        size = frames * x.shape[0] * sum(network.state_sizes) * network.dtype.itemsize
        if size > MAX_TRAJECTORY_BYTES:
            raise ValueError(f"recording {frames} steps of {x.shape[0]} samples needs {size / 2 ** 30:.1f} GiB; "
                             f"lower max_steps or the batch size")
    if settings.method == "solve_ivp" or settings.backend == "numpy":
        from . import reference
        result = reference.relax_reference(network, x, settings, target, initial, record)
    else:
        from . import numba_backend
        result = numba_backend.relax_numba(network, x, settings, target, initial, record, threads)
    if network.readout:
        result.extras["logits"] = network.logits(result.states)
    if record:
        from .energy import energy
        result.energy = np.stack([energy(network, x, [t[f] for t in result.trajectory], settings.beta, target)
                                  for f in range(result.trajectory[0].shape[0])])
    if on_divergence == "raise" and np.any(result.diverged):
        bad = np.nonzero(result.diverged)[0]
        raise DivergenceError(f"the {settings.method} dynamics produced NaN or inf for {len(bad)} of {x.shape[0]} "
                              f"samples (first: {bad[:5].tolist()}); {divergence_remedy(settings.method)}")
    return result


def divergence_remedy(method: str) -> str:
    """What to try when ``method`` diverged (``Integrator.divergence_remedy``)."""
    return integrators.get(method).divergence_remedy()

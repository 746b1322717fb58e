"""One call to relax a batch to equilibrium, over every integrator and backend.

    result = relax(network, x, method="fixed_point", tol=1e-4, max_steps=1000, beta=0.0, target=None,
                   record=False, backend="numba")

Methods (the dynamics are in :mod:`ebm_sim.energy`):
  "euler"        explicit Euler, s <- clip(s + dt (a h - s)), residual max |s_{t+1} - s_t| / dt
  "fixed_point"  synchronous fixed-point iteration s <- clip(a h) (Euler with dt = 1), residual max |s_{t+1} - s_t|
  "alternating"  fixed-point iteration of layers s_1, s_3, ... then s_2, s_4, ... (block Gauss-Seidel)
  "rk45"         adaptive Dormand-Prince 5(4) with error control (rtol, atol) on the projected flow
  "solve_ivp"    SciPy's RK45 (the solver behind solve_ivp) on the projected flow, float64, one sample at a time,
                 stepped by hand so that tol and max_steps are checked after every step (slow reference)
Backends: "numba" (fast kernels), "numpy" (the plain reference of :mod:`ebm_sim.reference`).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np

from .network import Network

METHODS = ("euler", "fixed_point", "alternating", "rk45", "solve_ivp")
BACKENDS = ("numba", "numpy")
DEFAULT_DT = {"euler": 0.5, "fixed_point": 1.0, "alternating": 1.0, "rk45": 0.1, "solve_ivp": None}
MAX_TRAJECTORY_BYTES = 4 * 2 ** 30


class DivergenceError(RuntimeError):
    """The dynamics produced NaN or inf for some samples."""


@dataclass
class RelaxSettings:
    """Everything that determines a relaxation besides the network and the data."""

    method: str = "fixed_point"
    tol: float = 1e-4
    max_steps: int = 1000
    dt: float | None = None
    beta: float = 0.0
    rtol: float | None = None
    atol: float | None = None
    dt_max: float = 10.0
    backend: str = "numba"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.dt is None:
            self.dt = DEFAULT_DT[self.method]
        # Local error tolerances of the adaptive methods default to the convergence tolerance: looser ones let
        # the step size chatter at the stability limit and the residual stalls near rtol instead of reaching tol.
        # SciPy's RK45 measures the error in the RMS norm, which lets a few components chatter: it needs local
        # tolerances ~1000x below tol to reach tol (measured on 784-512-512-10 and 64-256-10 networks).
        if not (isinstance(self.tol, numbers.Real) and math.isfinite(self.tol) and self.tol >= 0):
            raise ValueError(f"tol must be a finite number >= 0, got {self.tol!r}")
        local = (self.tol or 1e-4) * (1e-3 if self.method == "solve_ivp" else 1.0)  # tol 0: unused by the family
        if self.rtol is None:
            self.rtol = local
        if self.atol is None:
            self.atol = local / 10
        # tol = 0 turns the convergence test off (the fixed-point family then runs exactly max_steps steps);
        # the adaptive methods derive their local tolerances from it, so they need tol > 0
        if self.tol == 0 and self.method in ("euler", "fixed_point", "alternating"):
            positive = {}
        else:
            positive = {"tol": self.tol}
        positive.update(rtol=self.rtol, atol=self.atol, dt_max=self.dt_max)
        if self.dt is not None:
            positive["dt"] = self.dt
        for name, value in positive.items():
            if not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if self.method in ("euler", "fixed_point", "alternating") and self.dt > 1.0:
            raise ValueError(f"dt = {self.dt} > 1 overshoots the fixed point (the update is s + dt (a h - s))")
        if self.method in ("fixed_point", "alternating") and self.dt != 1.0:
            raise ValueError(f"method {self.method!r} is the fixed-point iteration (dt = 1); "
                             f"use method='euler' for dt = {self.dt}")
        if not (isinstance(self.max_steps, (int, np.integer)) and self.max_steps >= 1):
            raise ValueError(f"max_steps must be an integer >= 1, got {self.max_steps!r}")
        if not (isinstance(self.beta, numbers.Real) and math.isfinite(self.beta)):
            raise ValueError(f"beta must be finite, got {self.beta!r}")

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class RelaxResult:
    """The outcome of a relaxation of B samples.

    states: list of arrays (B, n_k), the final states of the layers that relax (1..L, or 1..L-1 with a readout)
    steps: (B,) int, steps taken by each sample (attempted steps for rk45; solver steps for solve_ivp)
    residual: (B,) the final residual (see the method's definition); converged: residual < tol
    diverged: (B,) bool, NaN or inf appeared
    trajectory: with record=True, list of L arrays (T+1, B, n_k): the state after every step (a sample that
        stopped early keeps its final state); energy: (T+1, B) E(s) + beta C along it
    """

    states: list
    steps: np.ndarray
    residual: np.ndarray
    converged: np.ndarray
    diverged: np.ndarray
    settings: RelaxSettings
    trajectory: list | None = None
    energy: np.ndarray | None = None
    extras: dict = field(default_factory=dict)

    @property
    def output(self) -> np.ndarray:
        return self.states[-1]

    def predictions(self) -> np.ndarray:
        """argmax of the output states, or of the readout's logits (set by ``relax`` for readout networks)."""
        return np.argmax(self.extras.get("logits", self.states[-1]), axis=1)


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
          on_divergence: str = "raise", threads: int | None = None) -> RelaxResult:
    """Relax x (B, n_0) in [0, 1] to equilibrium of E + beta C; see the module docstring for the methods.

    initial: optional list of (B, n_k) starting states (default zeros). target: (B, n_L), needed when beta != 0.
    on_divergence: "raise" (DivergenceError naming the samples) or "flag" (only result.diverged is set).
    threads: worker threads of the Numba backend (default: one per available core; samples are split between them).
    Computation runs in the network's dtype (float32 or float64).
    """
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
    """What to try when ``method`` diverged: a smaller step where the method has one (euler, rk45), else the
    weights (fixed_point and alternating take a step of 1 by definition)."""
    if method in ("fixed_point", "alternating"):
        return (f"{method} has no step size to lower: check the weights' scale (a smaller --gain), or use an "
                f"integrator with a step (--method euler --dt 0.1)")
    return "lower --dt or check the weights' scale"

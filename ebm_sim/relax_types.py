"""What determines a relaxation besides the network and the data (``RelaxSettings``) and what it returns
(``RelaxResult``): below every backend (the Numba kernels, the numpy reference) and ``ebm_sim.relax``, which
imports those backends, so no module imports its caller. Methods and their rules: ``ebm_sim.integrators``."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np

from . import integrators

METHODS = integrators.METHODS
BACKENDS = ("numba", "numpy")
DEFAULT_DT = integrators.DEFAULT_DT
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
        method = integrators.get(self.method)
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
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
        if self.tol == 0 and not method.adaptive:
            positive = {}
        else:
            positive = {"tol": self.tol}
        positive.update(rtol=self.rtol, atol=self.atol, dt_max=self.dt_max)
        for name, value in positive.items():
            if not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        self.dt = method.resolve_dt(self.dt)
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

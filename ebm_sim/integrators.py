"""The integrators of the energy dynamics: one record per method, read by every relaxation (the dense Numba kernels
and numpy reference, the Torch twin, the layered networks), the command line, training, the demo and the plots.

The flow is ds/dt = P_s(a h(s) - s), projected on the box [0, 1] (h: the local fields, a: the activation's slope).

    name          family      default dt  update                                            residual
    fixed_point   fixed_step  1 (only)    s <- clip(a h, 0, 1), all layers at once          max |s_{t+1} - s_t|
    euler         fixed_step  0.5         s <- clip(s + dt (a h - s), 0, 1), all layers     max |s_{t+1} - s_t| / dt
    alternating   fixed_step  1 (only)    the same, layers s_1, s_3, ... then s_2, s_4, ... max |s_{t+1} - s_t|
    rk45          adaptive    0.1 (first) Dormand-Prince 5(4), error control (rtol, atol)   max |P(a h - s)|
    solve_ivp     adaptive    SciPy's     SciPy's RK45, float64, one sample at a time       max |P(a h - s)|

A sample stops when its residual is below tol (tol = 0: a fixed-step method runs exactly max_steps steps) or at
max_steps. ``fixed_step`` methods take 0 < dt <= 1 (dt > 1 overshoots the fixed point); fixed_point and alternating
are the dt = 1 update by definition. ``solve_ivp`` is the slow, obvious reference (scipy), not a deployment.

Who steps each method, per network kind: dense networks (ebm_sim.network.Network) on "numba" (ebm_sim.kernels),
"numpy" (ebm_sim.reference) and "torch" (ebm_sim.torch_twin); layered networks (ebm_sim.model) through
ebm_sim.model.dynamics on the interaction backends "numpy", "torch" and "numba".
The Dormand-Prince tableau lives here only (``DORMAND_PRINCE``).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

FAMILIES = ("fixed_step", "adaptive")


@dataclass(frozen=True)
class Integrator:
    """One method: its name, family, default dt, whether dt is fixed at 1, its update and residual (in words), whether
    layers update in two alternating groups, the backends that step it per network kind ("dense", "layered"), and
    whether it is only a reference."""

    name: str
    family: str
    default_dt: float | None
    unit_step: bool
    update: str
    residual: str
    alternating: bool
    backends: dict
    reference_only: bool = False

    @property
    def adaptive(self) -> bool:
        return self.family == "adaptive"

    def resolve_dt(self, dt=None):
        """dt, or the method's default; ValueError when dt does not fit the method (before any work)."""
        dt = self.default_dt if dt is None else dt
        if dt is None:  # SciPy chooses the first step
            return None
        if not (isinstance(dt, numbers.Real) and math.isfinite(dt) and dt > 0):
            raise ValueError(f"dt must be a positive finite number, got {dt!r}")
        if self.family == "fixed_step" and dt > 1.0:
            raise ValueError(f"dt = {dt} > 1 overshoots the fixed point (the update is s + dt (a h - s))")
        if self.unit_step and dt != 1.0:
            raise ValueError(f"method {self.name!r} is the fixed-point iteration (dt = 1); use method='euler' for "
                             f"dt = {dt}")
        return float(dt)

    def update_groups(self, num_layers: int) -> list:
        """0-based state indices updated together: all at once, or s_1, s_3, ... then s_2, s_4, ..."""
        if self.alternating:
            return [list(range(0, num_layers, 2)), list(range(1, num_layers, 2))]
        return [list(range(num_layers))]

    def divergence_remedy(self) -> str:
        """What to try when the method diverged: a smaller step where it has one, else the weights."""
        if self.unit_step:
            return (f"{self.name} has no step size to lower: check the weights' scale (a smaller --gain), or use an "
                    f"integrator with a step (--method euler --dt 0.1)")
        return "lower --dt or check the weights' scale"


KINDS = ("dense", "layered")
_EVERY_BACKEND = {"dense": ("numba", "numpy", "torch"), "layered": ("numpy", "torch", "numba")}
INTEGRATORS = {i.name: i for i in [
    Integrator("fixed_point", "fixed_step", 1.0, True, "s <- clip(a h, 0, 1), all layers from the same states",
               "max |s_{t+1} - s_t|", False, _EVERY_BACKEND),
    Integrator("euler", "fixed_step", 0.5, False, "s <- clip(s + dt (a h - s), 0, 1)", "max |s_{t+1} - s_t| / dt",
               False, _EVERY_BACKEND),
    Integrator("alternating", "fixed_step", 1.0, True, "s <- clip(a h, 0, 1), odd layers s_1, s_3, ... first, then "
               "the even ones from them (block Gauss-Seidel)", "max |s_{t+1} - s_t|", True, _EVERY_BACKEND),
    Integrator("rk45", "adaptive", 0.1, False, "Dormand-Prince 5(4) with error control on P(a h - s)",
               "max |P(a h - s)|", False, {"dense": ("numba", "numpy"), "layered": ("numpy",)}),
    Integrator("solve_ivp", "adaptive", None, False, "SciPy's RK45 on P(a h - s), float64, one sample at a time",
               "max |P(a h - s)|", False, {"dense": ("numba", "numpy"), "layered": ("numpy",)}, reference_only=True),
]}

#: every method, in the table's order
METHODS = tuple(INTEGRATORS)
#: the methods a network is deployed with (the command line, the demo, the plots): all but the slow reference
DEPLOYABLE = tuple(name for name, i in INTEGRATORS.items() if not i.reference_only)
#: default dt per method (None: SciPy chooses)
DEFAULT_DT = {name: i.default_dt for name, i in INTEGRATORS.items()}


def methods(kind: str | None = None, backend: str | None = None, deployable: bool = False) -> tuple:
    """The methods stepped on ``backend`` for networks of ``kind`` (None: any), optionally without the reference-only
    ones (solve_ivp on the numba backend runs the numpy reference)."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown network kind {kind!r}; choose one of {', '.join(KINDS)}")
    return tuple(name for name, i in INTEGRATORS.items()
                 if (backend is None or any(backend in i.backends[k] for k in ((kind,) if kind else KINDS)))
                 and not (deployable and i.reference_only))


def get(method: str, kind: str | None = None, backend: str | None = None, who: str = "relax") -> Integrator:
    """The record of ``method``; ValueError naming the choices when it is unknown or ``backend`` does not step it for
    ``kind`` (``who`` names the caller in the message, e.g. "the Torch twin")."""
    if method not in INTEGRATORS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(methods(kind, backend))}")
    choices = methods(kind, backend)
    if method not in choices:
        raise ValueError(f"{who} relaxes with {', '.join(choices)}, not {method!r}")
    return INTEGRATORS[method]


@dataclass(frozen=True)
class ButcherTableau:
    """An embedded explicit Runge-Kutta pair: stage coefficients a (stages, stages - 1; row i uses k_1..k_i, zero
    padded), nodes c, weights b of the propagated solution, and error weights e = b - b_embedded."""

    a: np.ndarray
    c: np.ndarray
    b: np.ndarray
    e: np.ndarray


#: Dormand-Prince 5(4) (Dormand & Prince 1980), the method of SciPy's RK45: 7 stages, first-same-as-last (the last
#: row of ``a`` is ``b``), fifth-order solution propagated, fourth-order one embedded for the error estimate
DORMAND_PRINCE = ButcherTableau(
    a=np.array([
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [1 / 5, 0.0, 0.0, 0.0, 0.0, 0.0],
        [3 / 40, 9 / 40, 0.0, 0.0, 0.0, 0.0],
        [44 / 45, -56 / 15, 32 / 9, 0.0, 0.0, 0.0],
        [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729, 0.0, 0.0],
        [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656, 0.0],
        [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84],
    ]),
    c=np.array([0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0]),
    b=np.array([35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0]),
    e=np.array([71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40]),
)

"""How a network predicts: one value, stored with the network and read by every consumer.

A ``Deployment`` is the free phase a network was trained with and is used with: the integrator (a method of the
registry in ``ebm_sim.integrators``), its step dt, the tolerance, the step cap, and the initial state (zeros: the
states start at 0, the input clamped). ``ebm train`` stores it in the network file (``extra["deployment"]``, beside
the training configuration); ``relax(..., deployment=d)``, the Torch twin (``torch_twin.relax``,
``EBMClassifier``), the robustness evaluation (``distill.robustness``: the deployed prediction and the attacks'
relaxation), the Lava mapper (``hardware.mapping``: dt, steps, tol of the Euler graph) and the pipeline read it
from there, instead of each re-expressing "method, tol, free_steps, dt".

    d = Deployment.of_network_file("network.h5")       # stored value; else the training config; else defaults
    result = relax(network, x, deployment=d)
"""
from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import asdict, dataclass, fields

from . import integrators

INITIAL_STATES = ("zeros",)  # the toolkit's relaxations start every layer at 0 with the input clamped


@dataclass(frozen=True)
class Deployment:
    """method: a deployable integrator; dt: its step (None: the method's default, resolved in ``step``); tol: a
    sample stops when its residual is below tol (0: exactly max_steps steps); max_steps: the step cap;
    initial_state: "zeros". Checked on construction (ValueError naming the field)."""

    method: str = "fixed_point"
    dt: float | None = None
    tol: float = 1e-4
    max_steps: int = 30
    initial_state: str = "zeros"

    def __post_init__(self):
        if self.method not in integrators.DEPLOYABLE:
            raise ValueError(f"deployment method must be one of {', '.join(integrators.DEPLOYABLE)}, got "
                             f"{self.method!r}")
        self.integrator.resolve_dt(self.dt)
        if isinstance(self.tol, bool) or not (isinstance(self.tol, numbers.Real) and math.isfinite(self.tol)
                                              and self.tol >= 0):
            raise ValueError(f"deployment tol must be a finite number >= 0, got {self.tol!r}")
        if self.integrator.adaptive and self.tol == 0:
            raise ValueError(f"deployment tol must be > 0 for the adaptive method {self.method!r}")
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, numbers.Integral) or self.max_steps < 1:
            raise ValueError(f"deployment max_steps must be an integer >= 1, got {self.max_steps!r}")
        if self.initial_state not in INITIAL_STATES:
            raise ValueError(f"deployment initial_state must be one of {', '.join(INITIAL_STATES)}, got "
                             f"{self.initial_state!r}")

    @property
    def integrator(self) -> integrators.Integrator:
        return integrators.INTEGRATORS[self.method]

    @property
    def step(self) -> float:
        """The step the dynamics take: dt, or the method's default (1 for fixed_point and alternating)."""
        return self.integrator.resolve_dt(self.dt)

    def relax_options(self) -> dict:
        """The keyword arguments of ``relax`` and ``torch_twin.relax``: method, tol, max_steps, dt."""
        return {"method": self.method, "tol": float(self.tol), "max_steps": int(self.max_steps), "dt": self.dt}

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict, where: str = "deployment") -> "Deployment":
        """From a stored dict; unknown keys are refused by name."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; a deployment has {', '.join(names)}")
        return cls(**values)

    @classmethod
    def of_train_config(cls, config) -> "Deployment":
        """The free phase of a training configuration (a TrainConfig or its dict): method, dt, tol, free_steps."""
        get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
        defaults = cls()
        return cls(method=get("method", defaults.method), dt=get("dt", None), tol=float(get("tol", defaults.tol)),
                   max_steps=int(get("free_steps", defaults.max_steps)))

    @classmethod
    def of_extra(cls, extra: dict) -> "Deployment":
        """From a network file's ``extra`` attributes: the stored deployment, else (files written before it was
        stored) the training configuration's free phase, else the defaults (an untrained network)."""
        if extra.get("deployment"):
            return cls.from_dict(extra["deployment"], "the stored deployment")
        if extra.get("config"):
            return cls.of_train_config(extra["config"])
        return cls()

    @classmethod
    def of_network_file(cls, path, info: dict | None = None) -> "Deployment":
        """The deployment stored with the network at ``path`` (``info``: its ``storage.artifact_info`` when the
        caller has read it already)."""
        from . import storage
        info = info or storage.artifact_info(path)
        return cls.of_extra(info["summary"].get("extra", {}))


def resolve(deployment: Deployment | None, callee, method, tol, max_steps, dt) -> tuple:
    """(method, tol, max_steps, dt) for ``callee`` (a function with those keyword arguments): from ``deployment`` when
    one is given, else the arguments. A deployment together with an argument that differs from the callee's default
    is ambiguous: ValueError naming it."""
    if deployment is None:
        return method, tol, max_steps, dt
    if not isinstance(deployment, Deployment):
        raise ValueError(f"deployment must be an ebm_sim.deployment.Deployment, got {type(deployment).__name__}")
    parameters = inspect.signature(callee).parameters
    given = [name for name, value in zip(("method", "tol", "max_steps", "dt"), (method, tol, max_steps, dt))
             if value != parameters[name].default]
    if given:
        raise ValueError(f"pass either a deployment or {', '.join(given)}, not both")
    return deployment.method, deployment.tol, deployment.max_steps, deployment.dt

"""Adversarial attacks on any model of the toolkit: inputs in [0, 1], budgets in pixel space.

    x_adv = craft(source, x, y, AttackSpec("pgd-linf", eps=0.1, steps=40), seed=0)

``source`` is the ``nn.Module`` whose logits (and, for white-box attacks, input gradients) the attack uses: the model
itself, or for an EBM one of its gradient sources (BPTT, implicit differentiation, its distilled student for a
transfer attack; see :mod:`distill.robustness.models`). Whether x_adv fools the model is decided by the caller with
the model's *deployed* prediction.

Attacks (one run, one random start; the evaluation takes the worst case over ``restarts`` seeds):
  fgsm        x + eps sign(grad CE) (Goodfellow et al. 2015), torchattacks 3.5.1
  pgd-linf    PGD in the Linf ball, random start, ``steps`` of ``step_size`` (Madry et al. 2018), torchattacks
  pgd-l2      PGD in the L2 ball (torchattacks PGDL2)
  autoattack  AutoAttack "standard" (APGD-CE, APGD-T, FAB-T, Square 5000; Croce & Hein 2020), the official code
              (``pyautoattack`` 0.2.0), norm Linf or L2; ``steps`` (default 100) are the iterations of its APGD and
              FAB runs and ``queries`` its Square's: anything below 100 / 5000 is a reduced AutoAttack and is
              labelled so
  autoattack-gradients
              AutoAttack standard's gradient-based attacks alone (APGD-CE, APGD-T, FAB-T, same settings): the
              evaluation runs them through each gradient source and completes AutoAttack with one ``square`` of the
              same eps, norm and queries on the deployed model (AutoAttack's Square only reads logits, so it is the
              same attack whatever the gradient source: run once per model, not once per source)
  square      Square Attack, Linf (default) or L2, ``queries`` queries (Andriushchenko et al. 2020), score-based
              black box: it only reads logits (pyautoattack's SquareAttack, p_init 0.8 as in AutoAttack)
  fmn         Fast Minimum-Norm attack (Pintor et al. 2021), Linf or L2, ``steps`` iterations (default 100), written
              here after the authors' algorithm: a minimum-norm attack has no budget (eps 0); it returns, per
              example, the smallest adversarial point it found (the input itself where it found none), so one run
              gives the robust accuracy at every eps (``robust at eps`` = its smallest norm exceeds eps)
PGD's default step size is 2.5 eps / steps (Madry et al.). Every attack runs under its own seeded torch generator
state (``torch.random.fork_rng``), so results depend only on ``seed`` and the caller's global RNG is untouched.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass

import torch

ATTACKS = ("fgsm", "pgd-linf", "pgd-l2", "autoattack", "autoattack-gradients", "square", "fmn")
AUTOATTACKS = ("autoattack", "autoattack-gradients")  # AutoAttack standard, whole or its gradient-based attacks
AUTOATTACK_GRADIENT_ATTACKS = ("apgd-ce", "apgd-t", "fab-t")  # AutoAttack standard without its Square
MINIMUM_NORM_ATTACKS = ("fmn",)
NORMS = ("Linf", "L2")
_FIXED_NORM = {"fgsm": "Linf", "pgd-linf": "Linf", "pgd-l2": "L2"}
AUTOATTACK_ITERATIONS, AUTOATTACK_QUERIES = 100, 5000  # the standard version's budget
FMN_STEPS = 100  # the authors' benchmark setting


@dataclass(frozen=True)
class AttackSpec:
    """One attack and its full budget.

    name: one of ATTACKS; eps: the budget (Linf or L2 radius in pixel units, images in [0, 1]; 0 for a minimum-norm
    attack); steps: PGD, AutoAttack or FMN iterations; step_size: PGD step (None: 2.5 eps / steps); restarts: random
    starts (the evaluation keeps the worst case per example); queries: Square's query budget; norm: AutoAttack's, Square's and
    FMN's norm (the other attacks fix theirs).
    """

    name: str
    eps: float
    steps: int = 0
    step_size: float | None = None
    restarts: int = 1
    queries: int = 5000
    norm: str = "Linf"

    def __post_init__(self):
        if self.name not in ATTACKS:
            raise ValueError(f"unknown attack {self.name!r}; choose one of {', '.join(ATTACKS)}")
        if not (isinstance(self.eps, numbers.Real) and math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"{self.name}: eps must be a finite number >= 0, got {self.eps!r}")
        object.__setattr__(self, "eps", float(self.eps))
        norm = _FIXED_NORM.get(self.name, self.norm)
        if norm not in NORMS:
            raise ValueError(f"{self.name}: norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        object.__setattr__(self, "norm", norm)
        for name, low in (("steps", 0), ("restarts", 1), ("queries", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"{self.name}: {name} must be an integer >= {low}, got {value!r}")
        if self.name.startswith("pgd") and self.steps < 1:
            raise ValueError(f"{self.name}: needs steps >= 1, got {self.steps}")
        if self.name in AUTOATTACKS and self.steps == 0:
            object.__setattr__(self, "steps", AUTOATTACK_ITERATIONS)
        if self.minimum_norm:
            if self.eps != 0.0:
                raise ValueError(f"{self.name} is a minimum-norm attack: it has no budget (eps 0), got eps {self.eps}")
            if self.steps == 0:
                object.__setattr__(self, "steps", FMN_STEPS)
        if self.step_size is not None and not (isinstance(self.step_size, numbers.Real)
                                               and math.isfinite(self.step_size) and self.step_size > 0):
            raise ValueError(f"{self.name}: step_size must be a positive number or None, got {self.step_size!r}")

    @property
    def minimum_norm(self) -> bool:
        """True for an attack that looks for the smallest adversarial perturbation instead of one within eps."""
        return self.name in MINIMUM_NORM_ATTACKS

    @property
    def white_box(self) -> bool:
        """True when the attack uses input gradients (all but Square)."""
        return self.name != "square"

    @property
    def alpha(self) -> float:
        """PGD's step size: step_size, or 2.5 eps / steps."""
        return float(self.step_size) if self.step_size is not None else 2.5 * self.eps / max(self.steps, 1)

    def as_dict(self) -> dict:
        """The full budget, as recorded next to every result (step_size resolved for PGD)."""
        budget = asdict(self)
        if self.name.startswith("pgd"):
            budget["step_size"] = self.alpha
        else:
            budget.pop("step_size")
        if self.name not in ("square", "autoattack"):
            budget.pop("queries")
        if not (self.name.startswith("pgd") or self.name in AUTOATTACKS + ("fmn",)):
            budget.pop("steps")
        if self.minimum_norm:
            budget.pop("eps")
        if self.name in AUTOATTACKS:
            budget["version"] = "standard" if self.standard else "standard, reduced budget"
        return budget

    @property
    def standard(self) -> bool:
        """AutoAttack at its standard budget (100 iterations, Square 5000 queries; its gradient-based attacks alone:
        100 iterations)."""
        if self.name == "autoattack-gradients":
            return self.steps >= AUTOATTACK_ITERATIONS
        return self.steps >= AUTOATTACK_ITERATIONS and self.queries >= AUTOATTACK_QUERIES

    def describe(self) -> str:
        """A short human-readable budget, e.g. 'PGD-Linf eps 0.1, 40 steps of 0.00625, 2 restarts'."""
        label = {"fgsm": "FGSM", "pgd-linf": "PGD-Linf", "pgd-l2": "PGD-L2", "autoattack": f"AutoAttack-{self.norm}",
                 "autoattack-gradients": f"AutoAttack-{self.norm} APGD-CE, APGD-T, FAB-T",
                 "square": f"Square-{self.norm}", "fmn": f"FMN-{self.norm}"}[self.name]
        text = f"{label}, {self.steps} steps (minimum norm)" if self.minimum_norm else f"{label} eps {self.eps:g}"
        if self.name.startswith("pgd"):
            text += f", {self.steps} steps of {self.alpha:.3g}"
        if self.name == "square":
            text += f", {self.queries} queries"
        if self.name == "autoattack" and not self.standard:
            text += f" (reduced: {self.steps} iterations, Square {self.queries} queries)"
        if self.name == "autoattack-gradients" and not self.standard:
            text += f" (reduced: {self.steps} iterations)"
        if self.restarts > 1:
            text += f", {self.restarts} restarts"
        return text


def craft(source: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec, seed: int = 0) -> torch.Tensor:
    """One run of ``spec`` against ``source``: x (B, ...) images in [0, 1] (Square needs (B, C, H, W)), y (B,) int64
    labels -> x_adv, same shape, within the eps ball around x and inside [0, 1], detached."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x.shape[0]} images but {y.shape[0]} labels")
    if x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0 or not bool(torch.isfinite(x).all())):
        raise ValueError("attack inputs must be finite and lie in [0, 1]")
    if spec.name in ("square", "autoattack") and x.ndim != 4:
        raise ValueError(f"Square (alone or in AutoAttack) attacks images (B, C, H, W); got shape {tuple(x.shape)}")
    x, y = x.detach(), y.detach()
    if (spec.eps == 0.0 and not spec.minimum_norm) or x.shape[0] == 0:
        return x.clone()
    was_training = source.training
    source.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad():  # (a caller's no_grad would blind the attack)
            torch.manual_seed(int(seed))
            adv = _ATTACK_RUNNERS[spec.name](source, x, y, spec, int(seed))
    finally:
        source.train(was_training)
    return _project(adv.detach().to(x.dtype), x, spec)


def _project(adv: torch.Tensor, x: torch.Tensor, spec: AttackSpec) -> torch.Tensor:
    """Guard against a library's rounding: back into the eps ball around x (a minimum-norm attack has none) and into
    [0, 1]."""
    delta = adv - x
    if spec.minimum_norm:
        return adv.clamp(0.0, 1.0)
    if spec.norm == "Linf":
        delta = delta.clamp(-spec.eps, spec.eps)
    else:
        norms = delta.reshape(delta.shape[0], -1).norm(dim=1).clamp_min(1e-12)
        factor = torch.clamp(spec.eps / norms, max=1.0).reshape((-1,) + (1,) * (delta.ndim - 1))
        delta = delta * factor
    return (x + delta).clamp(0.0, 1.0)


def _fgsm(source, x, y, spec, seed):
    import torchattacks
    return torchattacks.FGSM(source, eps=spec.eps)(x, y)


def _pgd_linf(source, x, y, spec, seed):
    import torchattacks
    return torchattacks.PGD(source, eps=spec.eps, alpha=spec.alpha, steps=spec.steps, random_start=True)(x, y)


def _pgd_l2(source, x, y, spec, seed):
    import torchattacks
    return torchattacks.PGDL2(source, eps=spec.eps, alpha=spec.alpha, steps=spec.steps, random_start=True)(x, y)


def _autoattack(source, x, y, spec, seed):
    from pyautoattack import AutoAttack

    adversary = AutoAttack(source, norm=spec.norm, eps=spec.eps, version="standard", seed=seed, device=x.device)
    adversary.verbose = False
    if spec.name == "autoattack-gradients":  # the standard version's settings, its Square left to the caller
        adversary.attacks_to_run = list(AUTOATTACK_GRADIENT_ATTACKS)
    if not spec.standard:
        for apgd in (adversary.apgd, adversary.apgd_targeted):  # APGD derives its step-size checkpoints from n_iter
            apgd.n_iter = apgd.n_iter_orig = spec.steps
            apgd.n_iter_2, apgd.n_iter_min = max(int(0.22 * spec.steps), 1), max(int(0.06 * spec.steps), 1)
            apgd.size_decr = max(int(0.03 * spec.steps), 1)
        adversary.fab.n_iter = spec.steps
        adversary.square.n_queries = spec.queries
    adv, _ = adversary.run_standard_evaluation(x, y, batch_size=x.shape[0])
    return adv


def _square(source, x, y, spec, seed):
    from pyautoattack.square import SquareAttack

    attack = SquareAttack(source, norm=spec.norm, n_queries=spec.queries, eps=spec.eps, p_init=0.8, n_restarts=1,
                          seed=seed, verbose=False, resc_schedule=False, device=x.device)
    with torch.no_grad():
        return attack.perturb(x, y)


def perturbation_norms(adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    """||adv - x|| per example (B,), Linf or L2 over all pixels."""
    delta = (adv - x).reshape(x.shape[0], -1)
    return delta.abs().amax(dim=1) if norm == "Linf" else delta.norm(dim=1)


def _fmn(source, x, y, spec, seed, alpha_init: float = 1.0, gamma_init: float = 0.05, gamma_final: float = 0.001):
    """Fast Minimum-Norm attack (Pintor et al. 2021, arXiv 2102.12827), untargeted, Linf or L2.

    Step k (cosine-annealed alpha_k from alpha_init to alpha_init / 100, gamma_k from gamma_init to gamma_final):
      loss = max_{j != y} z_j - z_y at x + delta (> 0: adversarial, as the source decides);
      keep x + delta if adversarial and ||delta|| below the best norm so far;
      eps <- min(eps (1 - gamma), best) if adversarial; eps (1 + gamma) if one was found before; else ||delta|| +
             (1 + gamma) |loss| / ||grad||_dual (a linear step just past the boundary); eps <= the largest norm;
      delta <- project_eps(delta + alpha grad / ||grad||_2), then x + delta clipped to [0, 1].
    Two changes to the authors' algorithm, both for the first crossing of the boundary: the gradient is projected on
    the directions the box [0, 1] allows (zero where a pixel sits at 0 or 1 and the gradient points outside) before
    the step and the linear estimate, and the estimate overshoots by a factor 1 + gamma. Without them the estimate
    approaches the boundary from inside and never crosses it (measured on the digits baseline: 27 % of the L2 attacks
    found an adversarial point). Returns the best adversarial point per example (x where none was found)."""
    batch = x.shape[0]
    order, dual = (math.inf, 1) if spec.norm == "Linf" else (2, 2)

    def per_example(t):
        return t.reshape((batch,) + (1,) * (x.ndim - 1))

    def norms(t):
        return t.reshape(batch, -1).norm(p=order, dim=1)

    largest = norms(torch.maximum(x, 1 - x))
    best_norm, best = largest.clone(), x.clone()
    epsilon = torch.full((batch,), math.inf, dtype=x.dtype)
    found = torch.zeros(batch, dtype=torch.bool)
    own_mask = None  # +inf at the label: what max over the other classes ignores
    delta = torch.zeros_like(x, requires_grad=True)
    for step in range(spec.steps):
        cosine = (1 + math.cos(math.pi * step / spec.steps)) / 2
        alpha = alpha_init / 100 + (alpha_init - alpha_init / 100) * cosine
        gamma = gamma_final + (gamma_init - gamma_final) * cosine
        size = norms(delta.detach())
        logits = source(x + delta)
        if own_mask is None:
            own_mask = torch.zeros_like(logits.detach()).scatter(1, y[:, None], math.inf)
        loss = (logits - own_mask).amax(dim=1) - logits.gather(1, y[:, None]).squeeze(1)
        (grad,) = torch.autograd.grad(loss.sum(), delta)
        point = (x + delta).detach()  # directions that leave [0, 1] are no directions: the box would undo them
        grad = torch.where(((point >= 1) & (grad > 0)) | ((point <= 0) & (grad < 0)), torch.zeros_like(grad), grad)
        adversarial = logits.detach().argmax(dim=1) != y
        better = adversarial & (size < best_norm)
        found |= adversarial
        best_norm = torch.where(better, size, best_norm)
        best = torch.where(per_example(better), (x + delta).detach(), best)
        to_boundary = loss.detach().abs() / grad.reshape(batch, -1).norm(p=dual, dim=1).clamp_min(1e-12)
        epsilon = torch.where(adversarial, torch.minimum(epsilon * (1 - gamma), best_norm),
                              torch.where(found, epsilon * (1 + gamma), size + (1 + gamma) * to_boundary))
        epsilon = torch.minimum(epsilon, largest)
        with torch.no_grad():
            moved = delta + alpha * grad / per_example(grad.reshape(batch, -1).norm(dim=1).clamp_min(1e-12))
            if spec.norm == "Linf":
                moved = torch.maximum(torch.minimum(moved, per_example(epsilon)), -per_example(epsilon))
            else:
                moved = moved * per_example(torch.clamp(epsilon / norms(moved).clamp_min(1e-12), max=1.0))
            delta.copy_((x + moved).clamp(0.0, 1.0) - x)
    return best


_ATTACK_RUNNERS = {"fgsm": _fgsm, "pgd-linf": _pgd_linf, "pgd-l2": _pgd_l2, "autoattack": _autoattack,
                   "autoattack-gradients": _autoattack, "square": _square, "fmn": _fmn}

"""The budget of a robustness evaluation (every number that determines its result), with per-dataset defaults."""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, replace

AUTOATTACK_NORMS = ("Linf", "L2")  # AutoAttack's threat models (autoattack_norms)
EBM_GRADIENTS = ("bptt", "implicit", "transfer")  # an EBM's gradient sources (see distill.robustness.models)
BLACK_BOX_SOURCE = "black-box"  # the "source" of a score-based attack: the deployed model's logits, queried

# The "as published" protocol (lanl/AdvEP on convolutional EBMs): predict with every deployed step, backpropagate
# through the first K unrolled steps only (``LayeredEBMClassifier(attack_steps=K)``); the published code used 29.
PUBLISHED_ATTACK_STEPS = 29
# Checkpointing rule of ``checkpoint_steps="auto"``: a BPTT source that differentiates through more than
# CHECKPOINT_ABOVE steps is checkpointed in pieces of CHECKPOINT_PIECE steps (same gradient; memory figures in
# README.md, "Robustness evaluation": 128 images x 250 steps of the cifar10-cpu preset 7.9 GiB plain, 1.3 GiB in
# pieces of 10).
CHECKPOINT_ABOVE, CHECKPOINT_PIECE = 50, 10


@dataclass(frozen=True)
class SideSource:
    """A gradient source reported beside a model's worst case, never in it (its own row in the report):
    ``label`` (``{steps}``: its attack steps), ``paired_with``, the source whose random draws (PGD starts,
    restarts, AutoAttack's seed) it shares, so that the two differ by the gradient alone, and ``paired_label``, the
    label of that source's own row beside it."""

    label: str
    paired_with: str
    paired_label: str


#: side sources by name (distill.robustness.models builds them; the report keeps them out of the worst case)
AS_PUBLISHED_SOURCE = "bptt-truncated"
SIDE_SOURCES = {AS_PUBLISHED_SOURCE: SideSource("as published (first {steps} unrolled steps)", "bptt",
                                                "full BPTT alone")}

# Budgets in pixel units (images in [0, 1]). (Fashion-)MNIST: Linf 0.1 and L2 1.5 are the usual budgets for 28x28
# grayscale images (Madry et al. 2018 used Linf 0.3 on MNIST); CIFAR-10: Linf 8/255 and L2 0.5 (RobustBench).
# The 8x8 digits (64 pixels) get budgets scaled to their size.
DATASET_BUDGETS = {
    "digits": {"eps_linf": 0.1, "eps_l2": 0.5, "sweep_linf": (0.0, 0.05, 0.1, 0.2, 0.3),
               "sweep_l2": (0.0, 0.25, 0.5, 1.0, 2.0)},
    "fashion-mnist": {"eps_linf": 0.1, "eps_l2": 1.5, "sweep_linf": (0.0, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3),
                      "sweep_l2": (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)},
    "mnist": {"eps_linf": 0.3, "eps_l2": 2.0, "sweep_linf": (0.0, 0.05, 0.1, 0.2, 0.3, 0.4),
              "sweep_l2": (0.0, 0.5, 1.0, 2.0, 3.0, 4.0)},
    "cifar10": {"eps_linf": 8 / 255, "eps_l2": 0.5, "sweep_linf": (0.0, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 32 / 255),
                "sweep_l2": (0.0, 0.25, 0.5, 1.0, 2.0)},
}
DATASET_BUDGETS["cifar100"] = DATASET_BUDGETS["cifar10"]


@dataclass(frozen=True)
class RobustnessConfig:
    """What a robustness evaluation runs.

    eps_linf / eps_l2: the budgets of the table's columns (FGSM, PGD-Linf, AutoAttack-Linf, Square at eps_linf;
    PGD-L2 and AutoAttack-L2 at eps_l2); sweep_linf / sweep_l2: the eps sweeps (PGD at each eps, the minimum-norm
    attack's curve and AutoAttack at the table's eps, worst case per example; the table's values are included
    automatically). min_norm: run the minimum-norm attack (FMN, Linf and L2, ``min_norm_steps`` iterations) on the
    attacked examples; autoattack runs AutoAttack in ``autoattack_norms`` ("Linf", "L2" or both, the default).
    pgd_steps, pgd_restarts, pgd_step_size (None: 2.5 eps / steps): PGD's budget. audit_steps, audit_restarts,
    audit_samples: the stronger PGD of the audit (on the first audit_samples examples). autoattack / square: run them;
    square_queries: Square's budget (also AutoAttack's Square, run once per model on the deployed model: one part with
    the standalone Square where the examples are the same); autoattack_iterations: AutoAttack's APGD / FAB
    iterations (standard: 100; fewer, or fewer than 5000 queries, is reported as a reduced AutoAttack). samples: test
    examples attacked (PGD, FGSM, the minimum-norm attack); autoattack_samples: those attacked by AutoAttack (the first
    ones of the same draw; None: all ``samples``); square_samples: those for Square (the first ones of the same draw);
    a column that combines attacks run on different numbers of examples (L2: PGD on ``samples``, AutoAttack on
    ``autoattack_samples``) takes the worst case per example over the attacks that ran on it; corruption_samples:
    test examples corrupted (None: all); corruptions (None: all 15) and severities. seed: draw of the examples and every attack's randomness.
    batch_size: examples per attacked chunk (the unit of resume). slack: how far (accuracy, absolute) a result may
    go the wrong way before an audit check fails (e.g. PGD above FGSM by more than slack); zero_accuracy: the
    largest-eps accuracy at or below which "reaches 0" holds; max_zero_gradients: the largest share of examples
    with an all-zero input gradient a gradient source may have.
    as_published: also attack a layered (convolutional) EBM "as published": the gradient source "bptt-truncated"
    (every deployed step predicts, the gradient is that of the first ``as_published_steps`` unrolled steps, K = 29
    by default as in the published code), reported in its own row beside full BPTT and *not* in the worst case over
    the EBM's sources (the audit fails the model if it is stronger than that worst case; README.md, "Robustness
    evaluation"). checkpoint_steps: memory of the layered EBMs' BPTT sources: "auto" (checkpoint pieces of
    CHECKPOINT_PIECE steps when a source differentiates through more than CHECKPOINT_ABOVE steps), an integer C
    (pieces of C steps always), or None / "none" (never); the gradient is the same either way. A dense EBM's BPTT
    (the Torch twin) has neither option: as_published refuses it, checkpoint_steps does not apply.
    """

    eps_linf: float = 0.1
    eps_l2: float = 1.5
    sweep_linf: tuple = (0.0, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3)
    sweep_l2: tuple = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
    pgd_steps: int = 40
    pgd_restarts: int = 1
    pgd_step_size: float | None = None
    audit_steps: int = 100
    audit_restarts: int = 3
    audit_samples: int = 200
    autoattack: bool = True
    autoattack_norms: tuple = ("Linf", "L2")
    autoattack_iterations: int = 100
    min_norm: bool = True
    min_norm_steps: int = 100
    square: bool = True
    square_queries: int = 5000
    samples: int = 1000
    autoattack_samples: int | None = None
    square_samples: int = 500
    corruption_samples: int | None = None
    corruptions: tuple | None = None
    severities: tuple = (1, 2, 3, 4, 5)
    seed: int = 0
    batch_size: int = 250
    slack: float = 0.02
    zero_accuracy: float = 0.02
    max_zero_gradients: float = 0.01
    as_published: bool = False
    as_published_steps: int = PUBLISHED_ATTACK_STEPS
    checkpoint_steps: int | str | None = "auto"

    def __post_init__(self):
        for name in ("eps_linf", "eps_l2"):
            value = getattr(self, name)
            if not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        for name in ("sweep_linf", "sweep_l2"):
            values = tuple(float(v) for v in getattr(self, name))
            if any(not math.isfinite(v) or v < 0 for v in values):
                raise ValueError(f"{name} must hold finite budgets >= 0, got {getattr(self, name)!r}")
            table = self.eps_linf if name == "sweep_linf" else self.eps_l2
            object.__setattr__(self, name, tuple(sorted(set(values) | {0.0, float(table)})))
        for name, low in (("pgd_steps", 1), ("pgd_restarts", 1), ("audit_steps", 1), ("audit_restarts", 1),
                          ("audit_samples", 1), ("square_queries", 1), ("autoattack_iterations", 1), ("min_norm_steps", 1), ("samples", 1), ("square_samples", 1),
                          ("batch_size", 1), ("as_published_steps", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        norms = (self.autoattack_norms,) if isinstance(self.autoattack_norms, str) else tuple(self.autoattack_norms)
        if not norms or any(n not in AUTOATTACK_NORMS for n in norms) or len(set(norms)) != len(norms):
            raise ValueError(f"autoattack_norms must be distinct names among {', '.join(AUTOATTACK_NORMS)}, got "
                             f"{self.autoattack_norms!r}")
        object.__setattr__(self, "autoattack_norms", tuple(n for n in AUTOATTACK_NORMS if n in norms))
        if self.autoattack_samples is not None and (isinstance(self.autoattack_samples, bool) or not isinstance(
                self.autoattack_samples, numbers.Integral) or self.autoattack_samples < 1):
            raise ValueError(f"autoattack_samples must be None (all samples) or an integer >= 1, got "
                             f"{self.autoattack_samples!r}")
        if self.corruption_samples is not None and (isinstance(self.corruption_samples, bool) or not isinstance(
                self.corruption_samples, numbers.Integral) or self.corruption_samples < 0):
            raise ValueError(f"corruption_samples must be None (all) or an integer >= 0, got "
                             f"{self.corruption_samples!r}")
        if any(s not in (1, 2, 3, 4, 5) for s in self.severities):
            raise ValueError(f"severities must lie in 1..5, got {self.severities!r}")
        object.__setattr__(self, "severities", tuple(int(s) for s in self.severities))
        if self.corruptions is not None:
            from distill.corruptions import CORRUPTIONS

            names = (self.corruptions,) if isinstance(self.corruptions, str) else tuple(self.corruptions)
            unknown = [name for name in names if name not in CORRUPTIONS]
            if unknown or not names:
                raise ValueError(f"unknown corruption(s) {', '.join(map(repr, unknown)) or '(none given)'}; valid "
                                 f"names: {', '.join(CORRUPTIONS)}")
            object.__setattr__(self, "corruptions", names)
        if not isinstance(self.as_published, bool):
            raise ValueError(f"as_published must be True or False, got {self.as_published!r}")
        if isinstance(self.checkpoint_steps, str) and self.checkpoint_steps.lower() in ("none", "never"):
            object.__setattr__(self, "checkpoint_steps", None)  # (TOML has no None)
        if self.checkpoint_steps != "auto" and self.checkpoint_steps is not None and (
                isinstance(self.checkpoint_steps, bool) or not isinstance(self.checkpoint_steps, numbers.Integral)
                or self.checkpoint_steps < 1):
            raise ValueError(f"checkpoint_steps must be 'auto', None (never) or an integer >= 1, got "
                             f"{self.checkpoint_steps!r}")
        for name in ("slack", "zero_accuracy", "max_zero_gradients"):
            value = getattr(self, name)
            if not (isinstance(value, numbers.Real) and 0 <= value <= 1):
                raise ValueError(f"{name} must be a share in [0, 1], got {value!r}")

    @classmethod
    def for_dataset(cls, dataset: str, **overrides) -> "RobustnessConfig":
        """The defaults with the dataset's budgets (DATASET_BUDGETS), then ``overrides``."""
        return cls(**{**DATASET_BUDGETS.get(dataset, {}), **overrides})

    def checkpoint_for(self, steps: int) -> int | None:
        """The ``checkpoint_steps`` of a BPTT source that differentiates through ``steps`` steps (None: plain
        BPTT), by this configuration's rule (see the class docstring)."""
        if self.checkpoint_steps == "auto":
            return CHECKPOINT_PIECE if steps > CHECKPOINT_ABOVE else None
        return None if self.checkpoint_steps is None else int(self.checkpoint_steps)

    def with_(self, **changes) -> "RobustnessConfig":
        return replace(self, **changes)

    def as_dict(self) -> dict:
        return asdict(self)

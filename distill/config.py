"""Configurations of distillation and baseline training (plain dataclasses, validated on creation; no torch, so the
command line can read their defaults without importing it)."""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass

SCHEDULES = ("constant", "cosine")
OUTPUT_TARGETS = ("ebm", "labels")
STATE_LOSSES = ("matching", "mse")
BASELINE_KINDS = ("standard", "pgd-at")

#: PGD of adversarial training per dataset family (pixel units, inputs in [0, 1]); open: add a family here.
#:   mnist  eps 0.1, 10 steps of 0.025 (2.5 eps / steps): the toolkit's default, (Fashion-)MNIST and digits
#:   cifar  eps 8/255, 7 steps of 2/255, random start: Madry et al. 2018's CIFAR-10 PGD-AT (RobustBench's threat
#:          model), kept at 7 steps for a CPU budget (each training step costs 1 + 7 forward/backward passes)
PGD_PRESETS = {
    "mnist": {"eps": 0.1, "pgd_steps": 10, "pgd_step_size": 0.025},
    "cifar": {"eps": 8 / 255, "pgd_steps": 7, "pgd_step_size": 2 / 255, "augment": "crop_flip"},
}
#: dataset name -> PGD_PRESETS family (names as ebm_sim.datasets spells them)
DATASET_FAMILIES = {"digits": "mnist", "mnist": "mnist", "fashion-mnist": "mnist", "fashion_mnist": "mnist",
                    "cifar10": "cifar", "cifar-10": "cifar", "cifar100": "cifar", "cifar-100": "cifar"}


@dataclass
class FitConfig:
    """Optimization settings: epochs (max), batch_size, lr (Adam), weight_decay (L2 in Adam), patience (epochs
    without a lower validation loss before stopping; None: never stop early), val_fraction (held-out share of
    the training set; 0: none), seed (init, split, batch order, PGD starts), schedule ("constant" or "cosine":
    lr_e = lr (1 + cos(pi e / epochs)) / 2 in epoch e = 0..epochs-1)."""

    epochs: int = 50
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int | None = 10
    val_fraction: float = 0.1
    seed: int = 0
    schedule: str = "constant"

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.patience is not None and not (isinstance(self.patience, numbers.Integral) and self.patience >= 1):
            raise ValueError(f"patience must be a positive integer or None, got {self.patience!r}")
        for name, low, high in (("lr", 0.0, None), ("weight_decay", 0.0, None), ("val_fraction", 0.0, 1.0)):
            value = getattr(self, name)
            if not (isinstance(value, numbers.Real) and math.isfinite(value) and value >= low
                    and (high is None or value < high)):
                bounds = f">= {low}" + (f" and < {high}" if high is not None else "")
                raise ValueError(f"{name} must be a finite number {bounds}, got {value!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not isinstance(self.seed, numbers.Integral):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    def as_dict(self) -> dict:
        return asdict(self)

    def epoch_lr(self, epoch: int) -> float:
        """The learning rate of epoch ``epoch`` (0-based)."""
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs))
        return self.lr


@dataclass
class DistillConfig(FitConfig):
    """FitConfig (epochs, batch_size, lr, weight_decay, patience, val_fraction, seed) plus the loss weights:
    layer_weight (w_k: a number for every state layer or a list, one per layer), output_weight (w_out, >= 0),
    output_target ("ebm" or "labels"), init_from_ebm (start from the EBM's forward weights W_k, b_k), state_loss
    ("matching": the hard sigmoid's matching loss of the pre-activation, = the state MSE inside [0, 1]; or "mse")."""

    epochs: int = 30
    schedule: str = "cosine"
    layer_weight: float | list = 1.0
    output_weight: float = 0.1
    output_target: str = "ebm"
    init_from_ebm: bool = False
    state_loss: str = "matching"

    def __post_init__(self):
        super().__post_init__()
        weights = self.layer_weight if isinstance(self.layer_weight, (list, tuple)) else [self.layer_weight]
        for w in list(weights) + [self.output_weight]:
            if not (isinstance(w, numbers.Real) and math.isfinite(w) and w >= 0):
                raise ValueError(f"loss weights must be finite and >= 0, got layer_weight={self.layer_weight!r}, "
                                 f"output_weight={self.output_weight!r}")
        if isinstance(self.layer_weight, tuple):
            self.layer_weight = list(self.layer_weight)
        if self.output_target not in OUTPUT_TARGETS:
            raise ValueError(f"output_target must be one of {', '.join(OUTPUT_TARGETS)}, got {self.output_target!r}")
        if self.state_loss not in STATE_LOSSES:
            raise ValueError(f"state_loss must be one of {', '.join(STATE_LOSSES)}, got {self.state_loss!r}")
        if not isinstance(self.init_from_ebm, bool):
            raise ValueError(f"init_from_ebm must be a bool, got {self.init_from_ebm!r}")

    def layer_weights(self, num_states: int) -> list:
        """w_1..w_K for K state layers."""
        if isinstance(self.layer_weight, list):
            if len(self.layer_weight) != num_states:
                raise ValueError(f"{len(self.layer_weight)} layer weights given for {num_states} state layers: give "
                                 f"one per layer or a single value")
            return [float(w) for w in self.layer_weight]
        return [float(self.layer_weight)] * num_states


@dataclass
class BaselineConfig(FitConfig):
    """FitConfig (epochs, batch_size, lr, weight_decay, patience, val_fraction, seed) plus kind ("standard" or
    "pgd-at") and the PGD of adversarial training: eps, pgd_steps, pgd_step_size (default 2.5 eps / steps),
    random_start; augment: "none" or "crop_flip" (each training batch randomly cropped from its 4-pixel zero padding
    and flipped, seeded by the epoch's generator: the CIFAR recipe, as the EBM presets train; images only). Early
    stopping watches the validation loss of the training objective (adversarial for pgd-at)."""

    epochs: int = 30
    schedule: str = "cosine"
    kind: str = "standard"
    augment: str = "none"
    eps: float = 0.1
    pgd_steps: int = 10
    pgd_step_size: float | None = 0.025
    random_start: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.kind not in BASELINE_KINDS:
            raise ValueError(f"unknown baseline kind {self.kind!r}; choose one of {', '.join(BASELINE_KINDS)}")
        from ebm_sim.training import AUGMENTATIONS
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"unknown augment {self.augment!r}; choose one of {', '.join(AUGMENTATIONS)}")
        if not (isinstance(self.eps, numbers.Real) and math.isfinite(self.eps) and 0 <= self.eps <= 1):
            raise ValueError(f"eps must be in [0, 1] (pixel units), got {self.eps!r}")
        if not (isinstance(self.pgd_steps, numbers.Integral) and self.pgd_steps >= 1):
            raise ValueError(f"pgd_steps must be a positive integer, got {self.pgd_steps!r}")
        if self.pgd_step_size is not None and not (isinstance(self.pgd_step_size, numbers.Real)
                                                   and math.isfinite(self.pgd_step_size) and self.pgd_step_size > 0):
            raise ValueError(f"pgd_step_size must be a positive number, got {self.pgd_step_size!r}")

    @classmethod
    def for_dataset(cls, dataset: str, **fields) -> "BaselineConfig":
        """A configuration with the recipe of ``dataset``'s family (``PGD_PRESETS`` via ``DATASET_FAMILIES``: the PGD
        budget, and CIFAR's crop+flip augmentation);
        ``fields`` override any field (kind, epochs, eps, ...)."""
        family = DATASET_FAMILIES.get(str(dataset).lower())
        if family is None:
            raise ValueError(f"no PGD preset for dataset {dataset!r}; known: {', '.join(sorted(DATASET_FAMILIES))} "
                             f"(or give eps, pgd_steps and pgd_step_size)")
        return cls(**{**PGD_PRESETS[family], **fields})

    @property
    def step_size(self) -> float:
        return 2.5 * self.eps / self.pgd_steps if self.pgd_step_size is None else float(self.pgd_step_size)

"""The configuration of ``ebm pipeline``: every budget of every stage, with defaults per dataset, from flags or a
TOML / YAML file, recorded in full in the report.

    config = PipelineConfig.for_dataset("digits")                       # the defaults (fit in 5 minutes)
    config = PipelineConfig.from_file("study.toml")                     # dataset + any section overrides
    config.section("train")  ->  ebm_sim.training.TrainConfig(...)

A file holds top-level keys (dataset, data_dir, seed, torch_threads: torch's intra-op threads, 0 for its default;
the digits default is 1, faster for tiny models; limit_train / limit_test: seeded class-stratified subsamples of the
splits, for a quick look at a large dataset) and sections, each optional and holding only what differs
from the dataset's defaults:
  [network]      layers, gain, activation
  [train]        ebm_sim.training.TrainConfig fields (EP: epochs, batch_size, beta, lr, free_steps, ...)
  [distill]      distill.config.DistillConfig fields
  [standard], [pgd_at]   distill.config.BaselineConfig fields of the two baselines
  [robustness]   distill.robustness.RobustnessConfig fields
  [hardware]     limit (test samples compared), lava_limit (samples through Lava), latency_samples, repeats, batch,
                 targets (hardware.targets.TARGETS names)
  [report]       trajectory_samples (test images whose relaxation is plotted per integrator)
Unknown sections or keys are refused with a message naming them. The deployed relaxation of the EBM (what
prediction, fixed points, attacks and Lava use) is the free phase it was trained with: train.method, train.tol,
train.free_steps.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

TOP_KEYS = ("dataset", "data_dir", "seed", "torch_threads", "limit_train", "limit_test")
SECTIONS = ("network", "train", "distill", "standard", "pgd_at", "robustness", "hardware", "report")
HARDWARE_KEYS = {"limit": None, "lava_limit": 100, "latency_samples": 100, "repeats": 5, "batch": 256,
                 "targets": None}
REPORT_KEYS = {"trajectory_samples": 16}

# Per-dataset defaults. digits: the whole study in under 5 minutes on a 2-core CPU (AutoAttack and Square at a
# reduced budget, said so in the report); fashion-mnist / cifar10: the benchmarks' recipes (hours on a CPU).
DEFAULTS = {
    "digits": {
        "network": {"layers": [64, 256, 10], "gain": 1.0, "activation": "hard_sigmoid"},
        "train": {"epochs": 15, "batch_size": 32, "beta": 0.5, "lr": 2e-3, "schedule": "cosine", "free_steps": 30,
                  "nudged_steps": 10, "tol": 1e-4},
        "distill": {"epochs": 30},
        "standard": {"epochs": 30},
        "pgd_at": {"epochs": 30, "eps": 0.1, "pgd_steps": 10, "pgd_step_size": 0.025},
        "robustness": {"samples": 200, "square_samples": 100, "audit_samples": 100, "pgd_steps": 20,
                       "audit_steps": 50, "audit_restarts": 2, "autoattack_iterations": 20, "square_queries": 500,
                       "min_norm_steps": 50, "batch_size": 100},
        "hardware": {"lava_limit": 100, "latency_samples": 50, "repeats": 3},
    },
    "fashion-mnist": {
        "network": {"layers": [784, 512, 512, 10], "gain": 1.0, "activation": "hard_sigmoid"},
        "train": {"epochs": 10, "batch_size": 50, "beta": 0.5, "lr": [1e-3, 5e-4, 2e-4], "schedule": "cosine",
                  "free_steps": 30, "nudged_steps": 10, "tol": 1e-4},
        "distill": {"epochs": 30},
        "standard": {"epochs": 30},
        "pgd_at": {"epochs": 10, "eps": 0.1, "pgd_steps": 10, "pgd_step_size": 0.025},
        "robustness": {},
        "hardware": {"lava_limit": 200},
    },
    "mnist": {
        "network": {"layers": [784, 512, 10], "gain": 1.0, "activation": "hard_sigmoid"},
        "train": {"epochs": 15, "batch_size": 50, "beta": 0.5, "lr": 1e-3, "schedule": "cosine", "free_steps": 30,
                  "nudged_steps": 10, "tol": 1e-4},
        "distill": {"epochs": 30},
        "standard": {"epochs": 30},
        "pgd_at": {"epochs": 10, "eps": 0.3, "pgd_steps": 10, "pgd_step_size": 0.075},
        "robustness": {},
        "hardware": {"lava_limit": 200},
    },
    "cifar10": {
        "network": {"layers": [3072, 1024, 10], "gain": 1.0, "activation": "hard_sigmoid"},
        "train": {"epochs": 20, "batch_size": 50, "beta": 0.5, "lr": 5e-4, "schedule": "cosine", "free_steps": 30,
                  "nudged_steps": 10, "tol": 1e-4},
        "distill": {"epochs": 30},
        "standard": {"epochs": 30},
        "pgd_at": {"epochs": 10, "eps": 8 / 255, "pgd_steps": 10, "pgd_step_size": 2 / 255},
        "robustness": {},
        "hardware": {"lava_limit": 100},
    },
}
DEFAULTS["cifar100"] = copy.deepcopy(DEFAULTS["cifar10"])
DEFAULTS["cifar100"]["network"]["layers"] = [3072, 1024, 100]


@dataclass
class PipelineConfig:
    """dataset, data_dir, seed and one dict of overrides-merged-with-defaults per section (see the module doc)."""

    dataset: str = "digits"
    data_dir: str | None = None
    seed: int = 0
    torch_threads: int | None = None
    limit_train: int | None = None
    limit_test: int | None = None
    sections: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.dataset not in DEFAULTS:
            raise ValueError(f"the pipeline has no defaults for dataset {self.dataset!r}; choose one of "
                             f"{', '.join(DEFAULTS)}")
        unknown = sorted(set(self.sections) - set(SECTIONS))
        if unknown:
            raise ValueError(f"unknown configuration section(s) {', '.join(unknown)}; the sections are "
                             f"{', '.join(SECTIONS)}")
        if self.torch_threads is None:  # tiny models: one thread beats OpenMP's spin-waiting on a busy machine
            self.torch_threads = 1 if self.dataset == "digits" else 0
        if isinstance(self.torch_threads, bool) or not isinstance(self.torch_threads, int) or self.torch_threads < 0:
            raise ValueError(f"torch_threads must be an integer >= 0 (0: torch's default), got {self.torch_threads!r}")
        for name in ("limit_train", "limit_test"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive number of samples or absent, got {value!r}")
        merged = {}
        for name in SECTIONS:
            base = dict(DEFAULTS[self.dataset].get(name, {}))
            if name == "hardware":
                base = {**HARDWARE_KEYS, **base}
            if name == "report":
                base = {**REPORT_KEYS, **base}
            given = self.sections.get(name) or {}
            if not isinstance(given, dict):
                raise ValueError(f"configuration section [{name}] must be a table of keys, got {given!r}")
            merged[name] = {**base, **given}
        self.sections = merged
        self.validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_dataset(cls, dataset: str, **top) -> "PipelineConfig":
        return cls(dataset=dataset, **top)

    @classmethod
    def from_dict(cls, data: dict) -> "PipelineConfig":
        data = dict(data)
        top = {k: data.pop(k) for k in TOP_KEYS if k in data}
        return cls(**top, sections=data)

    @classmethod
    def from_file(cls, path, **overrides) -> "PipelineConfig":
        """Read a .toml, .yaml or .yml file; ``overrides`` (dataset, data_dir, seed given as flags) win."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such configuration file: {path}")
        if path.suffix not in (".toml", ".yaml", ".yml"):
            raise ValueError(f"{path}: a configuration file is .toml, .yaml or .yml")
        text = path.read_text()
        try:
            if path.suffix == ".toml":
                import tomllib
                data = tomllib.loads(text)
            else:
                import yaml
                data = yaml.safe_load(text) or {}
        except Exception as error:  # tomllib.TOMLDecodeError, yaml.YAMLError
            raise ValueError(f"{path} is not valid {path.suffix[1:].upper()}: {error}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the configuration must be a mapping of keys and sections")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data)

    # ------------------------------------------------------------------ views
    def validate(self) -> None:
        """Build every section's config object once: unknown keys and bad values are refused before any work."""
        for name in ("train", "distill", "standard", "pgd_at", "robustness"):
            self.section(name)
        unknown_network = sorted(set(self.sections["network"]) - {"layers", "gain", "activation"})
        for section, allowed in (("hardware", HARDWARE_KEYS), ("report", REPORT_KEYS)):
            unknown = sorted(set(self.sections[section]) - set(allowed))
            if unknown:
                raise ValueError(f"unknown key(s) in [{section}]: {', '.join(unknown)}; allowed: {', '.join(allowed)}")
        if unknown_network:
            raise ValueError(f"unknown key(s) in [network]: {', '.join(unknown_network)}; allowed: layers, gain, "
                             f"activation")
        try:
            self.section("train").layer_rates(len(self.sections["network"]["layers"]) - 1)
        except ValueError as error:
            raise ValueError(f"[train] lr does not fit [network] layers {self.sections['network']['layers']}: "
                             f"{error}") from None
        from hardware.mapping import LAVA_METHODS
        if self.sections["train"].get("method", "fixed_point") not in LAVA_METHODS:
            raise ValueError(f"the pipeline maps the EBM onto Lava, whose dynamics are synchronous Euler: train.method "
                             f"must be one of {', '.join(LAVA_METHODS)}")

    def section(self, name: str):
        """The section as the library's config object (TrainConfig, DistillConfig, BaselineConfig,
        RobustnessConfig), or a plain dict (network, hardware, report)."""
        values = dict(self.sections[name])
        try:
            if name == "train":
                from ebm_sim.training import TrainConfig
                return TrainConfig(**{"seed": self.seed, **values})
            if name == "distill":
                from distill.config import DistillConfig
                return DistillConfig(**{"seed": self.seed, **values})
            if name in ("standard", "pgd_at"):
                from distill.config import BaselineConfig
                return BaselineConfig(**{"seed": self.seed, **values,
                                         "kind": "standard" if name == "standard" else "pgd-at"})
            if name == "robustness":
                from distill.robustness.config import RobustnessConfig
                return RobustnessConfig.for_dataset(self.dataset, **{"seed": self.seed, **values})
        except TypeError as error:  # an unexpected keyword: name the section
            raise ValueError(f"[{name}]: {error}".replace("__init__() got an ", "")) from None
        except ValueError as error:
            raise ValueError(f"[{name}]: {error}") from None
        return values

    @property
    def deployment(self):
        """The EBM's deployed relaxation (an ``ebm_sim.deployment.Deployment``): its training free phase."""
        from ebm_sim.deployment import Deployment
        return Deployment.of_train_config(self.section("train"))

    def as_dict(self) -> dict:
        """The full configuration (every default filled in), as the report records it."""
        return {**{k: getattr(self, k) for k in TOP_KEYS}, **copy.deepcopy(self.sections)}

    def digest(self, *names) -> str:
        """SHA-256 of the top-level keys and the named sections (what a stage depends on)."""
        chosen = {"dataset": self.dataset, "seed": self.seed, "limit_train": self.limit_train,
                  "limit_test": self.limit_test, **{n: self.sections[n] for n in names}}
        return hashlib.sha256(json.dumps(chosen, sort_keys=True, default=str).encode()).hexdigest()

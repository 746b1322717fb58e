"""The configuration of ``ebm pipeline``: every budget of every stage, with defaults per dataset, from flags or a
TOML / YAML file, recorded in full in the report.

    config = PipelineConfig.for_dataset("digits")                       # the defaults (fit in 5 minutes)
    config = PipelineConfig.from_file("study.toml")                     # dataset + any section overrides
    config = PipelineConfig(dataset="cifar10", sections={"network": {"preset": "cifar10-cpu-lava"}})  # conv study
    config = PipelineConfig(dataset="cifar10", quick=True, sections={"network": {"arch": "3x32x32, ..."}})
    config.section("train")  ->  ebm_sim.training.TrainConfig(...)

A file holds top-level keys (dataset, data_dir, seed, torch_threads: torch's intra-op threads, 0 for its default;
the digits default is 1, faster for tiny models; limit_train / limit_test: seeded class-stratified subsamples of the
splits, for a quick look at a large dataset; quick: the QUICK budget below, for smoke tests; cluster: "local", "auto"
or a Ray address, to run the relax and robustness stages' parallel work on Ray, with the same results: see
docs/scaling.md) and sections, each
optional and holding only what differs from the dataset's defaults:
  [network]      layers, gain, activation (a dense EBM), or arch (a spec of ebm_sim.model.spec, e.g.
                 "3x32x32, conv 16 k3 p1 avgpool, readout 10") or preset (ebm_sim.model.presets) for a
                 convolutional (layered) EBM: the convolutional study (CONV_DEFAULTS)
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

The convolutional study (network.arch or network.preset) starts from CONV_DEFAULTS[dataset] instead of DEFAULTS:
its [train] section is the preset's training recipe (ebm_sim.model.presets; for a bare arch the cifar10-cpu-lava
recipe) with the budget's keys (epochs, ...) on top, cost cross_entropy when the spec ends in "readout N" (else mse),
and the preset's activation and input normalization. Each (dataset, kind) states its CPU budget in BUDGET_NOTES;
quick = true lays QUICK (and QUICK_LIMITS for the CIFAR sets) over the defaults, before the file's own sections.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

TOP_KEYS = ("dataset", "data_dir", "seed", "torch_threads", "limit_train", "limit_test", "quick", "cluster")
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

DENSE_NETWORK_KEYS = ("layers", "gain", "activation")
CONV_NETWORK_KEYS = ("arch", "preset", "gain", "activation")
#: the training recipe of a bare network.arch (a preset brings its own): cifar10-cpu-lava's (Adam 1e-3, batch 32,
#: synchronous fixed_point updates T1 30 / T2 10, symmetric beta 0.5, crop+flip on CIFAR)
CONV_RECIPE = "cifar10-cpu-lava"
_CIFAR_CONV = {
    "train": {"epochs": 24},
    "distill": {"epochs": 15},
    "standard": {"epochs": 15},
    "pgd_at": {"epochs": 10, "eps": 8 / 255, "pgd_steps": 7, "pgd_step_size": 2 / 255},
    "robustness": {"samples": 100, "square_samples": 50, "audit_samples": 50, "pgd_steps": 20, "audit_steps": 50,
                   "audit_restarts": 2, "autoattack_iterations": 20, "square_queries": 500, "min_norm_steps": 50,
                   "corruption_samples": 500, "batch_size": 50},
    "hardware": {"lava_limit": 20, "latency_samples": 20, "repeats": 3},
    "report": {"trajectory_samples": 8},
}
# Per-dataset defaults of the convolutional study (the network is the given network.arch / network.preset).
# cifar10 / cifar100: a 2-core CPU budget (BUDGET_NOTES states it: hours); digits (1x8x8 images): a few minutes.
CONV_DEFAULTS = {
    "digits": {
        "train": {"epochs": 10, "batch_size": 32, "free_steps": 20, "nudged_steps": 8, "tol": 1e-4,
                  "augment": "none"},
        "distill": {"epochs": 20},
        "standard": {"epochs": 20},
        "pgd_at": {"epochs": 20, "eps": 0.1, "pgd_steps": 10, "pgd_step_size": 0.025},
        "robustness": {**DEFAULTS["digits"]["robustness"], "samples": 100, "square_samples": 50,
                       "audit_samples": 50},
        "hardware": {"lava_limit": 50, "latency_samples": 20, "repeats": 3},
        "report": {"trajectory_samples": 8},
    },
    "cifar10": _CIFAR_CONV,
    "cifar100": _CIFAR_CONV,
}
#: the convolutional study's default subsamples (limit_train / limit_test not given): 10,000 CIFAR training images,
#: the set benchmarks/conv.py timed the cifar10-cpu recipe on (give limit_train = 50000 for all of them)
CONV_LIMITS = {"cifar10": {"limit_train": 10000}, "cifar100": {"limit_train": 10000}}
#: quick = true: a smoke-test budget over the dataset's defaults (minutes, meaningless accuracies)
QUICK = {
    "train": {"epochs": 2},
    "distill": {"epochs": 2},
    "standard": {"epochs": 2},
    "pgd_at": {"epochs": 2, "pgd_steps": 3},
    "robustness": {"samples": 20, "square_samples": 10, "audit_samples": 10, "pgd_steps": 3, "audit_steps": 5,
                   "audit_restarts": 2, "autoattack_iterations": 3, "square_queries": 20, "min_norm_steps": 10,
                   "corruption_samples": 40, "corruptions": ["gaussian_noise", "fog"], "severities": [1, 5],
                   "batch_size": 20},
    "hardware": {"limit": 60, "lava_limit": 4, "latency_samples": 5, "repeats": 1, "batch": 32},
    "report": {"trajectory_samples": 4},
}
#: quick = true on the large datasets also subsamples them (unless limit_train / limit_test are given)
QUICK_LIMITS = {"limit_train": 1000, "limit_test": 200}

#: the budget each default configuration was sized for, stated in the report (keys: (dataset, "dense" | "conv"))
BUDGET_NOTES = {
    ("digits", "dense"): "Embedded default (8x8 digits): budgets scaled so that the whole study fits in about five "
                         "minutes on a 2-core CPU (200 attacked test images, PGD 20 steps, AutoAttack and Square at "
                         "a reduced budget, FMN 50 steps, 100 images through Lava); see the configuration below.",
    ("digits", "conv"): "Embedded 1x8x8 digits, convolutional EBM on a 2-core CPU: 10 EP epochs (28 s for "
                        "conv 8 - conv 16 on shared cores), 20 epochs per student / baseline (under 30 s each), then "
                        "robustness on 100 attacked test images (50 for Square and the audit, AutoAttack and Square "
                        "at a reduced budget), the long stage: the attacks backpropagate through every step of the "
                        "conv relaxation (not timed end to end at this budget; at 200 images it ran about 4 of its "
                        "472 parts a minute on shared cores, well over an hour), 50 images through Lava; see the "
                        "configuration below.",
    ("cifar10", "conv"): "CIFAR-10, convolutional EBM on a 2-core CPU: HOURS, not minutes. EP training is the "
                         "preset's recipe cut to 24 epochs of a seeded class-stratified 10,000 of the 50,000 training "
                         "images, all 10,000 test images (benchmarks/conv.py: cifar10-cpu this way took 114 s per "
                         "epoch, 48 minutes, on a quiet 2-core machine and reached 55.6 %; several times longer when "
                         "the cores are shared; the published recipes' 120 epochs of 128-512 channels are GPU "
                         "budgets, days here), distillation and the standard baseline 15 epochs, PGD-AT 10 epochs at "
                         "Linf 8/255 (7 steps of 2/255), robustness on 100 test images (50 for Square and the audit; "
                         "AutoAttack 20 iterations and Square 500 queries: REDUCED from the standard 100 / 5000; "
                         "attacks on the EBM backpropagate through every deployed step: the longest stage, not timed "
                         "at this budget; in a --quick run, 20 images and 3 iterations, AutoAttack through BPTT on "
                         "the cifar10-cpu-lava EBM alone took over 15 minutes on shared cores), 20 images through the "
                         "Lava simulation; the stages after training were not timed on the full budget. See the "
                         "configuration below.",
    "quick": "QUICK budget (quick = true): a smoke test sized for minutes on a 2-core CPU (2 epochs per model, 20 "
             "attacked images, a handful of attack steps and queries, 4 images through Lava; the CIFAR sets "
             "subsampled to 1,000 / 200 images): the accuracies and robustness figures mean nothing; see the "
             "configuration below.",
}
BUDGET_NOTES[("cifar100", "conv")] = (
    "CIFAR-100, convolutional EBM on a 2-core CPU: HOURS, not minutes (untimed: the CIFAR-10 budget of the same "
    "configuration, 24 EP epochs of 10,000 training images, about 48 minutes of training on a quiet machine for "
    "cifar10-cpu, then the same stages with 100 classes); see the configuration below.")


def conv_train_recipe(network: dict) -> dict:
    """The [train] base of a convolutional network section: its preset's recipe (or CONV_RECIPE's for a bare arch)
    with the cost its spec implies (cross_entropy after "readout N", else mse)."""
    from ebm_sim.model.presets import get
    from ebm_sim.model.spec import SpecError, load

    recipe = dict(get(network.get("preset") or CONV_RECIPE).train)
    arch = network.get("arch") or get(network["preset"]).arch
    try:
        readout = load(arch).readout is not None
    except SpecError as error:
        raise ValueError(f"[network] arch: {error}") from None
    recipe["cost"] = "cross_entropy" if readout else "mse"
    return recipe


@dataclass
class PipelineConfig:
    """dataset, data_dir, seed and one dict of overrides-merged-with-defaults per section (see the module doc)."""

    dataset: str = "digits"
    data_dir: str | None = None
    seed: int = 0
    torch_threads: int | None = None
    limit_train: int | None = None
    limit_test: int | None = None
    quick: bool = False
    cluster: str | None = None
    sections: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.dataset not in DEFAULTS:
            raise ValueError(f"the pipeline has no defaults for dataset {self.dataset!r}; choose one of "
                             f"{', '.join(DEFAULTS)}")
        if not isinstance(self.quick, bool):
            raise ValueError(f"quick must be true or false, got {self.quick!r}")
        from ebm_sim.cluster import check_cluster
        self.cluster = check_cluster(self.cluster)  # not in any stage's digest: the results are the same
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
        for name in SECTIONS:
            if not isinstance(self.sections.get(name) or {}, dict):
                raise ValueError(f"configuration section [{name}] must be a table of keys, got "
                                 f"{self.sections[name]!r}")
        given_network = self.sections.get("network") or {}
        conv = bool({"arch", "preset"} & set(given_network))
        if conv and self.dataset not in CONV_DEFAULTS:
            raise ValueError(f"the convolutional study ([network] arch or preset) has defaults for "
                             f"{', '.join(CONV_DEFAULTS)}, not {self.dataset!r}")
        if given_network.get("arch") and given_network.get("preset"):
            raise ValueError("[network]: give arch or preset, not both (a preset names its own architecture)")
        defaults = CONV_DEFAULTS[self.dataset] if conv else DEFAULTS[self.dataset]
        limits = {**(CONV_LIMITS.get(self.dataset, {}) if conv else {}),
                  **(QUICK_LIMITS if self.quick and self.dataset.startswith("cifar") else {})}
        for key, value in limits.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        merged = {}
        for name in SECTIONS:
            base = dict(defaults.get(name, {}))
            if name == "network" and conv:  # the given arch or preset replaces the default one
                base = {"gain": 1.0}
            if name == "hardware":
                base = {**HARDWARE_KEYS, **base}
            if name == "report":
                base = {**REPORT_KEYS, **base}
            if self.quick:
                base.update(QUICK.get(name, {}))
            merged[name] = {**base, **(self.sections.get(name) or {})}
        if conv:
            merged["train"] = {**conv_train_recipe(merged["network"]), **merged["train"]}
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
    def from_file(cls, path, network: dict | None = None, **overrides) -> "PipelineConfig":
        """Read a .toml, .yaml or .yml file; ``overrides`` (dataset, data_dir, seed given as flags) win, and
        ``network`` (arch or preset given as flags) replaces the file's architecture keys."""
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
        if network:
            kept = {k: v for k, v in (data.get("network") or {}).items() if k not in ("layers", "arch", "preset")}
            data["network"] = {**kept, **network}
        return cls.from_dict(data)

    # ------------------------------------------------------------------ views
    @property
    def layered(self) -> bool:
        """Whether the EBM is a layered (e.g. convolutional) network: [network] arch or preset."""
        return bool(self.sections["network"].get("arch") or self.sections["network"].get("preset"))

    @property
    def kind(self) -> str:
        """"conv" for a layered EBM, "dense" otherwise (the budget notes' key)."""
        return "conv" if self.layered else "dense"

    def budget_note(self) -> str:
        """The budget this configuration's defaults were sized for (BUDGET_NOTES), as the report states it."""
        if self.quick:
            return BUDGET_NOTES["quick"]
        return BUDGET_NOTES.get((self.dataset, self.kind), "Budgets: see the configuration below.")

    def network(self):
        """The untrained EBM of [network], seeded with ``seed``: a dense ``ebm_sim.network.Network`` (layers, gain,
        activation) or an ``ebm_sim.model.LayeredNetwork`` (arch or preset: its architecture, activation and input
        normalization; activation and gain override)."""
        net = self.sections["network"]
        if not self.layered:
            from ebm_sim.network import Network
            return Network.init(net["layers"], seed=self.seed, gain=net["gain"], activation=net["activation"])
        from ebm_sim.model import LayeredNetwork
        from ebm_sim.model.presets import get

        preset = get(net["preset"]) if net.get("preset") else None
        return LayeredNetwork.init(net.get("arch") or preset.arch, seed=self.seed, gain=net["gain"],
                                   activation=net.get("activation") or (preset.activation if preset else None),
                                   normalization=preset.normalization if preset else None)

    def architecture_text(self) -> str:
        """The EBM's architecture in words: '64-256-10', the spec, or 'preset NAME (spec)'."""
        net = self.sections["network"]
        if not self.layered:
            return "-".join(map(str, net["layers"]))
        if net.get("preset"):
            from ebm_sim.model.presets import get
            return f"preset {net['preset']} ({get(net['preset']).arch})"
        return str(net["arch"])

    def validate(self) -> None:
        """Build every section's config object once: unknown keys and bad values are refused before any work."""
        for name in ("train", "distill", "standard", "pgd_at", "robustness"):
            self.section(name)
        allowed_network = CONV_NETWORK_KEYS if self.layered else DENSE_NETWORK_KEYS
        unknown_network = sorted(set(self.sections["network"]) - set(allowed_network))
        for section, allowed in (("hardware", HARDWARE_KEYS), ("report", REPORT_KEYS)):
            unknown = sorted(set(self.sections[section]) - set(allowed))
            if unknown:
                raise ValueError(f"unknown key(s) in [{section}]: {', '.join(unknown)}; allowed: {', '.join(allowed)}")
        if unknown_network:
            raise ValueError(f"unknown key(s) in [network]: {', '.join(unknown_network)}; allowed: "
                             f"{', '.join(allowed_network)}" + (" (a convolutional network: arch or preset gives "
                                                                "its layers)" if self.layered else ""))
        if self.layered:  # the spec, the preset name and the per-layer rates, before any work
            from ebm_sim.training import num_rates
            try:
                rates = num_rates(self.network())
            except ValueError as error:
                raise ValueError(f"[network]: {error}") from None
            try:
                self.section("train").layer_rates(rates)
            except ValueError as error:
                raise ValueError(f"[train] lr does not fit [network] {self.architecture_text()}: {error}") from None
            return  # a layered network that Lava cannot carry (max pooling, alternating updates) skips the lava stage
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

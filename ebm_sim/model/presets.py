"""Named recipes for convolutional EBMs: an architecture, its input normalization and the EP training settings.

    laborieux2021-cifar10   Laborieux et al. 2021 (Frontiers in Neuroscience, "Scaling EP to deep ConvNets"):
                            channels 128-256-512-512, 3x3 kernels, paddings 1-1-1-0, 2x2 max-pool after each, softmax
                            readout, rho = clip(s/2, 0, 1), synchronous updates, T1 250 / T2 25, symmetric beta 0.5,
                            SGD momentum 0.9, per-layer lr 0.25/0.15/0.1/0.08/0.05, weight decay 3e-4, batch 128,
                            cosine, 120 epochs, crop+flip, normalization with 3x the usual standard deviation
                            (reported: 88.1-88.7 % on CIFAR-10; about 230 s per epoch on a GPU)
    laborieux2021-cifar100  the same with a last conv layer of 1024 channels and 100 classes (lanl/AdvEP)
    scellier2023-cifar10    Scellier et al. 2023 (the faster recipe): alternating updates, 60 free / 20 nudged steps,
                            symmetric beta 0.1, lr 0.03, weight decay 2.5e-4, batch 128, same architecture
    cifar10-cpu             a network and budget sized for a 2-core CPU (channels 16-32-64, alternating updates as
                            Scellier et al. 2023, T1 30 / T2 10, symmetric beta 0.5, Adam 1e-3, batch 32, 24 epochs,
                            crop+flip: about 40 minutes here; Adam learnt faster than the SGD recipe in the first
                            epochs: 25.3 % vs 20.3 % test after 2-3 epochs on 2,000 images; over 18 epochs the
                            synchronous fixed_point updates reached 53.7 %, alternating ones 54.9 %; T1 20 / T2 8 for
                            20 epochs gave 52.6 %); its figures: benchmarks/conv.py
    cifar10-cpu-lava        cifar10-cpu with 2x2 average pooling instead of max pooling and synchronous fixed_point
                            updates: the network the Lava graph carries (Lava has no max-pooling process; average
                            pooling folds into the conv weights, docs/hardware.md); its accuracy is not measured yet
One difference from the reference code: its cosine schedule anneals over 100 epochs to 1e-5 while training 120; the
toolkit's ``cosine`` anneals over the run's epochs to 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
#: Laborieux et al. normalize with 3x the usual standard deviation (inputs stay near [0, 1] for clip(s/2, 0, 1))
CIFAR_NORMALIZATION = {"mean": list(CIFAR_MEAN), "std": [3 * v for v in CIFAR_STD]}

LABORIEUX_CONVS = "conv 128 k3 p1 maxpool, conv 256 k3 p1 maxpool, conv 512 k3 p1 maxpool"


@dataclass(frozen=True)
class Preset:
    """A recipe: ``arch`` (a spec of :mod:`ebm_sim.model.spec`), ``train`` (TrainConfig fields), the dataset it was
    published on, and where it comes from."""

    name: str
    dataset: str
    arch: str
    activation: str
    train: dict
    source: str
    normalization: dict | None = field(default_factory=lambda: dict(CIFAR_NORMALIZATION))


_LABORIEUX_TRAIN = dict(epochs=120, batch_size=128, beta=0.5, nudging="symmetric", cost="cross_entropy",
                        method="fixed_point", free_steps=250, nudged_steps=25, tol=0.0, optimizer="sgd",
                        lr=[0.25, 0.15, 0.1, 0.08, 0.05], momentum=0.9, weight_decay=3e-4, schedule="cosine",
                        augment="crop_flip", backend="torch")

PRESETS = {p.name: p for p in [
    Preset("laborieux2021-cifar10", "cifar10", f"3x32x32, {LABORIEUX_CONVS}, conv 512 k3 p0 maxpool, readout 10",
           "hard_sigmoid_half", _LABORIEUX_TRAIN, "Laborieux et al. 2021, Frontiers in Neuroscience 15:633674"),
    Preset("laborieux2021-cifar100", "cifar100", f"3x32x32, {LABORIEUX_CONVS}, conv 1024 k3 p0 maxpool, readout 100",
           "hard_sigmoid_half", _LABORIEUX_TRAIN, "Laborieux et al. 2021; CIFAR-100 variant of lanl/AdvEP"),
    Preset("scellier2023-cifar10", "cifar10", f"3x32x32, {LABORIEUX_CONVS}, conv 512 k3 p0 maxpool, readout 10",
           "hard_sigmoid_half",
           dict(_LABORIEUX_TRAIN, epochs=100, beta=0.1, method="alternating", free_steps=60, nudged_steps=20,
                lr=0.03, weight_decay=2.5e-4),
           "Scellier et al. 2023, NeurIPS (arXiv 2312.15103), code: rain-neuromorphics/energy-based-learning"),
    Preset("cifar10-cpu", "cifar10",
           "3x32x32, conv 16 k3 p1 maxpool, conv 32 k3 p1 maxpool, conv 64 k3 p1 maxpool, readout 10",
           "hard_sigmoid_half",
           dict(_LABORIEUX_TRAIN, epochs=24, batch_size=32, method="alternating", free_steps=30, nudged_steps=10,
                optimizer="adam", lr=1e-3, weight_decay=0.0),
           "this toolkit: sized for a 2-core CPU (benchmarks/conv.py)"),
    Preset("cifar10-cpu-lava", "cifar10",
           "3x32x32, conv 16 k3 p1 avgpool, conv 32 k3 p1 avgpool, conv 64 k3 p1 avgpool, readout 10",
           "hard_sigmoid_half",
           dict(_LABORIEUX_TRAIN, epochs=24, batch_size=32, method="fixed_point", free_steps=30, nudged_steps=10,
                optimizer="adam", lr=1e-3, weight_decay=0.0),
           "this toolkit: cifar10-cpu made mappable to Lava (hardware/layered_mapping.py)"),
]}


def get(name: str) -> Preset:
    """The preset called ``name``; ValueError listing the known ones otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}") from None

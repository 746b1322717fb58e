"""Benchmark: EP training on the Numba simulator — accuracy on digits and Fashion-MNIST, and speed against torch.

    python benchmarks/train.py [--quick] [--out benchmarks/results/train.json]

Accuracy (the trained networks are written, without optimizer state, to benchmarks/results/networks/ where no file of
that name is there yet: the distillation and robustness benchmarks measured the stored ones, --overwrite-networks
replaces them):
  digits          64-256-10        RECIPES["digits"]
  fashion         784-512-10       RECIPES["fashion"]
  fashion_deep    784-512-512-10   RECIPES["fashion_deep"]
Breakdown ("breakdown" group): the issue's epoch (784-512-10, batch 50, T1 30 / T2 10, tol 0, one-sided nudging,
Adam 5e-4) on one core with the seconds of each phase (input projection, free and nudged relaxations, gradient
contrast, optimizer, other) and on every core (each phase's rows split over the cores' threads); fashion_epoch_s
is the faster, and epoch_gemm_fraction its FLOP/s (the epoch's matrix products) over numpy's float32 GEMM rate in
the same process; products_floor_epoch_s the same epoch's matrix products alone, at their own shapes (batch 50, one
thread, computed as the kernels compute them, with nothing between them): what the one-core epoch cannot go below
(one_core_over_products_floor).
Conv breakdown ("conv_breakdown" group): one EP epoch of the cifar10-cpu preset (its own recipe) on real CIFAR-10
images (../shared/data; skipped without), per 10,000 images, with its phases (free and nudged relaxations, parameter
gradient, optimizer, other) and its fraction of the GEMM rate (conv_epoch_s, conv_epoch_gemm_fraction).
Speed: seconds per Fashion-MNIST epoch of this trainer against the torch implementation of the same algorithm written
the way the reference EP code bases do it (autograd on Phi, benchmarks/torch_ep_reference.py): 784-512-10, batch 50,
T1 = 30 free and T2 = 10 nudged steps with no early stopping on either side (same steps), Adam 5e-4, beta 0.5,
symmetric nudging; timed on a subset and scaled to the 60,000 training images. Also reported: this trainer's epoch
with its default early stopping (tol 1e-4), which is how it is used.
--quick: digits in full, Fashion-MNIST one epoch on 3,000 images, speed on 1,000 images (well under a minute);
its accuracies are marked quick and are not the benchmark's figures.
Each group runs in its own process (torch's and OpenBLAS's idle threads would slow the other library down).
The JSON is written to --out and printed as the last line.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import SHARED_DATA, output_path, run_groups, seconds_of, write_results  # noqa: E402
from ebm_sim import storage  # noqa: E402
from ebm_sim.datasets import load_dataset  # noqa: E402
from ebm_sim.network import Network  # noqa: E402
from ebm_sim.training import TrainConfig, fit  # noqa: E402

NETWORK_DIR = ROOT / "benchmarks" / "results" / "networks"
RECIPES = {
    "digits": dict(dataset="digits", layers=(64, 256, 10),
                   config=dict(epochs=15, batch_size=32, beta=0.5, lr=2e-3, schedule="cosine")),
    "fashion": dict(dataset="fashion-mnist", layers=(784, 512, 10),
                    config=dict(epochs=15, batch_size=50, beta=0.5, lr=1e-3, schedule="cosine")),
    "fashion_deep": dict(dataset="fashion-mnist", layers=(784, 512, 512, 10),
                         config=dict(epochs=10, batch_size=50, beta=0.5, lr=[1e-3, 5e-4, 2e-4], schedule="cosine")),
}
SPEED = dict(layers=(784, 512, 10), batch_size=50, beta=0.5, T1=30, T2=10, lr=5e-4)


def accuracy_group(name: str, quick: bool, networks_dir: Path = NETWORK_DIR, overwrite_networks: bool = False) -> dict:
    """Train one recipe; returns its figures and writes the network (no optimizer state) for later benchmarks, unless
    a file of that name is already there: the distillation and robustness benchmarks measured the stored networks, so
    an existing file is kept (``network_file_kept``) unless ``overwrite_networks``."""
    recipe = RECIPES[name]
    config = dict(recipe["config"])
    limit = None
    if quick and recipe["dataset"] != "digits":
        config["epochs"], limit = 1, 3000
    data = load_dataset(recipe["dataset"], limit_train=limit)
    network = Network.init(recipe["layers"], seed=0)
    train_config = TrainConfig(**config)
    start = time.perf_counter()
    fit(network, data.x_train, data.y_train, data.x_test, data.y_test, train_config, progress=False,
        log=lambda msg: print(msg, file=sys.stderr, flush=True), num_classes=data.num_classes)
    total = time.perf_counter() - start
    history = network.history
    result = {"dataset": recipe["dataset"], "layers": list(recipe["layers"]), "config": train_config.as_dict(),
              "train_samples": int(len(data.y_train)), "test_samples": int(len(data.y_test)),
              "test_acc": history["test_acc"][-1], "best_test_acc": max(history["test_acc"]),
              "train_acc": history["train_acc"][-1], "epoch_s_mean": float(np.mean(history["seconds"])),
              "total_s": total, "free_steps_mean_last_epoch": history["free_steps_mean"][-1],
              "history": history, "quick": bool(quick and limit is not None)}
    if not result["quick"]:
        networks_dir.mkdir(parents=True, exist_ok=True)
        path = networks_dir / f"{name}_{'-'.join(map(str, recipe['layers']))}.h5"
        shown = str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
        if path.exists() and not overwrite_networks:
            result["network_file"], result["network_file_kept"] = None, shown
            print(f"{shown} exists (later benchmarks measured it): kept, this run's network is not written "
                  f"(--overwrite-networks replaces it)", file=sys.stderr, flush=True)
        else:
            storage.save_network(path, network, extra_attrs={"dataset": recipe["dataset"], "recipe": name,
                                                             "config": train_config.as_dict()})
            result["network_file"] = shown
    return result


def speed_inputs(quick: bool):
    data = load_dataset("fashion-mnist", limit_train=1000 if quick else 6000)
    return data.x_train, data.y_train


def numba_speed_group(quick: bool, networks_dir=None) -> dict:
    x, y = speed_inputs(quick)
    results = {}
    for label, tol in (("same_steps", 0.0), ("early_stopping", 1e-4)):  # tol 0: exactly T1 and T2 steps
        network = Network.init(SPEED["layers"], seed=0)
        config = TrainConfig(epochs=1, batch_size=SPEED["batch_size"], beta=SPEED["beta"], lr=SPEED["lr"],
                             free_steps=SPEED["T1"], nudged_steps=SPEED["T2"], tol=tol)
        from ebm_sim.training import make_optimizer, train_epoch
        optimizer = make_optimizer(network, config)
        train_epoch(network, optimizer, x[:200], y[:200], config, epoch=0)  # warm-up (compilation, caches)
        start = time.perf_counter()
        stats = train_epoch(network, optimizer, x, y, config, epoch=0)
        seconds = time.perf_counter() - start
        results[label] = {"samples": int(len(y)), "seconds": seconds, "epoch_s_60k": seconds * 60000 / len(y),
                          "free_steps_mean": stats["free_steps_mean"], "nudged_steps_mean": stats["nudged_steps_mean"],
                          "train_acc": stats["train_acc"]}
    return results


def torch_speed_group(quick: bool, networks_dir=None) -> dict:
    import torch
    import torch_ep_reference as reference

    x, y = speed_inputs(quick)
    network = Network.init(SPEED["layers"], seed=0)
    settings = dict(batch_size=SPEED["batch_size"], beta=SPEED["beta"], T1=SPEED["T1"], T2=SPEED["T2"],
                    lr=SPEED["lr"], optimizer="adam", seed=0, epoch=0)
    module = reference.TorchEPNet.from_network(network)
    reference.train_epoch(module, x[:200], y[:200], **settings)  # warm-up
    stats = reference.train_epoch(module, x, y, **settings)
    return {"samples": int(len(y)), "seconds": stats["seconds"], "epoch_s_60k": stats["seconds"] * 60000 / len(y),
            "train_acc": stats["train_acc"], "torch_threads": torch.get_num_threads()}


PHASES = ("input_projection", "free", "nudged", "gradient", "optimizer")


def epoch_flops(layers, batch: int, samples: int, free: int, nudged: int) -> float:
    """FLOPs of the matrix products of one one-sided EP epoch at fixed step counts (tol 0): per minibatch the input
    projection (2 B n_0 n_1), each step's couplings (every W_k, k >= 1, applied forward and transposed: 4 B n_k n_{k+1}
    per step, free and nudged), and the contrast (2 B n_0 n_1 for the input layer, two products for the others)."""
    pairs = list(zip(layers[:-1], layers[1:]))
    couplings = sum(4 * batch * a * b for a, b in pairs[1:])
    contrast = 2 * batch * pairs[0][0] * pairs[0][1] + sum(4 * batch * a * b for a, b in pairs[1:])
    per_batch = 2 * batch * pairs[0][0] * pairs[0][1] + (free + nudged) * couplings + contrast
    return per_batch * samples / batch


def timer(timers: dict):
    """timed(name_of, function): ``function`` wrapped to add its seconds to ``timers[name_of(*args)]``."""
    def timed(name_of, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                timers[name_of(*args)] += time.perf_counter() - start
        return wrapper
    return timed


def products_floor(layers, batch: int, free: int, nudged: int, repeats: int) -> dict:
    """Seconds per minibatch of an EP step's matrix products alone, at the step's own shapes, through the kernels' own
    functions on one thread: the input projection (``kernels.input_projection``), at every one of the free + nudged
    steps every coupling (``kernels._coupling`` and ``_skinny_couplings``, as the synchronous kernel calls them), and
    the contrast (``kernels.weight_contrast`` per layer). No state updates, no Python between the calls: a floor of
    the one-core epoch at this batch size (best of ``repeats`` runs of 20 minibatches)."""
    from numba import njit

    from ebm_sim import kernels
    from ebm_sim.blas import make_handle, single_threaded
    from ebm_sim.numba_backend import KernelArrays

    @njit(cache=False)
    def minibatches(blas, x, weights, biases, col, S, H, high, below, count, steps):
        rows = x.shape[0]
        for _ in range(count):
            kernels.input_projection(blas, x, weights[0], biases[:weights[0].shape[0]])
            for _ in range(steps):
                for i in range(len(weights)):
                    kernels._coupling(i, S, H, rows, weights, col, blas, True)
                kernels._skinny_couplings(S, H, rows, weights, col)
            for k in range(len(weights)):
                kernels.weight_contrast(blas, high[k], below[k], high[k], below[k], k == 0, 1.0)

    arrays = KernelArrays.of(Network.init(layers, seed=0))
    rng = np.random.default_rng(0)
    x = rng.random((batch, layers[0]), dtype=np.float32)
    S = rng.random((batch, arrays.width), dtype=np.float32)
    states = tuple(rng.random((batch, n), dtype=np.float32) for n in layers[1:])
    operands = (make_handle(np.float32), x, arrays.weights, arrays.biases, arrays.col, S, np.empty_like(S), states,
                (x,) + states[:-1])
    count = 20
    with single_threaded:
        minibatches(*operands, 1, free + nudged)  # compile
        best = min(seconds_of(lambda: minibatches(*operands, count, free + nudged)) for _ in range(repeats))
    return {"minibatch_s": best / count}


SHARD_ROWS = 16  # "all cores": each phase's 50 rows split over two threads (the trainer's default keeps them on one)


def breakdown_group(quick: bool, networks_dir=None) -> dict:
    """The issue's epoch (784-512-10, batch 50, T1 30 / T2 10, tol 0, one-sided nudging, Adam) on the Numba
    trainer: seconds per 60,000-image epoch on one core (the minibatch in one piece) with its breakdown per phase
    (input projection, free and nudged relaxations, the gradient contrast, the optimizer, other), and on every core
    (each phase's rows split over the cores' threads, SHARD_ROWS at least each); the GEMM rate of the same process
    and the fraction of it the epoch reaches. 784-512-512-10 too (seconds per epoch, both ways)."""
    import relax as relax_benchmark  # benchmarks/relax.py: the GEMM rates

    from ebm_sim import numba_backend, optimizers, training

    x, y = speed_inputs(quick)
    timers = dict.fromkeys(PHASES, 0.0)
    timed = timer(timers)

    def epoch(layers, shards: bool, instrument: bool) -> float:
        network = Network.init(layers, seed=0)
        config = TrainConfig(epochs=1, batch_size=SPEED["batch_size"], beta=SPEED["beta"], lr=SPEED["lr"],
                             nudging="positive", free_steps=SPEED["T1"], nudged_steps=SPEED["T2"], tol=0.0)
        saved = (training.MIN_ROWS_PER_SHARD, numba_backend.relax_numba, training.energy_parameter_contrast,
                 numba_backend.KernelArrays.input_projection, optimizers.Adam.step)
        try:
            training.MIN_ROWS_PER_SHARD = SHARD_ROWS if shards else 10 ** 9
            if instrument:
                numba_backend.relax_numba = timed(lambda net, x, settings, *a: "nudged" if settings.beta else "free",
                                                  saved[1])
                training.energy_parameter_contrast = timed(lambda *a: "gradient", saved[2])
                numba_backend.KernelArrays.input_projection = timed(lambda *a: "input_projection", saved[3])
                optimizers.Adam.step = timed(lambda *a: "optimizer", saved[4])
            optimizer = training.make_optimizer(network, config)
            training.train_epoch(network, optimizer, x[:200], y[:200], config, epoch=0)  # warm-up
            for key in timers:
                timers[key] = 0.0
            start = time.perf_counter()
            training.train_epoch(network, optimizer, x, y, config, epoch=0)
            return time.perf_counter() - start
        finally:
            (training.MIN_ROWS_PER_SHARD, numba_backend.relax_numba, training.energy_parameter_contrast,
             numba_backend.KernelArrays.input_projection, optimizers.Adam.step) = saved

    scale = 60000 / len(y)
    plain = epoch(SPEED["layers"], False, False)
    instrumented = epoch(SPEED["layers"], False, True)
    phases = {k: v * scale for k, v in timers.items()}
    phases["other"] = instrumented * scale - sum(phases.values())
    sharded = epoch(SPEED["layers"], True, False)
    deep = (784, 512, 512, 10)
    deep_plain, deep_sharded = epoch(deep, False, False), epoch(deep, True, False)
    rates = relax_benchmark.gemm_rates(5 if quick else 20)
    gemm = rates["numpy_gflops_batch256"]
    best = min(plain, sharded) * scale
    flops = epoch_flops(SPEED["layers"], SPEED["batch_size"], 60000, SPEED["T1"], SPEED["T2"])
    floor = products_floor(SPEED["layers"], SPEED["batch_size"], SPEED["T1"], SPEED["T2"], 3 if quick else 10)
    floor_s = floor["minibatch_s"] * 60000 / SPEED["batch_size"]
    return {"samples": int(len(y)), "epoch_s_one_core": plain * scale, "epoch_s_all_cores": sharded * scale,
            "epoch_s": best, "phases_one_core_s": phases, "instrumented_epoch_s": instrumented * scale,
            "deep_784-512-512-10": {"epoch_s_one_core": deep_plain * scale, "epoch_s_all_cores": deep_sharded * scale},
            "epoch_gflop": flops / 1e9, "gemm_gflops": gemm, "gemm_rates": rates,
            "epoch_gemm_fraction": flops / best / 1e9 / gemm,
            "products_floor_epoch_s": floor_s, "products_floor_gflops": flops / floor_s / 1e9,
            "one_core_over_products_floor": plain * scale / floor_s}


CONV_PRESET = "cifar10-cpu"
CONV_PHASES = ("free", "nudged", "gradient", "optimizer")


def conv_epoch_flops(network, config, samples: int) -> float:
    """FLOPs of the convolutions and products of one EP epoch of a layered network at fixed step counts (tol 0), per
    sample: each phase convolves the clamped input once; each step convolves every relaxing pre layer once (the
    pooled post field, and the routing of its own pre field, reused: ``local_fields``'s memo) and applies the
    transposed convolution once (the pre field); the gradient correlates both states of the contrast once per
    interaction. A product of C_out x C_in x k x k weights over an H x W map is 2 C_out C_in k k H W FLOPs."""
    def macs(i):
        weight = i.params["weight"]
        if weight.ndim == 4:
            return weight.size * int(np.prod(i.conv_shape(network.layer_shapes[i.pre])))
        return weight.size
    binary = [i for i in network.interactions if not i.unary]
    clamped = sum(macs(i) for i in binary if i.pre == 0)
    relaxing = sum(macs(i) for i in binary if i.pre >= 1)
    phases = 3 if config.nudging == "symmetric" else 2
    steps = config.free_steps + (phases - 1) * config.nudged_steps
    return 2.0 * samples * (phases * clamped + 2 * steps * relaxing + 2 * (clamped + relaxing))


def conv_breakdown_group(quick: bool, networks_dir=None) -> dict:
    """One EP epoch of the cifar10-cpu preset (its recipe: batch 32, 30 free / 10 nudged alternating steps, symmetric
    nudging, Adam) on real CIFAR-10 images, timed on a subset and scaled to 10,000 images: seconds, its breakdown
    (free and nudged relaxations, parameter gradient, optimizer, other), and its FLOP/s (``conv_epoch_flops``) over
    numpy's float32 GEMM rate in the same process (``epoch_gemm_fraction``)."""
    import relax as relax_benchmark

    from ebm_sim import optimizers, training
    from ebm_sim.datasets import load_cifar10
    from ebm_sim.model import LayeredNetwork
    from ebm_sim.model import ep as layered_ep
    from ebm_sim.model.presets import get

    if not (SHARED_DATA / "cifar-10-batches-py").is_dir():
        return {"skipped": f"no CIFAR-10 batches in {SHARED_DATA}"}
    data = load_cifar10(SHARED_DATA)
    samples = 64 if quick else 640
    x, y = data.images("train")[:samples + 64], data.y_train[:samples + 64]
    preset = get(CONV_PRESET)
    config = TrainConfig(**dict(preset.train, epochs=1))
    network = LayeredNetwork.init(preset.arch, seed=0, activation=preset.activation,
                                  normalization=preset.normalization)
    timers = dict.fromkeys(CONV_PHASES, 0.0)
    timed = timer(timers)

    saved = (layered_ep.relax_clamped, layered_ep.parameter_gradient, optimizers.Adam.step)
    try:
        layered_ep.relax_clamped = timed(lambda *a: "nudged" if a[6] else "free", saved[0])
        layered_ep.parameter_gradient = timed(lambda *a: "gradient", saved[1])
        optimizers.Adam.step = timed(lambda *a: "optimizer", saved[2])
        optimizer = training.make_optimizer(network, config)
        training.train_epoch(network, optimizer, x[samples:], y[samples:], config, epoch=0)  # warm-up
        timers.update(dict.fromkeys(CONV_PHASES, 0.0))
        start = time.perf_counter()
        training.train_epoch(network, optimizer, x[:samples], y[:samples], config, epoch=0)
        seconds = time.perf_counter() - start
    finally:
        layered_ep.relax_clamped, layered_ep.parameter_gradient, optimizers.Adam.step = saved
    scale = 10000 / samples
    phases = {k: v * scale for k, v in timers.items()}
    phases["other"] = seconds * scale - sum(phases.values())
    gemm = relax_benchmark.gemm_rates(5 if quick else 20)["numpy_gflops_batch256"]
    flops = conv_epoch_flops(network, config, 10000)
    return {"preset": CONV_PRESET, "samples": samples, "epoch_s_10k": seconds * scale, "phases_s": phases,
            "epoch_gflop": flops / 1e9, "gemm_gflops": gemm,
            "epoch_gemm_fraction": flops / (seconds * scale) / 1e9 / gemm}


GROUPS = {**{name: functools.partial(accuracy_group, name) for name in RECIPES}, "numba_speed": numba_speed_group,
          "torch_speed": torch_speed_group, "breakdown": breakdown_group, "conv_breakdown": conv_breakdown_group}


def run(args) -> dict:
    """Every group in its own process (see ``_common.run_groups``), then the comparison."""
    arguments = ["--networks-dir", str(args.networks_dir)] + (["--quick"] if args.quick else []) + (
        ["--overwrite-networks"] if args.overwrite_networks else [])
    groups = run_groups(__file__, GROUPS, arguments)
    same = groups["numba_speed"]["same_steps"]
    results = {
        "quick": args.quick,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "digits_test_acc": groups["digits"]["test_acc"],
        "fashion_test_acc": groups["fashion"]["test_acc"],
        "fashion_deep_test_acc": groups["fashion_deep"]["test_acc"],
        # seconds per 60,000-image epoch at the speed settings (784-512-10, batch 50, T1 30 / T2 10, tol 0,
        # one-sided nudging, Adam: the issue's), the faster of one core and every core; its breakdown per phase
        "fashion_epoch_s": groups["breakdown"]["epoch_s"],
        "fashion_epoch_phases_s": groups["breakdown"]["phases_one_core_s"],
        "epoch_gemm_fraction": groups["breakdown"]["epoch_gemm_fraction"],
        "products_floor_epoch_s": groups["breakdown"]["products_floor_epoch_s"],
        "deep_epoch_s": min(groups["breakdown"]["deep_784-512-512-10"].values()),
        # the cifar10-cpu preset's EP epoch per 10,000 CIFAR-10 images, its breakdown and fraction of the GEMM rate
        "conv_epoch_s": groups["conv_breakdown"].get("epoch_s_10k"),
        "conv_epoch_gemm_fraction": groups["conv_breakdown"].get("epoch_gemm_fraction"),
        # the accuracy recipe's own epochs (symmetric nudging, early stopping at tol 1e-4), per 60,000 images
        "fashion_recipe_epoch_s": groups["fashion"]["epoch_s_mean"] * 60000 / groups["fashion"]["train_samples"],
        "fashion_budget": {"epochs": groups["fashion"]["config"]["epochs"],
                           "epoch_s": groups["fashion"]["epoch_s_mean"], "total_s": groups["fashion"]["total_s"]},
        "numba_over_torch_epoch": groups["torch_speed"]["epoch_s_60k"] / same["epoch_s_60k"],
        "numba_early_stopping_over_torch_epoch": (groups["torch_speed"]["epoch_s_60k"]
                                                  / groups["numba_speed"]["early_stopping"]["epoch_s_60k"]),
        "speed": {"setting": SPEED, "numba": groups["numba_speed"], "torch_autograd": groups["torch_speed"],
                  "breakdown": groups["breakdown"], "conv_breakdown": groups["conv_breakdown"]},
        "runs": {name: groups[name] for name in ("digits", "fashion", "fashion_deep")},
        "targets": {"digits_test_acc": 0.97, "fashion_test_acc": 0.88, "numba_over_torch_epoch": 2.0,
                    "fashion_epoch_s": 2.0},
    }
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small settings (under a minute)")
    parser.add_argument("--out", default=None, help="JSON result (default benchmarks/results/train.json; with "
                        "--quick benchmarks/results/quick/train.json: never the full results)")
    parser.add_argument("--networks-dir", type=Path, default=NETWORK_DIR,
                        help="where the trained networks are written (default benchmarks/results/networks)")
    parser.add_argument("--overwrite-networks", action="store_true",
                        help="replace trained networks already in --networks-dir (default: keep them; the "
                             "distillation and robustness benchmarks measured those files)")
    parser.add_argument("--group", choices=sorted(GROUPS), help=argparse.SUPPRESS)  # internal: one group
    args = parser.parse_args(argv)
    if args.group:
        options = {"overwrite_networks": args.overwrite_networks} if args.group in RECIPES else {}
        print(json.dumps(GROUPS[args.group](args.quick, args.networks_dir, **options)))
        return
    out = output_path("train", args.quick, args.out)
    write_results(run(args), out)


if __name__ == "__main__":
    main()

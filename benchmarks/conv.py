"""Benchmark: convolutional EBMs: relaxation speed per backend and EP training on real CIFAR-10 images.

    python benchmarks/conv.py [--quick] [--out benchmarks/results/conv.json] [--data-dir ../shared/data]

Relaxation (groups "relax_torch" and "relax_numba"): the cifar10-cpu preset network and the Laborieux et al. 2021
CIFAR-10 network (both untrained, seeded) relax CIFAR-10 test images at batch 1 and batch 128 with the fixed-point
iteration (tol 1e-4, at most 250 steps = the recipe's T1). Backends: torch on the CPU (eager, oneDNN convolutions, the
way the reference codes run; the toolkit's torch backend hoists the clamped input's field and computes each conv once
per step) and Numba (ebm_sim/model/numba_ops.py: im2col and one SciPy BLAS GEMM per convolution, pooling, unpooling
and col2im in Numba loops, under the Python relaxation loop of ebm_sim/model/dynamics.py), each in its own process,
two threads. For the Laborieux network at batch 128 a step takes seconds here: it is timed over a few steps and its
time to equilibrium is the per-step time times the steps the batch-1 run needed (marked "estimated"). GFLOP/s = 2 x
multiply-adds per step (post and pre fields of every interaction whose pre layer relaxes) / seconds per step, beside
the float32 GEMM rate torch reaches in the same run.

Training (groups "ep" and "bp"): the cifar10-cpu preset trained with EP on the 10,000 training images of the shared
data (seeded crop+flip), tested on the 10,000 test images; the same architecture trained by backprop beside it (a
feedforward net: the same convolutions and pools, activation clip(u/2, 0, 1), softmax readout, SGD with momentum, the
same augmentation, 15 epochs).

Keys (issue 14): numba_over_torch_batch1, numba_over_torch_batch128 (torch time / Numba time to equilibrium of the
Laborieux network; > 1: Numba faster), cifar10_cpu_test_acc, cifar10_cpu_bp_test_acc, cifar10_cpu_epoch_s,
gpu_epoch_s (null without a GPU). ``--groups relax_torch,relax_numba`` re-runs only those groups and keeps the
others from the existing --out file.
--quick (under a minute: small batches, a few steps, 500 training images) writes to benchmarks/results/quick/ unless
--out says otherwise, and never over the recorded full results. The JSON is printed as the last line.
"""
from __future__ import annotations

import argparse
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

from _common import SHARED_DATA, output_path, run_groups, write_results  # noqa: E402

LABORIEUX = "laborieux2021-cifar10"
CPU = "cifar10-cpu"
THREADS = 2
NUMBA_NOTE = ("per-interaction Numba kernels under a Python relaxation loop that retires stopped samples: im2col + "
              "SciPy BLAS GEMM, and Winograd F(2x2, 3x3) for 3x3 stride-1 convolutions of >= 128 input channels and "
              ">= 256 tiles (the Laborieux net at batch 128); no Numba driver owning the whole relaxation yet")


def cifar(data_dir, quick: bool):
    from ebm_sim.datasets import load_cifar10

    data = load_cifar10(data_dir)
    n_train, n_test = (500, 500) if quick else (len(data.y_train), len(data.y_test))
    return (data.images("train")[:n_train], data.y_train[:n_train], data.images("test")[:n_test],
            data.y_test[:n_test])


def network(preset_name: str):
    from ebm_sim.model import LayeredNetwork
    from ebm_sim.model.presets import get

    preset = get(preset_name)
    return LayeredNetwork.init(preset.arch, seed=0, activation=preset.activation,
                               normalization=preset.normalization), preset


def step_macs(net) -> int:
    """Multiply-adds of one synchronous step: post and pre fields of every interaction whose pre layer relaxes
    (the clamped input's field is computed once per relaxation)."""
    return sum(2 * i.synapses(net.layer_shapes[i.pre], net.layer_shapes[i.post])
               for i in net.interactions if not i.unary and i.pre >= 1)


def torch_gemm_gflops(repeats: int = 20) -> float:
    """float32 GFLOP/s of a (1152 x 1024) @ (1024 x 1024) product in torch, the rate convolutions lower to."""
    import torch

    a, b = torch.randn(1152, 1024), torch.randn(1024, 1024)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * 1152 * 1024 * 1024 * repeats / (time.perf_counter() - start) / 1e9


def relax_once(net, images, max_steps: int, tol: float, backend: str):
    """One relaxation from zero on ``backend`` ("torch" or "numba"): (seconds, steps of the slowest sample, fraction
    converged)."""
    from ebm_sim.model.dynamics import relax
    from ebm_sim.model.energy import parameters

    params = parameters(net, backend)
    if backend == "torch":
        import torch
        x = torch.as_tensor(images)
        with torch.no_grad():
            start = time.perf_counter()
            result = relax(net, x, "fixed_point", tol=tol, max_steps=max_steps, params=params)
            seconds = time.perf_counter() - start
        return seconds, int(result.steps.max()), float(result.converged.double().mean())
    start = time.perf_counter()
    result = relax(net, np.ascontiguousarray(images), "fixed_point", tol=tol, max_steps=max_steps, params=params)
    return time.perf_counter() - start, int(result.steps.max()), float(result.converged.mean())


def relax_group(quick: bool, data_dir, backend: str) -> dict:
    """Time to equilibrium of both networks at batch 1 and 128 (8 with --quick) on one backend."""
    import torch

    torch.set_num_threads(THREADS)
    _, _, x_test, _ = cifar(data_dir, quick)
    out = {"threads": THREADS, "backend": backend, "networks": {}}
    if backend == "torch":
        out["torch_gemm_gflops"] = torch_gemm_gflops()
    for name in (CPU, LABORIEUX):
        net, preset = network(name)
        macs = step_macs(net)
        rows = {}
        for batch in (1, 8 if quick else 128):
            images = x_test[:batch]
            big = name == LABORIEUX and batch > 1
            steps_cap = 3 if (quick and name == LABORIEUX) else (4 if big else 250)
            relax_once(net, images, 2, 0.0, backend)  # warm up (oneDNN kernels, Numba compilation, workspaces)
            seconds, steps, converged = relax_once(net, images, steps_cap, 0.0 if big else 1e-4, backend)
            per_step = seconds / max(steps, 1)
            row = {"batch": batch, "steps": steps, "converged_fraction": converged if not big else None,
                   "seconds_per_step": per_step, "gflops": 2 * macs * batch / per_step / 1e9,
                   "time_to_equilibrium_s": None if big else seconds}
            if big:
                steps_batch1 = rows["batch1"]["steps"]
                row.update(time_to_equilibrium_s=per_step * steps_batch1, estimated=True,
                           note=f"timed over {steps} steps; time to equilibrium = seconds per step x the "
                                f"{steps_batch1} steps of the batch-1 run")
            rows[f"batch{batch}"] = row
        out["networks"][name] = {"arch": preset.arch, "macs_per_step_per_sample": macs, **rows}
    return out


def ep_group(quick: bool, data_dir) -> dict:
    import torch

    from ebm_sim.training import TrainConfig, fit

    torch.set_num_threads(THREADS)
    x_train, y_train, x_test, y_test = cifar(data_dir, quick)
    net, preset = network(CPU)
    config = TrainConfig(**dict(preset.train, epochs=1 if quick else preset.train["epochs"]))
    start = time.perf_counter()
    fit(net, x_train, y_train, x_test, y_test, config, progress=False, log=lambda m: print(m, file=sys.stderr))
    history = net.history
    return {"preset": CPU, "arch": preset.arch, "config": config.as_dict(), "train_images": int(len(y_train)),
            "test_images": int(len(y_test)), "test_acc": history["test_acc"][-1],
            "best_test_acc": max(history["test_acc"]),
            "epoch_s": float(np.median(history["seconds"])), "total_s": time.perf_counter() - start,
            "free_steps_per_sample": config.free_steps, "nudged_steps_per_phase": config.nudged_steps,
            "history": history}


def bp_group(quick: bool, data_dir) -> dict:
    import torch
    import torch.nn.functional as F

    from ebm_sim.model.spec import load
    from ebm_sim.training import crop_flip

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = cifar(data_dir, quick)
    _, preset = network(CPU)
    arch = load(preset.arch)
    mean = torch.tensor(preset.normalization["mean"]).reshape(1, -1, 1, 1)
    std = torch.tensor(preset.normalization["std"]).reshape(1, -1, 1, 1)
    layers, channels = [], arch.input_shape[0]
    for block in arch.blocks[:-1]:
        layers.append(torch.nn.Conv2d(channels, block.size, block.kernel, block.stride, block.padding))
        channels = block.size
    convs = torch.nn.ModuleList(layers)
    readout = torch.nn.LazyLinear(arch.readout)

    def forward(x):
        h = (x - mean) / std
        for conv in convs:
            h = torch.clamp(F.max_pool2d(conv(h), 2) / 2, 0, 1)  # the EBM's clip(u/2, 0, 1) after the pooled conv
        return readout(h.flatten(1))

    forward(torch.as_tensor(x_train[:2]))
    epochs = 1 if quick else 15
    optimizer = torch.optim.SGD(list(convs.parameters()) + list(readout.parameters()), lr=0.05, momentum=0.9,
                                weight_decay=3e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    history = {"test_acc": [], "seconds": []}
    for epoch in range(epochs):
        start = time.perf_counter()
        order = np.random.default_rng([0, epoch]).permutation(len(y_train))
        for index, begin in enumerate(range(0, len(order), 32)):
            rows = order[begin:begin + 32]
            xb = crop_flip(x_train[rows], np.random.default_rng([0, epoch, index, 2]))
            loss = F.cross_entropy(forward(torch.as_tensor(xb)), torch.as_tensor(y_train[rows]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
        with torch.no_grad():
            predicted = torch.cat([forward(torch.as_tensor(x_test[b:b + 1000])).argmax(1)
                                   for b in range(0, len(y_test), 1000)])
        history["test_acc"].append(float((predicted.numpy() == y_test).mean()))
        history["seconds"].append(time.perf_counter() - start)
        print(f"bp epoch {epoch + 1}: test {history['test_acc'][-1]:.4f}", file=sys.stderr)
    return {"arch": preset.arch, "epochs": epochs, "test_acc": history["test_acc"][-1],
            "best_test_acc": max(history["test_acc"]), "epoch_s": float(np.median(history["seconds"])),
            "history": history}


GROUPS = {"relax_torch": lambda quick, data: relax_group(quick, data, "torch"),
          "relax_numba": lambda quick, data: relax_group(quick, data, "numba"), "ep": ep_group, "bp": bp_group}


def gpu_figures() -> dict:
    """Seconds per EP epoch and relaxation samples/s of the Laborieux network on CUDA: null without a GPU."""
    try:
        import torch
        available = torch.cuda.is_available()
    except ImportError:
        available = False
    return {"available": available, "gpu_epoch_s": None, "gpu_relax_samples_per_s": None,
            "note": None if available else "no CUDA device on this machine"}


def ratio(groups: dict, batch_key: str):
    """torch time / Numba time to equilibrium of the Laborieux network (> 1: Numba faster)."""
    torch_row = groups["relax_torch"]["networks"][LABORIEUX][batch_key]
    numba_row = groups["relax_numba"]["networks"][LABORIEUX][batch_key]
    return torch_row["time_to_equilibrium_s"] / numba_row["time_to_equilibrium_s"]


def run(args, previous: dict | None) -> dict:
    arguments = ["--data-dir", str(args.data_dir)] + (["--quick"] if args.quick else [])
    wanted = list(GROUPS) if args.groups is None else args.groups
    groups = dict((previous or {}).get("groups", {}))
    groups.update(run_groups(__file__, wanted, arguments))
    missing = sorted(set(GROUPS) - set(groups))
    if missing:
        raise SystemExit(f"groups {missing} are neither run nor in the existing results: run them too")
    gpu = gpu_figures()
    big = "batch8" if args.quick else "batch128"
    return {
        "quick": args.quick,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": THREADS},
        "numba_over_torch_batch1": ratio(groups, "batch1"),
        "numba_over_torch_batch128": ratio(groups, big),
        "numba_note": NUMBA_NOTE,
        "cifar10_cpu_test_acc": groups["ep"]["test_acc"],
        "cifar10_cpu_bp_test_acc": groups["bp"]["test_acc"],
        "cifar10_cpu_epoch_s": groups["ep"]["epoch_s"],
        "gpu_epoch_s": gpu["gpu_epoch_s"],
        "groups": groups, "gpu": gpu,
        "rerun": {"groups": wanted, "at": time.strftime("%Y-%m-%d %H:%M:%S")},
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small settings (under a minute), written to "
                                                                 "benchmarks/results/quick/conv.json by default")
    parser.add_argument("--out", default=None, help="JSON result (default benchmarks/results/conv.json; with --quick "
                        "benchmarks/results/quick/conv.json: never the full results)")
    parser.add_argument("--data-dir", type=Path, default=SHARED_DATA,
                        help="folder holding cifar-10-batches-py (default ../shared/data)")
    parser.add_argument("--groups", type=lambda text: text.split(","), default=None,
                        help=f"run only these groups ({', '.join(GROUPS)}), keeping the others from --out")
    parser.add_argument("--group", choices=sorted(GROUPS), help=argparse.SUPPRESS)  # internal: one group
    args = parser.parse_args(argv)
    if args.group:
        print(json.dumps(GROUPS[args.group](args.quick, args.data_dir)))
        return
    out = output_path("conv", args.quick, args.out)
    unknown = sorted(set(args.groups or []) - set(GROUPS))
    if unknown:
        raise SystemExit(f"unknown groups {unknown}; choose from {', '.join(GROUPS)}")
    previous = None
    if args.groups is not None and out.exists():
        previous = json.loads(out.read_text())
        if previous.get("quick") != args.quick:
            raise SystemExit(f"{out} holds {'quick' if previous.get('quick') else 'full'} results: re-run every group")
    write_results(run(args, previous), out)


if __name__ == "__main__":
    main()

"""Benchmark: relax a 784-512-512-10 network to tol 1e-4 at batch 1 and 256 with every implementation.

    python benchmarks/relax.py [--quick] [--network NET.h5] [--tol 1e-4] [--out benchmarks/results/relax.json]

Implementations: the Numba kernels (fixed_point, the headline; also euler, alternating, rk45), the same equations
in eager torch on CPU (the way the reference EP code bases run: every step recomputes every field, including the
input term, and the batch stops when every sample meets tol, checked every step; also with the input term hoisted),
the plain numpy reference, and scipy's solve_ivp (per sample). Inputs are Fashion-MNIST test images when the Debian
package is installed, else uniform noise of the same size. Also measured in the same run: float32 GEMM GFLOP/s of
numpy (the denominator the issue asks for), of SciPy's BLAS (what the kernels call) and of torch, same shapes.

Reported per implementation: time to equilibrium (median wall time of the whole relaxation), steps, steps/s.
Keys: numba_over_torch_batch{1,256} = torch time / Numba time (> 1: Numba faster), gemm_fraction_batch256 = FLOP/s
of the matrix products the Numba relaxation executes (active rows only) / numpy GEMM FLOP/s.
The JSON is written to --out and printed as the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import output_path, run_groups, wall_times, write_results  # noqa: E402
from ebm_sim import integrators  # noqa: E402
from ebm_sim.network import Network  # noqa: E402
from ebm_sim.relax import relax  # noqa: E402

LAYERS = (784, 512, 512, 10)


def summary(times, steps) -> dict:
    median = statistics.median(times)
    return {"time_to_equilibrium_s": median, "best_s": min(times), "repeats": len(times), "steps": int(steps),
            "steps_per_s": steps / median}


def gemm_rates(repeats: int) -> dict:
    """float32 GFLOP/s of (B, 512) @ (512, 512)^T for B = 1 and 256: numpy (the issue's denominator), SciPy's BLAS
    called the way the kernels call it (no copies), and torch."""
    import torch
    from numba import njit
    from ebm_sim.blas import make_handle, rows_times_wt

    @njit(cache=False)
    def scipy_blas_products(blas, a, w, out, count):
        for _ in range(count):
            rows_times_wt(blas, a.shape[0], a.ctypes.data, a.shape[1], a.shape[1], w.ctypes.data, w.shape[0],
                          out.ctypes.data, w.shape[0], False)

    rng = np.random.default_rng(0)
    w = rng.random((512, 512), dtype=np.float32)
    handle = make_handle(np.float32)
    rates = {}
    for batch in (1, 256):
        a = rng.random((batch, 512), dtype=np.float32)
        out = np.empty((batch, 512), dtype=np.float32)
        ta, tw, tout = torch.from_numpy(a), torch.from_numpy(w), torch.from_numpy(out)
        inner = max(1, 4096 // batch)

        def repeat(fn):
            return lambda: [fn() for _ in range(inner)]

        candidates = {
            "numpy": repeat(lambda: np.matmul(a, w.T, out=out)),
            "scipy_blas": lambda: scipy_blas_products(handle, a, w, out, inner),
            "torch": repeat(lambda: torch.matmul(ta, tw.T, out=tout)),
        }
        for name, fn in candidates.items():
            best = min(wall_times(fn, repeats)) / inner
            rates[f"{name}_gflops_batch{batch}"] = 2 * batch * 512 * 512 / best / 1e9
    return rates


def numba_matmul_flops(network: Network, steps: np.ndarray) -> float:
    """FLOPs of the matrix products the synchronous Numba relaxation runs: the input projection once per sample,
    then per step and per still-active sample W_i s_i and W_i^T s_{i+1} for every W_i, i >= 1."""
    n = network.layer_sizes
    per_row_step = sum(4 * n[i] * n[i + 1] for i in range(1, len(n) - 1))
    return float(2 * n[0] * n[1] * len(steps) + per_row_step * steps.sum())


def load_inputs(batch: int) -> tuple:
    try:
        from ebm_sim.datasets import load_fashion_mnist
        data = load_fashion_mnist()
        return data.x_test[:batch], "fashion-mnist test images"
    except (FileNotFoundError, ValueError):
        return np.random.default_rng(0).random((batch, LAYERS[0]), dtype=np.float32), "uniform noise in [0, 1]"


def numba_group(network, inputs, args, repeats) -> dict:
    """The Numba kernels, every method, batch 1 and 256; also the matmul FLOP rate of fixed_point."""
    compile_start = time.perf_counter()
    for method in integrators.DEPLOYABLE:
        relax(network, inputs[:2], method=method, tol=args.tol)
    out_rows = {"numba_compile_or_cache_load_s": time.perf_counter() - compile_start}
    for batch in (1, 256):
        x, row = inputs[:batch], {}
        for method in integrators.DEPLOYABLE:
            out = relax(network, x, method=method, tol=args.tol, max_steps=5000)
            count = repeats[batch] if method != "rk45" else max(1, repeats[batch] // 5)  # rk45: ~50x slower
            times = wall_times(lambda: relax(network, x, method=method, tol=args.tol, max_steps=5000), count)
            row[f"numba_{method}"] = {**summary(times, out.steps.max()), "converged": float(out.converged.mean()),
                                      "mean_steps": float(out.steps.mean())}
            if method == "fixed_point":
                flops = numba_matmul_flops(network, out.steps)
                row["numba_fixed_point"]["matmul_gflops"] = flops / statistics.median(times) / 1e9
        out_rows[str(batch)] = row
    return out_rows


def torch_group(network, inputs, args, repeats) -> dict:
    """The same equations in eager torch on CPU, reference style and with the input term hoisted."""
    import torch
    from ebm_sim import torch_twin

    out_rows = {"torch_threads": torch.get_num_threads()}
    for batch in (1, 256):
        x, row = inputs[:batch], {}
        for method in ("fixed_point", "euler"):
            for hoist in (False, True):
                name = f"torch_{method}" + ("_hoisted" if hoist else "")
                # per_sample=False: the reference codes' rule, the whole batch steps until every sample meets tol
                def twin():
                    return torch_twin.relax(network, x, method=method, tol=args.tol, max_steps=5000,
                                            hoist_input=hoist, per_sample=False)
                out = twin()
                times = wall_times(twin, repeats[batch])
                row[name] = {**summary(times, int(out.steps.max())),
                             "converged": float(out.converged.float().mean())}
        out_rows[str(batch)] = row
    return out_rows


def reference_group(network, inputs, args, repeats) -> dict:
    """The numpy reference (fixed_point) and scipy's RK45 (per sample, a few samples timed, scaled to the batch)."""
    out_rows, solved = {}, {}
    for batch in (1, 256):
        x, row = inputs[:batch], {}
        out = relax(network, x, method="fixed_point", tol=args.tol, backend="numpy")
        times = wall_times(lambda: relax(network, x, method="fixed_point", tol=args.tol, backend="numpy"),
                           max(1, repeats[batch] // 5))
        row["numpy_fixed_point"] = summary(times, out.steps.max())
        samples = 1 if args.quick else min(batch, 4)
        if samples not in solved:  # (quick: the first sample, timed once, serves both batch sizes: ~30 s each)
            start = time.perf_counter()
            out = relax(network, x[:samples], method="solve_ivp", tol=args.tol, max_steps=20000)
            solved[samples] = (out, (time.perf_counter() - start) / samples)
        out, per_sample = solved[samples]
        row["solve_ivp"] = {"time_to_equilibrium_s": per_sample * batch, "steps": int(out.steps.max()),
                            "steps_per_s": float(out.steps.mean()) / per_sample,
                            "converged": float(out.converged.mean()),
                            "note": f"per-sample solver: {samples} sample(s) timed, time scaled to batch {batch}"}
        out_rows[str(batch)] = row
    return out_rows


GROUPS = {"numba": numba_group, "torch": torch_group, "reference": reference_group,
          "gemm": lambda network, inputs, args, repeats: gemm_rates(5 if args.quick else 20)}


def run_group(args) -> dict:
    """One group of measurements in this process (called in a fresh subprocess per group, see ``run``)."""
    from ebm_sim.storage import load_network

    network = (load_network(args.network) if args.network else Network.init(LAYERS, seed=0)).astype(np.float32)
    if network.layer_sizes[0] != LAYERS[0]:
        raise SystemExit(f"the benchmark needs a network with {LAYERS[0]} inputs, got {network.layer_sizes}")
    inputs, source = load_inputs(256)
    repeats = {1: 20 if args.quick else 100, 256: 3 if args.quick else 10}
    result = GROUPS[args.group](network, inputs, args, repeats)
    result["_meta"] = {"inputs": source, "network_hash": network.content_hash()}
    return result


def run(args) -> dict:
    """Every group in its own process (see ``_common.run_groups``), then the comparison."""
    arguments = ["--tol", str(args.tol)] + (["--quick"] if args.quick else [])
    arguments += ["--network", args.network] if args.network else []
    groups = run_groups(__file__, GROUPS, arguments)
    meta = groups["numba"].pop("_meta")
    for group in groups.values():
        group.pop("_meta", None)
    rates = groups.pop("gemm")
    results = {"network": {"layer_sizes": list(LAYERS), "source": args.network or "Network.init(seed=0)",
                           "hash": meta["network_hash"]},
               "inputs": meta["inputs"], "tol": args.tol, "dtype": "float32",
               "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "torch_threads": groups["torch"].pop("torch_threads")},
               "numba_compile_or_cache_load_s": groups["numba"].pop("numba_compile_or_cache_load_s"),
               "per_batch": {}}
    for batch in ("1", "256"):
        row = {**groups["numba"][batch], **groups["torch"][batch], **groups["reference"][batch]}
        reference = row["numba_fixed_point"]["time_to_equilibrium_s"]
        for entry in row.values():
            entry["time_over_numba_fixed_point"] = entry["time_to_equilibrium_s"] / reference
        results["per_batch"][batch] = row
        torch_time = row["torch_fixed_point"]["time_to_equilibrium_s"]
        results[f"numba_over_torch_batch{batch}"] = torch_time / reference
        results[f"numba_over_torch_hoisted_batch{batch}"] = (
            row["torch_fixed_point_hoisted"]["time_to_equilibrium_s"] / reference)
    results["gemm"] = rates
    achieved = results["per_batch"]["256"]["numba_fixed_point"]["matmul_gflops"]
    best = max(value for key, value in rates.items() if key.endswith("batch256"))
    results["gemm_fraction_batch256"] = achieved / rates["numpy_gflops_batch256"]
    results["gemm_fraction_vs_best_batch256"] = achieved / best
    # issue 17's (the relaxation issue's were 5 and 1.5, met)
    results["targets"] = {"numba_over_torch_batch1": 15.0, "numba_over_torch_batch256": 3.0,
                          "gemm_fraction_batch256": 0.8}
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (under a minute)")
    parser.add_argument("--network", help="an HDF5 network with 784 inputs (default: a seeded random one)")
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--out", default=None, help="JSON result (default benchmarks/results/relax.json; with "
                        "--quick benchmarks/results/quick/relax.json: never the full results)")
    parser.add_argument("--group", choices=sorted(GROUPS), help=argparse.SUPPRESS)  # internal: one group
    args = parser.parse_args(argv)
    if args.group:
        print(json.dumps(run_group(args)))
        return
    out = output_path("relax", args.quick, args.out)
    write_results(run(args), out)


if __name__ == "__main__":
    main()

"""Benchmark: scaling out with Ray (ebm_sim.cluster) on this machine: sharded relaxation and a robustness grid with
1 and 2 Ray workers, and Ray's overhead against the plain single-process path on a small job.

    python benchmarks/scale.py [--quick] [--out benchmarks/results/scale.json]

Each group runs in its own process (``_common.run_groups``), and each Ray group starts its own local Ray:
  plain   the single-process path (no Ray imported): relax_to_file with 1 thread (what one Ray task does) and with
          the default threads (one per core), the robustness grid (torch with 1 thread), the small job
  ray1    a local Ray with 1 CPU (one task at a time): the same work as Ray tasks (1 thread each)
  ray2    a local Ray with 2 CPUs (two tasks at a time)
Relaxation: a seeded 784-512-512-10 network (Network.init(seed=0)) on seeded uniform inputs (N = 30,000; --quick
2,048), fixed_point to tol 1e-4, batches of 256, shards of 1,024 samples. Robustness grid: the digits EBM
(benchmarks/results/networks/digits_64-256-10.h5) under FGSM, PGD Linf/L2 sweeps, the audit, Square and two
corruptions, in chunks of 10 examples (one Ray task per part: model x attack x budget x chunk). Small job: relaxing
512 samples (two batches; one task on Ray), median of 5, once Ray runs and its workers are warm.

Keys: relax_speedup_2_workers, robustness_speedup_2_workers = time with 1 Ray worker / time with 2 (the scaling of
the sharded path); *_vs_single_process = plain single-process time (1 thread) / time with 2 Ray workers;
ray_overhead_s = Ray's time on the small job - the plain path's (Ray already started), ray_overhead_fraction = that
over the plain time; ray_start_s: starting a local Ray (paid once per command with --cluster local). The sharded
file is checked against the single-process one (relax_matches_single_process: content hashes equal) and the Ray
robustness results against the single-process ones (robustness_matches_single_process). ddp_matches_single is the
torch.distributed check of docs/distributed_training.md (``ddp_matches_single()``: EP training in one process and in
two gloo processes with the same global minibatches, parameters within the stated tolerance; details under "ddp"),
robustness_differences where Ray's results differ (empty lists). Timings are wall-clock times of one
run each (the small job: median of 5) on whatever else the machine is doing: on a loaded 2-core machine the
speed-ups are pessimistic. The JSON is written to --out and printed as the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]

from _common import output_path, run_groups, write_results  # noqa: E402

LAYERS = (784, 512, 512, 10)
NET = ROOT / "benchmarks" / "results" / "networks" / "digits_64-256-10.h5"
FULL = {"samples": 30000, "grid_samples": 120}
QUICK = {"samples": 2048, "grid_samples": 20}  # still two shards of 1,024 and two chunks per attack: checks, no figures
BATCH, SHARD, SMALL, SMALL_REPEATS = 256, 1024, 512, 5
GROUPS = ("plain", "ray1", "ray2")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def relax_inputs(samples: int):
    """(network, x (samples, 784) float32 uniform in [0, 1], labels (samples,) int64), seeded."""
    from ebm_sim.network import Network
    rng = np.random.default_rng(0)
    x = rng.random((samples, LAYERS[0]), dtype=np.float32)
    return Network.init(LAYERS, seed=0), x, rng.integers(0, LAYERS[-1], samples)


def grid_config(samples: int):
    """The robustness grid: FGSM, PGD Linf/L2 (2 budgets each), the audit, Square and 2 corruptions x 2
    severities in chunks of 10 examples."""
    from distill.robustness import RobustnessConfig
    return RobustnessConfig.for_dataset(
        "digits", samples=samples, square_samples=samples // 2, audit_samples=samples // 2, pgd_steps=5,
        audit_steps=10, audit_restarts=1, square_queries=50, autoattack=False, min_norm=False,
        corruption_samples=samples, corruptions=("gaussian_noise", "contrast"), severities=(1, 5), batch_size=10,
        sweep_linf=(0.05, 0.1), sweep_l2=(0.5, 1.0))


def timed(function):
    start = time.perf_counter()
    value = function()
    return time.perf_counter() - start, value


def run_group(args) -> dict:
    """One group's measurements (see the module docstring), in this process."""
    import torch

    from distill.robustness import evaluate, load_model_under_test
    from distill.robustness.report import without_timings
    from ebm_sim import storage
    from ebm_sim.batch_relax import relax_to_file
    from ebm_sim.datasets import load_digits

    torch.set_num_threads(1)  # as in every Ray task (OMP_NUM_THREADS=1)
    budget = QUICK if args.quick else FULL
    network, x, labels = relax_inputs(budget["samples"])
    digits = load_digits()
    config = grid_config(budget["grid_samples"])
    result = {"load_average_at_start": list(os.getloadavg())}
    cluster = None
    if args.group != "plain":
        from ebm_sim import cluster as ray_cluster
        result["ray_start_s"], _ = timed(lambda: ray_cluster.connect("local", num_cpus=int(args.group[-1]),
                                                                     log=log))
        cluster = "local"
    quiet = dict(progress=False, log=log)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def relax(name, samples, **options):
            path = tmp / f"{name}.h5"
            seconds, _ = timed(lambda: relax_to_file(network, x[:samples], labels[:samples], path, batch_size=BATCH,
                                                     cluster=cluster, **quiet, **options))
            return seconds, storage.artifact_info(path)["content_hash"]

        def grid(name):
            models = [load_model_under_test(NET, "EBM", (1, 8, 8))]
            seconds, results = timed(lambda: evaluate(models, digits.x_test, digits.y_test, (1, 8, 8), config,
                                                      tmp / name, cluster=cluster, **quiet))
            return seconds, results

        # warm-up (not timed): Numba's cache, and on Ray the workers' start and imports
        relax("warm", SMALL, threads=1, **({"shard_size": BATCH} if cluster else {}))
        if cluster:
            warm = grid_config(20)
            evaluate([load_model_under_test(NET, "EBM", (1, 8, 8))], digits.x_test, digits.y_test, (1, 8, 8),
                     warm, tmp / "warm-grid", cluster=cluster, **quiet)
        sharding = {"shard_size": SHARD} if cluster else {}
        result["relax_s"], result["relax_hash"] = relax("relax", len(x), threads=1, **sharding)
        if not cluster:
            result["relax_default_threads_s"], _ = relax("relax-default", len(x))
        result["small_job_s"] = float(np.median([relax(f"small{i}", SMALL, threads=1,
                                                       **({"shard_size": SMALL} if cluster else {}))[0]
                                                 for i in range(SMALL_REPEATS)]))
        result["grid_s"], results = grid("grid")
        result["grid_parts"] = len(list((tmp / "grid" / "parts").glob("*.json")))
        result["grid_results"] = without_timings(results)
    return result


def differences(a, b, path: str = "") -> list:
    """Where two JSON values differ: a list of paths ("/models/EBM/clean", "[3]", ...)."""
    if type(a) is not type(b):
        return [path or "/"]
    if isinstance(a, dict):
        return [p for k in sorted(set(a) | set(b), key=str)
                for p in ([f"{path}/{k}"] if k not in a or k not in b else differences(a[k], b[k], f"{path}/{k}"))]
    if isinstance(a, list):
        if len(a) != len(b):
            return [path or "/"]
        return [p for i, (u, v) in enumerate(zip(a, b)) for p in differences(u, v, f"{path}[{i}]")]
    return [] if a == b or (a != a and b != b) else [path or "/"]  # NaN equals NaN here


def ddp_matches_single() -> dict:
    """The torch.distributed check (docs/distributed_training.md): EP training of a small dense network in one process
    and in two gloo processes with the same global minibatches (``ebm_sim.distributed.check_matches_single``):
    {"ddp_matches_single": bool, max differences, tolerance, seconds per epoch, ...}."""
    from ebm_sim.distributed import check_matches_single

    return check_matches_single(nprocs=2)


def run(args) -> dict:
    groups = run_groups(__file__, GROUPS, ["--quick"] if args.quick else [])
    plain, one, two = (groups[g] for g in GROUPS)
    budget = QUICK if args.quick else FULL
    ddp = ddp_matches_single()
    results = {
        "quick": bool(args.quick),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_average_at_start": {g: groups[g]["load_average_at_start"] for g in GROUPS},
                    "load_average_at_end": list(os.getloadavg())},
        "relax": {"network": list(LAYERS), "samples": budget["samples"], "batch_size": BATCH, "shard_size": SHARD,
                  "single_process_1_thread_s": plain["relax_s"],
                  "single_process_default_threads_s": plain["relax_default_threads_s"],
                  "ray_1_worker_s": one["relax_s"], "ray_2_workers_s": two["relax_s"]},
        "robustness": {"model": NET.name, "parts": plain["grid_parts"], "examples": budget["grid_samples"],
                       "single_process_s": plain["grid_s"], "ray_1_worker_s": one["grid_s"],
                       "ray_2_workers_s": two["grid_s"]},
        "small_job": {"samples": SMALL, "single_process_s": plain["small_job_s"],
                      "ray_2_workers_s": two["small_job_s"]},
        "relax_speedup_2_workers": one["relax_s"] / two["relax_s"],
        "relax_speedup_2_workers_vs_single_process": plain["relax_s"] / two["relax_s"],
        "robustness_speedup_2_workers": one["grid_s"] / two["grid_s"],
        "robustness_speedup_2_workers_vs_single_process": plain["grid_s"] / two["grid_s"],
        "ray_overhead_s": two["small_job_s"] - plain["small_job_s"],
        "ray_overhead_fraction": (two["small_job_s"] - plain["small_job_s"]) / plain["small_job_s"],
        "ray_start_s": {"1_cpu": one["ray_start_s"], "2_cpus": two["ray_start_s"]},
        "relax_matches_single_process": plain["relax_hash"] == one["relax_hash"] == two["relax_hash"],
        "robustness_matches_single_process": not (differences(plain["grid_results"], one["grid_results"])
                                                  or differences(plain["grid_results"], two["grid_results"])),
        "robustness_differences": {"1_worker": differences(plain["grid_results"], one["grid_results"])[:20],
                                   "2_workers": differences(plain["grid_results"], two["grid_results"])[:20]},
        "ddp_matches_single": ddp["ddp_matches_single"],
        "ddp": ddp,
        "note": "wall-clock times of one run each (the small job: median of 5), on a shared 2-core machine (see "
                "machine.load_average_*): the speed-ups are as measured, pessimistic when other work runs",
    }
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller jobs (under two minutes)")
    parser.add_argument("--out", default=None, help="JSON result (default benchmarks/results/scale.json; with "
                        "--quick benchmarks/results/quick/scale.json: never the full results)")
    parser.add_argument("--group", choices=GROUPS, help=argparse.SUPPRESS)  # internal: one group
    args = parser.parse_args(argv)
    if args.group:
        print(json.dumps(run_group(args)))
        return
    out = output_path("scale", args.quick, args.out)
    write_results(run(args), out)


if __name__ == "__main__":
    main()

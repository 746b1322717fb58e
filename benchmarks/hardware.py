"""Benchmark: the Lava mapping's fidelity and the inference cost of EBMs across hardware targets.

    python benchmarks/hardware.py [--quick] [--out benchmarks/results/hardware.json]

Networks (benchmarks/results/networks/, trained by benchmarks/train.py): digits 64-256-10 on its 360 test images,
and the Fashion-MNIST 784-512-10 and 784-512-512-10 networks on 2,000 test images (seeded, class-stratified: Lava
simulates about 1 ms per step, 31 steps per sample). For each: a distilled student (``ebm relax --split train`` at the
deployed settings, then ``ebm distill`` for 30 epochs, its default, in a temporary folder), then ``hardware.targets.compare``: the
EBM on Numba, torch CPU (and CUDA), the student on torch and onnxruntime (CPU, CUDA), the Lava graph in float and
fixed point, and the Loihi cost model's estimate, every target in its own process, all on the same images.
Deployed relaxation: fixed_point (dt 1), tol 1e-4, at most 30 steps, as the networks were trained.

Headline keys: lava_float_agreement (Lava float vs Numba predictions, the lowest over the networks),
lava_fixed_acc_drop (points of accuracy Lava fixed point loses against Numba, the largest), lava_ms_per_step and
targets (of the headline network: fashion_deep, or digits with --quick). --quick: digits only, 120 images, a
5-epoch student, fewer repetitions (under two minutes). JSON to --out, printed as the last line.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# this script is named like the `hardware` package: keep its folder behind the repository root on the path
HERE = Path(__file__).resolve().parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]

from _common import output_path, write_results  # noqa: E402
from hardware.targets import CompareSpec, compare, format_table  # noqa: E402

NETWORKS = ROOT / "benchmarks" / "results" / "networks"
FULL = {"digits": ("digits", "digits_64-256-10.h5", None),
        "fashion": ("fashion-mnist", "fashion_784-512-10.h5", 2000),
        "fashion_deep": ("fashion-mnist", "fashion_deep_784-512-512-10.h5", 2000)}
QUICK = {"digits": ("digits", "digits_64-256-10.h5", 120)}
DEPLOYED = {"tol": 1e-4, "max_steps": 30}


def make_student(network: Path, dataset: str, folder: Path, epochs: int) -> Path:
    """Relax the training split at the deployed settings and distill a student, with the ebm command line (its own
    processes, so torch's threads never overlap the timings)."""
    fixed_points, student = folder / "fp_train.h5", folder / "student.h5"
    ebm = [sys.executable, "-m", "ebm_cli"]
    for command in ([*ebm, "relax", str(network), "--dataset", dataset, "--split", "train", "--method", "fixed_point",
                     "--tol", str(DEPLOYED["tol"]), "--max-steps", str(DEPLOYED["max_steps"]), "--no-progress",
                     "-o", str(fixed_points)],
                    [*ebm, "distill", str(network), str(fixed_points), "--epochs", str(epochs), "--no-progress",
                     "-o", str(student)]):
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command[2:4])} failed:\n{done.stderr[-3000:]}")
    return student


def run_case(name: str, dataset: str, filename: str, limit, quick: bool) -> dict:
    network = NETWORKS / filename
    if not network.exists():
        raise SystemExit(f"{network} is missing: run `python benchmarks/train.py` first (it trains and writes it)")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        student = make_student(network, dataset, Path(tmp), epochs=5 if quick else 30)
        student_s = time.perf_counter() - start
        spec = CompareSpec(network=str(network), dataset=dataset, limit=limit, student=str(student),
                           latency_samples=30 if quick else 200, repeats=3 if quick else 10)
        start = time.perf_counter()
        result = compare(spec, progress=False)
        compare_s = time.perf_counter() - start
    print(format_table(result), file=sys.stderr, flush=True)
    rows = {row["name"]: row for row in result["targets"]}
    numba, lava_float, lava_fixed = rows["numba_cpu"], rows["lava_float"], rows["lava_fixed"]
    return {"network_file": str(network.relative_to(ROOT)), "dataset": dataset, "n_samples": result["n_samples"],
            "lava_float_agreement": lava_float.get("agreement"),
            "lava_fixed_agreement": lava_fixed.get("agreement"),
            "lava_fixed_acc_drop": 100 * (numba["accuracy"] - lava_fixed["accuracy"]),
            "lava_fixed_acc_drop_vs_lava_float": 100 * (lava_float["accuracy"] - lava_fixed["accuracy"]),
            "lava_ms_per_step": {"float": lava_float.get("ms_per_step"), "fixed": lava_fixed.get("ms_per_step")},
            "targets": [_target_entry(row) for row in result["targets"]], "failed": result["failed"],
            "student_s": student_s, "compare_s": compare_s, "student_epochs": 5 if quick else 30}


def _target_entry(row: dict) -> dict:
    """A row with the keys the issue asks for first (None where the target did not run)."""
    keys = ("name", "latency_ms_batch1", "samples_per_s", "energy_uj", "energy_kind")
    entry = {key: row.get(key) for key in keys}
    if entry["energy_kind"] is None:
        entry["energy_kind"] = "not measured"
    entry.update({k: v for k, v in row.items() if k not in keys})
    return entry


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits only, small settings (under two minutes)")
    parser.add_argument("--out", default=None, help="JSON result (default benchmarks/results/hardware.json; with "
                        "--quick benchmarks/results/quick/hardware.json: never the full results)")
    args = parser.parse_args(argv)
    out = output_path("hardware", args.quick, args.out)
    cases = QUICK if args.quick else FULL
    started = time.perf_counter()
    results = {"quick": args.quick, "deployed_relaxation": {"method": "fixed_point", **DEPLOYED},
               "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                           "load_average_at_start": os.getloadavg()},
               "cases": {}}
    for name, (dataset, filename, limit) in cases.items():
        results["cases"][name] = run_case(name, dataset, filename, limit, args.quick)
    headline = results["cases"]["digits" if args.quick else "fashion_deep"]
    results["headline_case"] = "digits" if args.quick else "fashion_deep"
    results["lava_float_agreement"] = min(c["lava_float_agreement"] for c in results["cases"].values())
    results["lava_fixed_acc_drop"] = max(c["lava_fixed_acc_drop"] for c in results["cases"].values())
    results["lava_ms_per_step"] = headline["lava_ms_per_step"]["float"]
    results["targets"] = headline["targets"]
    results["machine"]["load_average_at_end"] = os.getloadavg()
    results["total_s"] = time.perf_counter() - started
    write_results(results, out)


if __name__ == "__main__":
    main()

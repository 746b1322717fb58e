"""Benchmark: distill a trained EBM into a feedforward student; fidelity and inference cost of both.

    python benchmarks/distill.py [--quick] [--out benchmarks/results/distill.json]

Networks: the EP-trained Fashion-MNIST EBMs of benchmarks/train.py (benchmarks/results/networks/), 784-512-512-10
(the headline) and 784-512-10. For each: relax the training and test sets at the deployed settings (fixed_point,
tol 1e-4, at most 30 steps: the free phase the network was trained with), distill a student with the same layer
sizes (distill.train.distill, default DistillConfig), and report EBM test accuracy, student test accuracy and
their prediction agreement on the test set.
Inference cost, both sides at their best: the EBM with its fastest integrator to the deployed tolerance (Numba
fixed_point and alternating; torch CPU fixed_point, per-sample stopping), the student in torch CPU, onnxruntime
CPU and plain numpy; latency per sample at batch 1 (mean over single-sample calls on different images) and
samples/s at batch 256. speedup = fastest EBM path / fastest student path.
--quick: the digits EBM of benchmarks/train.py (64-256-10) instead, few epochs and repetitions (under a minute).
Each group runs in its own process (see _common.run_groups). JSON to --out, printed as the last line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# this script is named like the `distill` package: keep its folder behind the repository root on the path
HERE = Path(__file__).resolve().parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]

from _common import run_groups, wall_times, write_results  # noqa: E402
from ebm_sim import storage  # noqa: E402
from ebm_sim.datasets import load_dataset  # noqa: E402
from ebm_sim.relax import relax  # noqa: E402

NETWORKS = ROOT / "benchmarks" / "results" / "networks"
FULL = {"deep": ("fashion-mnist", "fashion_deep_784-512-512-10.h5"), "shallow": ("fashion-mnist",
                                                                                 "fashion_784-512-10.h5")}
QUICK = {"deep": ("digits", "digits_64-256-10.h5")}
DEPLOYED = dict(tol=1e-4, max_steps=30)


def cases(quick: bool) -> dict:
    return QUICK if quick else FULL


def load(case: str, quick: bool):
    dataset, filename = cases(quick)[case]
    path = NETWORKS / filename
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `python benchmarks/train.py` first (it trains and writes it)")
    return storage.load_network(path), load_dataset(dataset), path


def relax_set(network, x, labels, directory: Path, name: str):
    """Relax a whole set at the deployed settings and store it as a fixed-point file (as `ebm relax` does)."""
    states, steps, residuals, converged = [], [], [], []
    for start in range(0, len(x), 1024):
        result = relax(network, x[start:start + 1024], method="fixed_point", on_divergence="flag", **DEPLOYED)
        states.append(result.states)
        steps.append(result.steps)
        residuals.append(result.residual)
        converged.append(result.converged)
    path = directory / f"{name}.h5"
    storage.save_fixed_points(path, x, labels, [np.concatenate(layer) for layer in zip(*states)],
                              np.concatenate(residuals), np.concatenate(steps), np.concatenate(converged),
                              {"method": "fixed_point", **DEPLOYED}, network.content_hash())
    return storage.load_fixed_points(path, network), path


def fidelity_group(case: str, quick: bool) -> dict:
    """Relax, distill, compare on the test set; the student is written next to the EBM for the cost groups."""
    from distill.config import DistillConfig
    from distill.io import save_model
    from distill.train import compare_with_ebm, distill

    network, data, path = load(case, quick)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        train_fp, train_path = relax_set(network, data.x_train, data.y_train, Path(tmp), "train")
        test_fp, _ = relax_set(network, data.x_test, data.y_test, Path(tmp), "test")
        relax_s = time.perf_counter() - start
        config = DistillConfig(epochs=5 if quick else 30)
        start = time.perf_counter()
        student, history = distill(network, train_fp, config, progress=False,
                                   log=lambda msg: print(msg, file=sys.stderr, flush=True))
        distill_s = time.perf_counter() - start
        comparison = compare_with_ebm(student, network, test_fp)
        student_path = Path(tmp).parent / f"ebm-benchmark-student-{case}-{network.content_hash()[:12]}.h5"
        save_model(student_path, student, "distilled", config.as_dict(), dataset=data.name,
                   network_hash=network.content_hash(), fixed_points_hash=storage.artifact_info(train_path)[
                       "content_hash"])
    return {"network_file": str(path.relative_to(ROOT)), "layer_sizes": list(network.layer_sizes),
            "dataset": data.name, "ebm_test_acc": comparison["ebm_accuracy"],
            "distilled_test_acc": comparison["accuracy"], "agreement": comparison["agreement"],
            "state_mse": comparison["state_mse"], "distill_epochs_run": len(history["epoch"]),
            "relax_train_and_test_s": relax_s, "distill_s": distill_s,
            "free_steps_mean_test": float(np.mean(test_fp.steps)), "student_file": str(student_path),
            "distill_config": config.as_dict()}


def per_sample_latency(fn, images, count: int) -> float:
    """Mean seconds of fn(one image) over ``count`` different images (after a warm-up call)."""
    fn(images[:1])
    start = time.perf_counter()
    for i in range(count):
        fn(images[i:i + 1])
    return (time.perf_counter() - start) / count


def cost_entry(fn, images, quick: bool, steps=None) -> dict:
    latency = per_sample_latency(fn, images, 50 if quick else 300)
    batch_s = statistics.median(wall_times(lambda: fn(images[:256]), 3 if quick else 10))
    entry = {"latency_ms_batch1": latency * 1e3, "samples_per_s_batch256": 256 / batch_s}
    if steps is not None:
        entry["steps_mean"] = steps
    return entry


def ebm_numba_group(case: str, quick: bool) -> dict:
    network, data, _ = load(case, quick)
    images = data.x_test
    out = {}
    for method in ("fixed_point", "alternating"):
        steps = float(relax(network, images[:256], method=method, **DEPLOYED).steps.mean())
        out[f"numba_{method}"] = cost_entry(lambda x: relax(network, x, method=method, **DEPLOYED), images,
                                            quick, steps)
    return out


def ebm_torch_group(case: str, quick: bool) -> dict:
    from ebm_sim import torch_twin

    network, data, _ = load(case, quick)
    twin = torch_twin.TorchNetwork.from_network(network)
    return {"torch_fixed_point": cost_entry(
        lambda x: torch_twin.relax(twin, x, "fixed_point", hoist_input=True, **DEPLOYED), data.x_test, quick)}


def student_group(case: str, quick: bool) -> dict:
    import torch

    from distill.io import load_model
    from distill.onnx_export import OnnxClassifier, export_onnx

    network, data, _ = load(case, quick)
    student_path = Path(tempfile.gettempdir()) / f"ebm-benchmark-student-{case}-{network.content_hash()[:12]}.h5"
    model = load_model(student_path)
    images = data.x_test
    out = {}
    with torch.no_grad():
        out["student_torch"] = cost_entry(lambda x: model(torch.from_numpy(x)), images, quick)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(model, Path(tmp) / "student.onnx", input_shape=network.layer_sizes[0])
        session = OnnxClassifier(onnx_path, check_inputs=False)
        out["student_onnxruntime"] = cost_entry(session, images, quick)
    weights = [layer.weight.detach().numpy().T.copy() for layer in model.linears]
    biases = [layer.bias.detach().numpy().copy() for layer in model.linears]
    slope, readout = model.slope, model.readout

    def numpy_forward(x):
        """The student's forward in plain numpy: hidden layers clip(a (h W + b), 0, 1), linear last layer (scaled by
        the slope without a readout, as FeedForward.forward)."""
        for w, b in zip(weights[:-1], biases[:-1]):
            x = np.clip(slope * (x @ w + b), 0.0, 1.0)
        logits = x @ weights[-1] + biases[-1]
        return logits if readout else slope * logits

    agreement = float(np.mean(numpy_forward(images[:512]).argmax(1)
                              == model(torch.from_numpy(images[:512])).detach().numpy().argmax(1)))
    out["student_numpy"] = {**cost_entry(numpy_forward, images, quick), "agrees_with_torch": agreement}
    return out


GROUPS = {"fidelity": fidelity_group, "ebm_numba": ebm_numba_group, "ebm_torch": ebm_torch_group,
          "student": student_group}


def run(args) -> dict:
    results = {"quick": args.quick, "deployed_relaxation": {"method": "fixed_point or alternating", **DEPLOYED},
               "cases": {}}
    for case in cases(args.quick):
        groups = run_groups(__file__, GROUPS, ["--case", case] + (["--quick"] if args.quick else []))
        costs = {**groups["ebm_numba"], **groups["ebm_torch"], **groups["student"]}
        ebm = {k: v for k, v in costs.items() if not k.startswith("student")}
        students = {k: v for k, v in costs.items() if k.startswith("student")}
        best_ebm_latency = min(v["latency_ms_batch1"] for v in ebm.values())
        best_ebm_rate = max(v["samples_per_s_batch256"] for v in ebm.values())
        best_student_latency = min(v["latency_ms_batch1"] for v in students.values())
        best_student_rate = max(v["samples_per_s_batch256"] for v in students.values())
        Path(groups["fidelity"].pop("student_file")).unlink(missing_ok=True)  # written for the cost groups
        results["cases"][case] = {**groups["fidelity"], "cost": costs,
                                  "speedup_batch1": best_ebm_latency / best_student_latency,
                                  "speedup_batch256": best_student_rate / best_ebm_rate}
    headline = results["cases"]["deep"]
    for key in ("ebm_test_acc", "distilled_test_acc", "agreement", "speedup_batch1", "speedup_batch256"):
        results[key] = headline[key]
    results["targets"] = {"distilled_within_points_of_ebm": 1.0, "agreement": 0.97, "speedup_batch1": 50,
                          "speedup_batch256": 20}
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the digits network, small settings (under a minute)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distill.json"))
    parser.add_argument("--group", choices=sorted(GROUPS), help=argparse.SUPPRESS)  # internal: one group
    parser.add_argument("--case", default="deep", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.group:
        print(json.dumps(GROUPS[args.group](args.case, args.quick)))
        return
    write_results(run(args), args.out)


if __name__ == "__main__":
    main()

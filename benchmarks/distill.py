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
samples/s at batch 256; torch and onnxruntime with 1 and 2 threads, the better of the two for each figure.
speedup = fastest EBM path / fastest float32 student path (the same precision on both sides). Reported beside it,
not instead: the student quantized to int8 for onnxruntime (distill.onnx_export.quantize_onnx), with its own test
accuracy and agreement with the EBM (predicted one sample at a time), and its speedups (`*_int8`).
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

from _common import output_path, run_groups, wall_times, write_results  # noqa: E402
from ebm_sim import storage  # noqa: E402
from ebm_sim.batch_relax import relax_to_file  # noqa: E402
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
    """Relax a whole set at the deployed settings into a fixed-point file (`ebm relax`'s code path)."""
    path = directory / f"{name}.h5"
    relax_to_file(network, x, labels, path, method="fixed_point", batch_size=1024, progress=False,
                  log=lambda msg: None, **DEPLOYED)
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


def torch_threads(fn, threads: int):
    """fn, run with torch's intra-op thread count set to ``threads`` (set once, then only checked)."""
    import torch

    def run(x):
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return fn(x)
    return run


def ebm_torch_group(case: str, quick: bool) -> dict:
    from ebm_sim import torch_twin

    network, data, _ = load(case, quick)
    twin = torch_twin.TorchNetwork.from_network(network)

    def relax_twin(x):
        return torch_twin.relax(twin, x, "fixed_point", hoist_input=True, **DEPLOYED)
    return {"torch_fixed_point": best_cost({f"{n} threads": torch_threads(relax_twin, n) for n in (1, 2)},
                                           data.x_test, quick)}


def best_cost(fns: dict, images, quick: bool) -> dict:
    """cost_entry of each variant (e.g. thread counts) of one target; the best latency and the best rate, and which
    variant gave each."""
    entries = {name: cost_entry(fn, images, quick) for name, fn in fns.items()}
    fastest = min(entries, key=lambda name: entries[name]["latency_ms_batch1"])
    busiest = max(entries, key=lambda name: entries[name]["samples_per_s_batch256"])
    return {"latency_ms_batch1": entries[fastest]["latency_ms_batch1"], "latency_variant": fastest,
            "samples_per_s_batch256": entries[busiest]["samples_per_s_batch256"], "rate_variant": busiest}


def student_group(case: str, quick: bool) -> dict:
    import torch

    from distill.io import load_model
    from distill.onnx_export import OnnxClassifier, export_onnx, quantize_onnx

    network, data, _ = load(case, quick)
    student_path = Path(tempfile.gettempdir()) / f"ebm-benchmark-student-{case}-{network.content_hash()[:12]}.h5"
    model = load_model(student_path)
    images = data.x_test
    out = {}
    with torch.no_grad():
        out["student_torch"] = best_cost({f"{n} threads": torch_threads(lambda x: model(torch.from_numpy(x)), n)
                                          for n in (1, 2)}, images, quick)
        float_predictions = model(torch.from_numpy(images)).argmax(1).numpy()
    ebm_predictions = np.concatenate([relax(network, images[i:i + 1024], method="fixed_point",
                                            on_divergence="flag", **DEPLOYED).predictions()
                                      for i in range(0, len(images), 1024)])
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(model, Path(tmp) / "student.onnx", input_shape=network.layer_sizes[0])
        int8_path = quantize_onnx(onnx_path, Path(tmp) / "student-int8.onnx")
        for name, path in (("student_onnxruntime", onnx_path), ("student_onnxruntime_int8", int8_path)):
            sessions = {f"{threads or 'default'} threads": OnnxClassifier(path, intra_op_threads=threads,
                                                                          check_inputs=False)
                        for threads in (1, None)}
            out[name] = best_cost(sessions, images, quick)
        # int8 predictions one sample at a time (its activation scales are per call), as deployed at batch 1
        int8 = sessions["1 threads"]
        int8_predictions = np.array([int(int8(images[i:i + 1]).argmax()) for i in range(len(images))])
        out["student_onnxruntime_int8"].update(
            test_acc=float(np.mean(int8_predictions == data.y_test)),
            agreement_with_ebm=float(np.mean(int8_predictions == ebm_predictions)),
            agreement_with_float_student=float(np.mean(int8_predictions == float_predictions)))
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

    agreement = float(np.mean(numpy_forward(images[:512]).argmax(1) == float_predictions[:512]))
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
        float_students = {k: v for k, v in costs.items() if k.startswith("student") and not k.endswith("int8")}
        best_ebm_latency = min(v["latency_ms_batch1"] for v in ebm.values())
        best_ebm_rate = max(v["samples_per_s_batch256"] for v in ebm.values())
        int8 = costs["student_onnxruntime_int8"]
        Path(groups["fidelity"].pop("student_file")).unlink(missing_ok=True)  # written for the cost groups
        results["cases"][case] = {
            **groups["fidelity"], "cost": costs,
            "speedup_batch1": best_ebm_latency / min(v["latency_ms_batch1"] for v in float_students.values()),
            "speedup_batch256": max(v["samples_per_s_batch256"] for v in float_students.values()) / best_ebm_rate,
            "speedup_batch1_int8": best_ebm_latency / int8["latency_ms_batch1"],
            "speedup_batch256_int8": int8["samples_per_s_batch256"] / best_ebm_rate,
            "int8_test_acc": int8["test_acc"], "int8_agreement": int8["agreement_with_ebm"]}
    headline = results["cases"]["deep"]
    for key in ("ebm_test_acc", "distilled_test_acc", "agreement", "speedup_batch1", "speedup_batch256",
                "speedup_batch1_int8", "speedup_batch256_int8", "int8_test_acc", "int8_agreement"):
        results[key] = headline[key]
    results["targets"] = {"distilled_within_points_of_ebm": 1.0, "agreement": 0.97, "speedup_batch1": 50,
                          "speedup_batch256": 20}
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the digits network, small settings (under a minute)")
    parser.add_argument("--out", default=None, help="JSON result (default benchmarks/results/distill.json; with "
                        "--quick benchmarks/results/quick/distill.json: never the full results)")
    parser.add_argument("--group", choices=sorted(GROUPS), help=argparse.SUPPRESS)  # internal: one group
    parser.add_argument("--case", default="deep", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.group:
        print(json.dumps(GROUPS[args.group](args.case, args.quick)))
        return
    out = output_path("distill", args.quick, args.out)
    write_results(run(args), out)


if __name__ == "__main__":
    main()

"""Inference cost of one network across hardware targets, measured on the same inputs (``ebm hardware compare``).

    spec = CompareSpec(network="net.h5", dataset="digits", student="student.h5")
    result = compare(spec)                     # every target in its own process
    print(format_table(result)); plot_bars(result, "compare.png")

Targets (TARGETS): the EBM relaxed by the Numba kernels, by the torch twin on the CPU and on CUDA; the distilled
student in torch and onnxruntime, on the CPU and CUDA; the Lava graph in float and fixed point (Lava's CPU
simulation); and the Loihi cost model's estimate for the fixed-point program. Per target: latency per sample at
batch 1 (mean over single-sample calls on different images), samples/s at the largest batch it takes (``batch`` for
the CPU/GPU paths; 1 for Lava, which streams samples, and for the chip estimate), mean steps to equilibrium,
accuracy, agreement with the Numba predictions, and energy per inference: measured (CPU package RAPL counters, when
readable), estimated (the cost model, labelled with its chip and source) or unknown. A target that cannot run here
(no GPU, no student) is listed as not measured, with the reason.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

TARGETS = ("numba_cpu", "torch_cpu", "torch_cuda", "student_torch_cpu", "student_onnxruntime_cpu",
           "student_torch_cuda", "student_onnxruntime_cuda", "lava_float", "lava_fixed", "loihi_estimate")
LABELS = {"numba_cpu": "EBM, Numba CPU", "torch_cpu": "EBM, torch CPU", "torch_cuda": "EBM, torch CUDA",
          "student_torch_cpu": "student, torch CPU", "student_onnxruntime_cpu": "student, onnxruntime CPU",
          "student_torch_cuda": "student, torch CUDA", "student_onnxruntime_cuda": "student, onnxruntime CUDA",
          "lava_float": "Lava sim, floating_pt", "lava_fixed": "Lava sim, fixed_pt",
          "loihi_estimate": "Loihi (cost model)"}
STUDENT_TARGETS = tuple(t for t in TARGETS if t.startswith("student_"))


@dataclass
class CompareSpec:
    """What ``compare`` measures: the network file, the data (``limit`` seeded, class-stratified test samples, or
    the whole test split), an optional student file, the relaxation (dt, steps, tol; dt = 1 is fixed_point; None:
    the network's stored ``Deployment``),
    the throughput batch, the number of single-sample latency calls, the repeats of the batch timing, an optional
    cap on the samples Lava runs (its simulation is slow), and an optional cost-table JSON (default: Loihi)."""

    network: str
    dataset: str = "digits"
    data_dir: str | None = None
    limit: int | None = None
    student: str | None = None
    batch: int = 256
    latency_samples: int = 100
    repeats: int = 5
    lava_limit: int | None = None
    dt: float | None = None
    steps: int | None = None
    tol: float | None = None
    cost_table: str | None = None

    def __post_init__(self):
        for name in ("batch", "latency_samples", "repeats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("limit", "lava_limit"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        for name in ("network", "student", "cost_table"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise FileNotFoundError(f"{name}: no such file {value}")
        if None in (self.dt, self.steps, self.tol):  # the relaxation the network is deployed with fills the gaps
            from ebm_sim.deployment import Deployment

            from .mapping import RELAXATION_KEYS, relaxation_with
            given = {key: getattr(self, key) for key in RELAXATION_KEYS if getattr(self, key) is not None}
            for key, value in relaxation_with(Deployment.of_network_file(self.network), given).items():
                setattr(self, key, value)

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- loading
def _load(spec: CompareSpec):
    """(network, images (N, n_0), labels (N,)) for a spec; ValueError if the network does not fit the data."""
    from ebm_sim import storage

    from .evaluate import load_test_inputs

    network = storage.load_dense_network(spec.network, "the hardware targets")
    x, y = load_test_inputs(spec.dataset, spec.data_dir, spec.limit, network.layer_sizes[0])
    return network, x, y


def _load_student(spec: CompareSpec, network):
    """The student as a torch module; a distilled student must come from this network (its stored hash)."""
    from distill.io import load_model

    model = load_model(spec.student)
    record = model.provenance
    if record.kind == "distilled" and record.network_hash != network.content_hash():
        raise ValueError(f"{spec.student} was distilled from network {str(record.network_hash)[:12]}, not from "
                         f"{spec.network} ({network.content_hash()[:12]})")
    if tuple(model.layer_sizes)[0] != network.layer_sizes[0]:
        raise ValueError(f"{spec.student} takes {model.layer_sizes[0]} inputs, the network {network.layer_sizes[0]}")
    return model


def check_spec(spec: CompareSpec) -> None:
    """Load what the targets will load (network, data, student) once, so user errors surface before any timing."""
    network, _, _ = _load(spec)
    if spec.student is not None:
        _load_student(spec, network)
    if spec.cost_table is not None:
        from .cost_model import CostTable
        CostTable.from_json(spec.cost_table)
    from .mapping import float_program
    float_program(network, dt=spec.dt, steps=spec.steps, tol=spec.tol)  # mappable, and valid relaxation settings


# ---------------------------------------------------------------------------------------------- measuring
def _batch_of(x: np.ndarray, batch: int) -> np.ndarray:
    """``batch`` images: the first ones, repeated when there are fewer."""
    return x[:batch] if len(x) >= batch else np.resize(x, (batch,) + x.shape[1:])


def _not_measured(name: str, reason: str) -> dict:
    return {"name": name, "label": LABELS[name], "measured": False, "reason": reason}


THREAD_COUNTS = (1, None)  # None: the library's default (one per core); the better of the two is reported


def _timed(name: str, variants: dict, x: np.ndarray, spec: CompareSpec, sync=None) -> dict:
    """Latency at batch 1 and samples/s at spec.batch (median of repeats) of each variant (e.g. thread counts) of a
    target; the best latency and the best rate are kept, with the variant that gave each, and the RAPL energy per
    sample of the variant with the best rate. Under load on a small machine one thread can beat two."""
    from .timing import EnergyMeter, per_sample_latency, wall_times

    batch = _batch_of(x, spec.batch)
    best = {}
    for variant, fn in variants.items():
        def call(images, fn=fn):
            out = fn(images)
            if sync is not None:
                sync()
            return out

        latency = per_sample_latency(call, x, spec.latency_samples)
        with EnergyMeter() as meter:
            times = wall_times(lambda: call(batch), spec.repeats)
        rate = spec.batch / statistics.median(times)
        if "latency" not in best or latency < best["latency"][0]:
            best["latency"] = (latency, variant)
        if "rate" not in best or rate > best["rate"][0]:
            best["rate"] = (rate, variant, meter)
    row = {"name": name, "label": LABELS[name], "measured": True, "latency_ms_batch1": 1e3 * best["latency"][0],
           "samples_per_s": best["rate"][0], "batch": spec.batch, "timing_kind": "measured",
           "best_variant": {"latency": best["latency"][1], "samples_per_s": best["rate"][1]}}
    row.update(_energy_fields(best["rate"][2], spec.batch * (spec.repeats + 1)))
    return row


def _torch_threads(fn, threads):
    """fn run with torch's intra-op threads set to ``threads`` (None: one per available core)."""
    import torch

    count = threads or len(os.sched_getaffinity(0))

    def run(images):
        if torch.get_num_threads() != count:
            torch.set_num_threads(count)
        return fn(images)

    return run


def _thread_name(threads) -> str:
    return f"{threads} thread" if threads == 1 else "default threads"


def _energy_fields(meter, samples: int) -> dict:
    if meter.joules is None:
        return {"energy_uj": None, "energy_kind": "unknown", "energy_note": f"not measured: {meter.reason}"}
    return {"energy_uj": 1e6 * meter.joules / samples, "energy_kind": "measured",
            "energy_note": "CPU package energy (RAPL) over the batch timing, including everything else running"}


def _ebm_row(name: str, spec: CompareSpec, device: str) -> dict:
    network, x, y = _load(spec)
    method = "fixed_point" if spec.dt == 1 else "euler"
    if device == "numba":
        from ebm_sim.relax import relax

        def run(images, threads=None):
            return relax(network, images, method=method, tol=spec.tol, max_steps=spec.steps, dt=spec.dt,
                         threads=threads)

        full = run(x)
        predictions, steps, sync = full.predictions(), full.steps, None
        variants = {_thread_name(n): (lambda images, n=n: run(images, n)) for n in THREAD_COUNTS}
    else:
        import torch

        from ebm_sim import torch_twin
        if device == "cuda" and not torch.cuda.is_available():
            return _not_measured(name, "no CUDA device here")
        twin = torch_twin.TorchNetwork.from_network(network, device)

        def run(images):
            return torch_twin.relax(twin, images, method, spec.tol, spec.steps, dt=spec.dt, hoist_input=True,
                                    device=device)

        full = run(x)
        predictions = full.logits.argmax(1).cpu().numpy()
        steps = full.steps.cpu().numpy()
        sync = torch.cuda.synchronize if device == "cuda" else None
        variants = ({_thread_name(n): _torch_threads(run, n) for n in THREAD_COUNTS} if device == "cpu"
                    else {"cuda": run})
    row = _timed(name, variants, x, spec, sync)
    row.update(steps_mean=float(np.mean(steps)), accuracy=float(np.mean(predictions == y)), n_samples=len(y),
               predictions=predictions.tolist())
    return row


def _student_row(name: str, spec: CompareSpec) -> dict:
    if spec.student is None:
        return _not_measured(name, "no student given (--student)")
    import torch

    network, x, y = _load(spec)
    model = _load_student(spec, network)
    runtime, device = name.split("_")[1], name.split("_")[2]
    if runtime == "torch":
        if device == "cuda" and not torch.cuda.is_available():
            return _not_measured(name, "no CUDA device here")
        model = model.to(device)

        def run(images):
            with torch.no_grad():
                return model(torch.as_tensor(images, device=device)).cpu().numpy()

        variants = ({_thread_name(n): _torch_threads(run, n) for n in THREAD_COUNTS} if device == "cpu"
                    else {"cuda": run})
        row = _timed(name, variants, x, spec, torch.cuda.synchronize if device == "cuda" else None)
        predictions = run(x).argmax(1)
    else:
        import onnxruntime as ort

        from distill.onnx_export import OnnxClassifier, export_onnx
        provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
        if provider not in ort.get_available_providers():
            return _not_measured(name, f"this onnxruntime has no {provider}")
        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(model, Path(tmp) / "student.onnx", input_shape=network.layer_sizes[0])
            sessions = {_thread_name(n): OnnxClassifier(path, intra_op_threads=n, providers=[provider],
                                                        check_inputs=False) for n in THREAD_COUNTS}
            row = _timed(name, sessions, x, spec)
            predictions = next(iter(sessions.values()))(x).argmax(1)
    row.update(steps_mean=None, accuracy=float(np.mean(predictions == y)), n_samples=len(y),
               predictions=np.asarray(predictions).tolist())
    return row


def _lava_row(name: str, spec: CompareSpec) -> dict:
    from .lava_run import run_lava
    from .mapping import to_program
    from .timing import EnergyMeter

    network, x, y = _load(spec)
    kind = name.split("_")[1]
    try:
        program = to_program(network, kind, dt=spec.dt, steps=spec.steps, tol=spec.tol)
    except ValueError as e:  # weights that do not quantize: the other targets still run
        return _not_measured(name, f"not mappable: {e}")
    x, y = x[:spec.lava_limit], y[:spec.lava_limit]
    with EnergyMeter() as meter:
        result = run_lava(program, x)
    predictions = result.predictions()
    row = {"name": name, "label": LABELS[name], "measured": True, "latency_ms_batch1": result.ms_per_sample,
           "samples_per_s": 1e3 / result.ms_per_sample, "batch": 1, "timing_kind": "measured",
           "steps_mean": float(np.mean(result.steps)), "accuracy": float(np.mean(predictions == y)),
           "n_samples": len(y), "predictions": predictions.tolist(), "ms_per_step": result.ms_per_step,
           "lava_steps_per_sample": program.steps + 1, "setup_s": result.setup_s,
           "note": f"every sample runs all {program.steps} Euler steps plus one reset step; latency excludes "
                   f"compiling ({result.setup_s:.1f} s) and reading records"}
    row.update(_energy_fields(meter, len(y)))
    if row["energy_kind"] == "measured":
        row["energy_note"] = "CPU package energy (RAPL) of the Lava simulation: a CPU cost, not the chip's"
    return row


def _loihi_row(name: str, spec: CompareSpec) -> dict:
    from .cost_model import LOIHI, CostTable, estimate_cost
    from .mapping import to_program
    from .program import simulate

    network, x, y = _load(spec)
    table = CostTable.from_json(spec.cost_table) if spec.cost_table else LOIHI
    try:
        program = to_program(network, "fixed", dt=spec.dt, steps=spec.steps, tol=spec.tol)
    except ValueError as e:
        return _not_measured(name, f"not mappable: {e}")
    run = simulate(program, program.encode_inputs(x))
    estimate = estimate_cost(program, run, table).means()
    predictions = program.predictions(program.decode_states(run.states[-1]))
    latency_ms = estimate["latency_us"] * 1e-3
    return {"name": name, "label": LABELS[name], "measured": False, "estimated": True,
            "latency_ms_batch1": latency_ms, "samples_per_s": 1e3 / latency_ms, "batch": 1,
            "timing_kind": "estimated", "steps_mean": estimate["timesteps"],
            "accuracy": float(np.mean(predictions == y)), "n_samples": len(y), "predictions": predictions.tolist(),
            "energy_uj": estimate["energy_uj"], "energy_kind": "estimated", "energy_note": estimate["label"],
            "cost": {k: v for k, v in estimate.items() if k != "label"}}


def measure(name: str, spec: CompareSpec) -> dict:
    """One target's row (in this process); see the module docstring."""
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; choose from {', '.join(TARGETS)}")
    if name in ("numba_cpu", "torch_cpu", "torch_cuda"):
        return _ebm_row(name, spec, {"numba_cpu": "numba", "torch_cpu": "cpu", "torch_cuda": "cuda"}[name])
    if name in STUDENT_TARGETS:
        return _student_row(name, spec)
    if name.startswith("lava_"):
        return _lava_row(name, spec)
    return _loihi_row(name, spec)


# ---------------------------------------------------------------------------------------------- comparing
def compare(spec: CompareSpec, targets=None, isolated: bool = True, progress: bool = True) -> dict:
    """Measure ``targets`` (default all) on the same inputs, each in its own process unless ``isolated=False``.

    Returns {"spec", "n_samples", "targets": [row, ...], "failed": [names]}; rows are those of ``measure`` plus
    ``agreement`` with the Numba predictions on the samples both ran (the predictions themselves are dropped)."""
    from tqdm import tqdm

    from .timing import run_isolated

    targets = list(TARGETS if targets is None else targets)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    check_spec(spec)
    rows, failed = [], []
    for name in tqdm(targets, desc="targets", unit="target", disable=not progress):
        try:
            row = (run_isolated("hardware.targets", {"target": name, "spec": spec.as_dict()}) if isolated
                   else measure(name, spec))
        except RuntimeError as e:
            row = _not_measured(name, f"failed: {str(e).strip().splitlines()[-1]}")
            failed.append(name)
        rows.append(row)
    reference = next((r.get("predictions") for r in rows if r["name"] == "numba_cpu" and r.get("predictions")), None)
    for row in rows:
        predictions = row.pop("predictions", None)
        if reference is not None and predictions is not None:
            row["agreement"] = float(np.mean(np.asarray(predictions) == np.asarray(reference[:len(predictions)])))
    n_samples = max((r.get("n_samples", 0) for r in rows), default=0)
    return {"spec": spec.as_dict(), "n_samples": n_samples, "targets": rows, "failed": failed}


def _fmt(value, pattern: str, missing: str = "-") -> str:
    return missing if value is None else format(value, pattern)


def format_table(result: dict) -> str:
    """A text table of ``compare``'s result, with the estimate's label and the reasons targets were not run."""
    header = (f"{'target':<27} {'ms/sample (b=1)':>15} {'samples/s':>10} {'batch':>5} {'steps':>6} {'acc %':>6} "
              f"{'agree %':>7} {'energy uJ':>10}  energy")
    lines = [header, "-" * len(header)]
    notes = []
    for row in result["targets"]:
        if not row["measured"] and not row.get("estimated"):
            lines.append(f"{row['label']:<27} {'not measured: ' + row['reason']}")
            continue
        acc = None if row.get("accuracy") is None else 100 * row["accuracy"]
        agree = None if row.get("agreement") is None else 100 * row["agreement"]
        mark = " *" if row.get("timing_kind") == "estimated" else ""
        lines.append(f"{row['label'] + mark:<27} {_fmt(row['latency_ms_batch1'], '.4g'):>15} "
                     f"{_fmt(row['samples_per_s'], '.4g'):>10} {row['batch']:>5} {_fmt(row.get('steps_mean'), '.1f'):>6} "
                     f"{_fmt(acc, '.2f'):>6} {_fmt(agree, '.2f'):>7} {_fmt(row.get('energy_uj'), '.4g'):>10}  "
                     f"{row.get('energy_kind', 'unknown')}")
        if row.get("energy_kind") == "estimated":
            notes.append(f"* {row['label']}: latency and energy are {row['energy_note']}")
    lines.append(f"{result['n_samples']} test samples; agreement = same prediction as the Numba relaxation; "
                 f"energy 'unknown' = not measured (no readable energy counter)")
    return "\n".join(lines + notes)


def plot_bars(result: dict, path) -> Path:
    """A PNG bar chart (log scales) of latency at batch 1, samples/s and energy per inference; estimated values are
    hatched. Written atomically."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend (a notebook's) stays as it is

    from ebm_sim.storage import save_figure

    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: directory {path.parent} does not exist")
    rows = [r for r in result["targets"] if r["measured"] or r.get("estimated")]
    if not rows:
        raise ValueError("no target was measured: nothing to plot")
    panels = (("latency_ms_batch1", "latency per sample, batch 1 (ms)"), ("samples_per_s", "samples/s (best batch)"),
              ("energy_uj", "energy per inference (uJ)"))
    fig = Figure(figsize=(15, 0.45 * len(rows) + 1.8))
    axes = fig.subplots(1, 3, sharey=True)
    names = [r["label"] for r in rows]
    for ax, (key, title) in zip(axes, panels):
        values = [r.get(key) or 0.0 for r in rows]
        bars = ax.barh(names, values, color=["tab:orange" if r.get("estimated") else "tab:blue" for r in rows])
        for bar, r in zip(bars, rows):
            if r.get("estimated"):
                bar.set_hatch("//")
        if any(v > 0 for v in values):
            ax.set_xscale("log")
        ax.set_title(title, fontsize=10)
        ax.invert_yaxis()
    fig.suptitle(f"{Path(result['spec']['network']).name} on {result['spec']['dataset']} "
                 f"({result['n_samples']} samples); hatched = ESTIMATE (cost model), blank = not measured",
                 fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return path


def _main() -> None:
    """``python -m hardware.targets`` (used by ``compare``): read {"target", "spec"} as JSON from stdin, print the
    target's row as JSON on the last line."""
    request = json.loads(sys.stdin.read())
    row = measure(request["target"], CompareSpec(**request["spec"]))
    sys.stdout.flush()
    print(json.dumps(row))


if __name__ == "__main__":
    _main()

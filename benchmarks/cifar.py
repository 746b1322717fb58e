"""Benchmark: the CIFAR-10 robustness study on convolutional models, side by side with the published tables.

    python benchmarks/cifar.py [--quick] [--out PATH] [--data-dir DIR] [--estimate-only] [--parts-only] [--threads 2]

Models (CPU preset, the real CIFAR-10 images of --data-dir: 10,000 training and 10,000 test images):
  EBM        the cifar10-cpu preset (ebm_sim/model/presets.py) trained with EP (24 epochs, ~48 min here; the file is
             kept in benchmarks/results/networks/cifar10-cpu.h5 and an interrupted training resumes)
  distilled  a LayeredFeedForward student distilled from the EBM's fixed points of the training images
  standard   the same architecture trained by backprop (30 epochs);  pgd-at  the same by PGD adversarial training
             (Linf 8/255, 7 steps of 2/255, 20 epochs); both with the EBM preset's minibatch of 32 and CIFAR's
             crop+flip (BaselineConfig.for_dataset("cifar10"))
Evaluation (distill.robustness.evaluate, CIFAR budgets Linf 8/255 and L2 0.5): PGD Linf and L2 on 1,000 test images,
AutoAttack standard and Square (5,000 queries) on the first 500 of them (autoattack_samples, square_samples), the
audit's PGD and gradient check on 200, the 15 corruptions x 5 severities on 1,000. The EBM is attacked through BPTT over every deployed step, implicit differentiation and
transfer from its student (worst case per example), and, reported beside them and outside the worst case, through
the published protocol's truncated gradient ("as published": the first K unrolled steps while predicting with all;
the published code used K = 29 of 250 steps, here K keeps that share of the deployed steps, stated in the JSON).
Before the evaluation the script times one forward pass and one input gradient of every model and prints the
estimated compute of the whole table (``cost_estimate``); --estimate-only stops there. The evaluation keeps its parts
in --eval-dir (default benchmarks/results/cifar/): a long run may be stopped and continued by running it again, and
processes started with --parts-only share its parts (each claims the part it runs), e.g. one per core.
Also measured: the distilled student exported to ONNX, float and int8 (onnxruntime on the test images: accuracy,
agreement with the torch student, and with the EBM on the first 1,000), the distilled student's speed-up over the
EBM's deployed relaxation at batch 1 and 256 (bounded by the EBM's step count: each step evaluates every
interaction's forward and backward field, the student one forward sweep)
and, when a trained cifar10-cpu-lava network is in benchmarks/results/networks/ (``--train-lava`` trains it), the
agreement of its float Lava program with the simulator (the max-pooling EBM has no Lava mapping: Lava has no pooling process).
--quick: a one-layer conv EBM (not the preset) on 200 training and 100 test images, one EP epoch, tiny budgets (no
AutoAttack, Square reduced), to check the code path in about two minutes on an idle machine; it writes to
benchmarks/results/quick/cifar.json (or --out), never over the recorded results.
Writes benchmarks/results/cifar.json (per model clean, pgd_linf, pgd_l2, autoattack, square, corruption_mean,
audit_passed; ebm_truncated_pgd_linf, speedup_batch1, speedup_batch256, lava_float_agreement; onnx_float_accuracy,
onnx_int8_accuracy, onnx_int8_agreement; the published table; the cost in minutes) and prints it as the last line.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]

from _common import SHARED_DATA, output_path, seconds_of, write_results  # noqa: E402
from robustness import cost_minutes, finished, summary, train_student  # noqa: E402  (benchmarks/robustness.py)
from distill.robustness.published import PUBLISHED_CIFAR10, side_by_side  # noqa: E402

NETWORKS = ROOT / "benchmarks" / "results" / "networks"
RESULTS = ROOT / "benchmarks" / "results"
PRESET = "cifar10-cpu"
LAVA_PRESET = "cifar10-cpu-lava"
ONNX_EBM_IMAGES = 1000  # test images on which the exported student's agreement with the EBM is measured
PUBLISHED_TRUNCATION = (29, 250)  # lanl/AdvEP: attacked through 29 unrolled steps, predicted with 250
#: Linf sweep: up to 64/255, where the audit's "reaches zero" check is meaningful (measured: the PGD-AT baseline keeps
#: 13 % at 16/255, 6 % at 24/255 and 2.7 % at 32/255 under PGD-20 on 300 images; a sweep ending at 16/255 failed it)
LINF_SWEEP = (0.0, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 32 / 255, 64 / 255)
#: the baselines train on the EBM preset's minibatch (32) with CIFAR's crop+flip (BaselineConfig.for_dataset)
FULL = dict(train=None, test=None, ebm_epochs=None, distill_epochs=20, baseline_epochs={"standard": 30, "pgd-at": 20},
            baseline_batch_size=32,
            budget=dict(samples=1000, autoattack_samples=500, autoattack_norms=("Linf",), square_samples=500,
                        audit_samples=200, corruption_samples=1000, pgd_steps=20, min_norm=False,
                        sweep_linf=LINF_SWEEP, sweep_l2=(0.0, 0.25, 0.5, 1.0), batch_size=250))
#: --quick exercises every step on a small network (one 8-channel conv layer, 10 free / 4 nudged steps) and budgets:
#: its figures check the code path, they measure nothing
QUICK = dict(train=200, test=100, ebm_epochs=1, distill_epochs=2, baseline_epochs={"standard": 1, "pgd-at": 1},
             ebm_arch="3x32x32, conv 8 k3 s2 p1 maxpool, readout 10",
             ebm_train=dict(free_steps=10, nudged_steps=4, batch_size=50),
             budget=dict(samples=16, square_samples=8, audit_samples=8, corruption_samples=16, pgd_steps=2,
                         audit_steps=3, audit_restarts=1, square_queries=10, autoattack=False, min_norm=False,
                         sweep_linf=(0.0, 8 / 255), sweep_l2=(0.0, 0.5), severities=(3,),
                         corruptions=("gaussian_noise", "fog"), batch_size=16))
KEYS = ("clean", "pgd_linf", "pgd_l2", "autoattack", "square", "corruption_mean", "audit_passed")
PGD_LINF_COLUMN = "pgd_linf"  # the results' column of PGD-Linf at the table's eps
TOOLKIT_PROTOCOL = ("the 16-32-64 CPU preset (cifar10-cpu, EP, 24 epochs on 10,000 images), attacked through every "
                    "deployed step (BPTT), implicit differentiation and transfer from its student, worst case per "
                    "example; PGD 20 steps on 1,000 images, AutoAttack standard and Square 5,000 queries on 500; the "
                    "published truncation reported beside it ('as published')")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_data(data_dir, settings: dict):
    """(train images, train labels, test images, test labels) as (N, 3, 32, 32) float32 in [0, 1]."""
    from ebm_sim.datasets import load_cifar10

    data = load_cifar10(data_dir)
    n_train, n_test = settings["train"] or len(data.y_train), settings["test"] or len(data.y_test)
    return (data.images("train")[:n_train], data.y_train[:n_train], data.images("test")[:n_test],
            data.y_test[:n_test])


def train_ebm(path: Path, x, y, x_test, y_test, settings: dict, progress: bool, preset_name: str = PRESET) -> None:
    """EP training of the preset (or of settings' "ebm_arch" with its "ebm_train" overrides, --quick) into ``path``
    (resumed when an interrupted run is there; skipped when finished)."""
    from ebm_sim import storage
    from ebm_sim.model import LayeredNetwork
    from ebm_sim.model.presets import get
    from ebm_sim.training import TrainConfig, fit

    if path.exists() and storage.load_checkpoint(path) is None:
        return
    preset = get(preset_name)
    overrides = {**settings.get("ebm_train", {}), **({"epochs": settings["ebm_epochs"]} if settings["ebm_epochs"]
                                                      else {})}
    config = TrainConfig(**dict(preset.train, **overrides))
    network = LayeredNetwork.init(settings.get("ebm_arch", preset.arch), seed=0, activation=preset.activation,
                                  normalization=preset.normalization)
    fit(network, x, y, x_test, y_test, config, checkpoint_path=path, resume=path.exists(), progress=progress,
        log=log, extra_attrs={"dataset": "cifar10", "preset": preset_name})


def prepare_models(settings: dict, data, network_path: Path, models_dir: Path, progress: bool) -> tuple:
    """{name: path} of the four models (training or resuming those not finished), and the training seconds."""
    from distill.baselines import train_baseline
    from distill.config import BaselineConfig
    from ebm_sim import storage

    x_train, y_train, x_test, y_test = data
    timings = {}
    start = time.perf_counter()
    train_ebm(network_path, x_train, y_train, x_test, y_test, settings, progress)
    timings["EBM"] = time.perf_counter() - start
    network = storage.load_network(network_path)
    tag = network.content_hash()[:12]
    paths = {"EBM": network_path, "distilled": models_dir / f"student-cifar10-{tag}.h5",
             "standard": models_dir / "standard-cifar10.h5", "pgd-at": models_dir / "pgd-at-cifar10.h5"}
    if not finished(paths["distilled"]):
        start = time.perf_counter()
        train_student(network_path, network, x_train, y_train, "cifar10", paths["distilled"],
                      settings["distill_epochs"], progress)
        timings["distilled"] = time.perf_counter() - start
    for kind in ("standard", "pgd-at"):
        if finished(paths[kind]):
            continue
        start = time.perf_counter()
        train_baseline(network, x_train, y_train,
                       BaselineConfig.for_dataset("cifar10", kind=kind, epochs=settings["baseline_epochs"][kind],
                                                  batch_size=settings.get("baseline_batch_size", 128)),
                       checkpoint_path=paths[kind], resume=paths[kind].exists(), progress=progress, log=log,
                       dataset="cifar10")
        timings[kind] = time.perf_counter() - start
    return paths, timings


def truncation_steps(deployed_steps: int) -> int:
    """K for the "as published" attack: the published share (29 of 250 steps) of the deployed steps, at least 1."""
    kept, total = PUBLISHED_TRUNCATION
    return max(1, math.ceil(deployed_steps * kept / total))


# ---------------------------------------------------------------------------------------------- cost and speed
def seconds_per_image(module, images, gradient: bool, repeats: int = 2) -> float:
    """Seconds per image of one forward pass (or forward + input gradient) of a torch module, best of ``repeats``."""
    import torch

    best = float("inf")
    for _ in range(repeats):
        x = torch.as_tensor(images).clone().requires_grad_(gradient)
        start = time.perf_counter()
        with torch.set_grad_enabled(gradient):
            logits = module(x)
            if gradient:
                torch.autograd.grad(logits.sum(), x)
        best = min(best, time.perf_counter() - start)
    return best / len(images)


def gradient_counts(config) -> dict:
    """Input gradients (or forward passes) per attacked image of each attack, before early stopping: PGD per eps of
    the sweeps (the table's eps included), AutoAttack standard (APGD-CE, APGD-T and FAB-T over 9 target classes per
    gradient source; its Square once per model, shared with the standalone Square where both attack the same
    examples: ``cost_estimate``), Square alone, the audit, the corruptions (forward passes per corrupted image). An
    upper bound: AutoAttack and Square stop on an image once it is broken."""
    pgd = config.pgd_steps * config.pgd_restarts
    sweeps = (len([e for e in config.sweep_linf if e > 0]) + len([e for e in config.sweep_l2 if e > 0])) * pgd
    norms = len(config.autoattack_norms) if config.autoattack else 0
    return {"pgd_and_sweeps": sweeps, "fgsm": 1,
            "autoattack_gradients": config.autoattack_iterations * (1 + 9 + 9) * norms,
            "autoattack_square_queries": config.square_queries * norms,
            "square_queries": config.square_queries if config.square else 0,
            "audit": config.audit_steps * config.audit_restarts,
            "corruption_forwards": len(config.severities) * len(config.corruptions or range(15))}


def cost_estimate(times: dict, config) -> dict:
    """Minutes of the table per model, an upper bound (every image survives every attack stage), from the measured
    seconds per image of a forward pass and of an input gradient (summed over the model's gradient sources: the EBM
    is attacked through each)."""
    out = {}
    for name, t in times.items():
        counts = gradient_counts(config)
        autoattack_samples = min(config.autoattack_samples or config.samples, config.samples)
        shared = config.autoattack and config.square and "Linf" in config.autoattack_norms \
            and autoattack_samples == config.square_samples  # AutoAttack's Linf Square is the standalone one
        gradients = (counts["pgd_and_sweeps"] + counts["fgsm"]) * config.samples \
            + counts["autoattack_gradients"] * autoattack_samples + counts["audit"] * config.audit_samples
        autoattack_queries = counts["autoattack_square_queries"] - (config.square_queries if shared else 0)
        forwards = autoattack_queries * autoattack_samples \
            + counts["square_queries"] * config.square_samples \
            + counts["corruption_forwards"] * (config.corruption_samples or 10000)
        out[name] = {"gradient_s_per_image": t["gradient"], "forward_s_per_image": t["forward"],
                     "gradients": gradients, "forwards": forwards,
                     "upper_bound_minutes": (gradients * t["gradient"] + forwards * t["forward"]) / 60}
    return out


def speedup(network_path: Path, student_path: Path, images, batches=(1, 256), repeats: int = 3) -> dict:
    """Seconds per batch of the EBM's deployed relaxation (Numba interaction backend) and of its student (torch, the
    faster of one thread and the configured ones), and their ratio, at each batch size."""
    import torch

    from distill.io import load_model
    from ebm_sim import storage
    from ebm_sim.deployment import Deployment
    from ebm_sim.model.dynamics import relax
    from ebm_sim.model.energy import parameters

    network = storage.load_network(network_path)
    deployment = Deployment.of_network_file(network_path)
    params = parameters(network, "numba")
    student = load_model(student_path)
    out = {}
    for batch in batches:
        x = np.ascontiguousarray(images[:batch])
        relax(network, x, deployment=deployment, params=params)  # warm-up (compilation, workspaces)
        ebm = min(seconds_of(lambda: relax(network, x, deployment=deployment, params=params))
                  for _ in range(repeats))
        xt = torch.as_tensor(x)
        threads = torch.get_num_threads()
        timings = {}
        for count in sorted({1, threads}):  # torch's threads cost more than they give on a batch of one
            torch.set_num_threads(count)
            with torch.no_grad():
                student(xt)
                timings[count] = min(seconds_of(lambda: student(xt)) for _ in range(repeats * 3))
        torch.set_num_threads(threads)
        ff = min(timings.values())
        out[f"batch{batch}"] = {"ebm_s": ebm, "student_s": ff, "speedup": ebm / ff,
                                "student_s_per_torch_threads": timings}
    steps = deployment.max_steps
    out["bound"] = (f"the EBM relaxes for {steps} steps ({deployment.method}), each evaluating every interaction's "
                    f"field on its post layer and on its pre layer: about {2 * steps}x the student's one bottom-up "
                    f"sweep in multiply-adds (fewer when samples stop early, tol {deployment.tol:g})")
    return out


def onnx_export(student_path: Path, images, labels, ebm_predictions) -> dict:
    """The convolutional student exported to ONNX in float and int8 (``distill.onnx_export``), each run by
    onnxruntime (CPU) on the test images: its accuracy, its agreement with the torch student (and max |logit
    difference|), and with the EBM's deployed predictions ``ebm_predictions`` of the first images (as many as
    given: the EBM's relaxation of the whole test set would cost minutes)."""
    from distill.io import load_model
    from distill.onnx_export import OnnxClassifier, export_onnx, measure_export, quantize_onnx

    student = load_model(student_path)
    images = np.ascontiguousarray(images, dtype=np.float32)
    out = {"n": int(len(labels))}
    with tempfile.TemporaryDirectory() as folder:
        float_path = export_onnx(student, Path(folder) / "student.onnx", input_shape=tuple(images.shape[1:]))
        int8_path = quantize_onnx(float_path, Path(folder) / "student-int8.onnx")
        for name, path in (("float", float_path), ("int8", int8_path)):
            measured = measure_export(student, path, images, labels, batch_size=256)
            predicted = OnnxClassifier(path, providers=["CPUExecutionProvider"]).predict(images, batch_size=256)
            out[name] = {**measured, "bytes": path.stat().st_size, "ebm_n": int(len(ebm_predictions)),
                         "agreement_with_ebm": float(np.mean(predicted[:len(ebm_predictions)] == ebm_predictions))}
    return out


def ebm_trained(path: Path) -> bool:
    """An EBM file whose training is finished: no checkpoint in it, or one that holds every epoch of its run."""
    import json

    from ebm_sim import storage

    if not path.exists():
        return False
    checkpoint = storage.load_checkpoint(path)
    return checkpoint is None or int(checkpoint["epoch"]) >= json.loads(str(checkpoint["settings"]))["config"]["epochs"]


def lava_agreement(data, path: Path, samples: int = 100) -> dict:
    """Agreement of the float Lava program of a trained cifar10-cpu-lava network at ``path`` (when its training has
    finished) with the simulator's deployed prediction on the first ``samples`` test images: the program run by the
    numpy simulator of the Lava graph (``hardware.program.simulate``, which tests/test_hardware_conv.py holds equal
    to Lava's own run) against ``ebm_sim.model.dynamics.relax`` with the network's deployment."""
    from ebm_sim import storage

    if not ebm_trained(path):
        return {"agreement": None, "reason": f"no trained {LAVA_PRESET} network at {path} (the {PRESET} EBM "
                                             f"max-pools: Lava has no pooling process; `benchmarks/cifar.py "
                                             f"--train-lava` trains it)"}
    from ebm_sim.deployment import Deployment
    from ebm_sim.model.dynamics import relax
    from ebm_sim.model.energy import output
    from hardware.mapping import to_program
    from hardware.program import simulate

    network = storage.load_network(path)
    deployment = Deployment.of_network_file(path)
    images = np.ascontiguousarray(data[2][:samples])
    simulator = np.argmax(output(network, relax(network, images, deployment=deployment).states), axis=1)
    labels = np.asarray(data[3][:samples])
    out = {"samples": int(len(images)), "network": path.name, "deployment": deployment.as_dict(),
           "accuracy_simulator": float(np.mean(simulator == labels))}
    for kind in ("float", "fixed"):  # the fixed-point program (bit-exact with Loihi's arithmetic) beside it
        program = to_program(network, kind, deployment=deployment)
        run = simulate(program, program.encode_inputs(images))
        lava = program.predictions(program.decode_states(run.states[-1]))
        out[kind] = {"agreement": float(np.mean(lava == simulator)), "accuracy": float(np.mean(lava == labels))}
    return {"agreement": out["float"]["agreement"], **out}


# ---------------------------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data and budgets (under two minutes)")
    parser.add_argument("--out", default=None, help="summary JSON (default benchmarks/results/cifar.json; quick: "
                                                    "benchmarks/results/quick/cifar.json)")
    parser.add_argument("--data-dir", type=Path, default=SHARED_DATA,
                        help="folder holding cifar-10-batches-py (default ../shared/data)")
    parser.add_argument("--eval-dir", default=None, help="the evaluation's report and resumable parts (default "
                                                         "benchmarks/results/cifar, quick: a temporary folder)")
    parser.add_argument("--estimate-only", action="store_true", help="prepare the models, print the cost estimate, "
                                                                     "stop")
    parser.add_argument("--train-lava", action="store_true",
                        help=f"only train (or resume) the {LAVA_PRESET} EBM into {NETWORKS.relative_to(ROOT)} (24 EP "
                             f"epochs, about as long as the {PRESET} EBM), whose Lava agreement the table reports")
    parser.add_argument("--parts-only", action="store_true",
                        help="run (or resume) the evaluation's parts into --eval-dir and stop: no ONNX, speed-up or "
                             "summary JSON. Parts are claimed per process, so one such process per core (with "
                             "--threads 1 and NUMBA_NUM_THREADS=1) shares the work; a last plain run then assembles "
                             "the stored parts and measures the speed-up on an otherwise idle machine")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    import torch

    from distill.robustness import RobustnessConfig, evaluate, load_model_under_test
    from ebm_sim.deployment import Deployment

    torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else FULL
    out_path = output_path("cifar", args.quick, args.out)
    scratch = tempfile.TemporaryDirectory() if args.quick else None
    base = Path(scratch.name) if scratch else RESULTS
    models_dir = base / "models" if scratch else NETWORKS
    network_path = models_dir / f"{PRESET}.h5"
    eval_dir = Path(args.eval_dir) if args.eval_dir else base / "cifar"
    models_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = load_data(args.data_dir, settings)
    if args.train_lava:
        lava_path = models_dir / f"{LAVA_PRESET}.h5"
        train_ebm(lava_path, *data, settings, not args.no_progress, preset_name=LAVA_PRESET)
        log(f"{LAVA_PRESET}: {lava_path} trained ({time.perf_counter() - start:.0f} s in this run)")
        return
    paths, training_seconds = prepare_models(settings, data, network_path, models_dir, not args.no_progress)

    deployment = Deployment.of_network_file(paths["EBM"])
    truncated = truncation_steps(deployment.max_steps)
    config = RobustnessConfig.for_dataset("cifar10", **settings["budget"], as_published=True,
                                          as_published_steps=truncated)
    image_shape = tuple(data[2].shape[1:])
    models = [load_model_under_test(paths["EBM"], "EBM", image_shape, student=paths["distilled"])]
    models += [load_model_under_test(paths[name], name, image_shape) for name in ("distilled", "standard", "pgd-at")]

    times = {model.name: {"forward": seconds_per_image(model.black_box, data[2][:32], False),
                          "gradient": sum(seconds_per_image(source, data[2][:16], True)
                                          for source in model.sources.values())}
             for model in models}
    estimate = cost_estimate(times, config)
    log("estimated compute of the table (upper bound: every image survives every stage): " + ", ".join(
        f"{name} {e['upper_bound_minutes']:.0f} min" for name, e in estimate.items()))
    if args.estimate_only:
        print({name: e["upper_bound_minutes"] for name, e in estimate.items()})
        return

    x_flat = data[2].reshape(len(data[3]), -1)
    if args.parts_only:
        evaluate(models, x_flat, data[3], image_shape, config, eval_dir, dataset="cifar10",
                 progress=not args.no_progress, log=log, overwrite=True)
        log(f"every part of the evaluation is stored in {eval_dir / 'parts'} ({time.perf_counter() - start:.0f} s in "
            f"this run)")
        return
    onnx = onnx_export(paths["distilled"], data[2], data[3], models[0].predict(x_flat[:ONNX_EBM_IMAGES]))
    log("student in ONNX: " + ", ".join(f"{kind} accuracy {onnx[kind]['accuracy_onnx']:.4f}, agreement with torch "
                                        f"{onnx[kind]['prediction_agreement']:.4f}, with the EBM "
                                        f"{onnx[kind]['agreement_with_ebm']:.4f}" for kind in ("float", "int8")))
    evaluation_start = time.perf_counter()
    # the feedforward models first (minutes): their parts are stored and reused by the whole evaluation, so a run
    # stopped in the EBM's hours of attacks has every other row finished
    evaluate(models[1:], x_flat, data[3], image_shape, config, eval_dir, dataset="cifar10",
             progress=not args.no_progress, log=log, overwrite=True)
    results = evaluate(models, x_flat, data[3], image_shape, config, eval_dir, dataset="cifar10",
                       progress=not args.no_progress, log=log, overwrite=True)
    per_model = summary(results)
    speed = speedup(paths["EBM"], paths["distilled"], data[2], batches=(1, 32) if args.quick else (1, 256))
    side = results["models"]["EBM"].get("side_sources", {}).get("bptt-truncated", {})
    truncated_pgd = side.get("attacks", {}).get(PGD_LINF_COLUMN, {}).get("accuracy")
    full_bptt_pgd = side.get("paired", {}).get(PGD_LINF_COLUMN, {}).get("accuracy")
    out = {"quick": args.quick, "dataset": "cifar10", "preset": PRESET,
           "train_images": int(len(data[1])), "test_images": int(len(data[3])),
           "models": {name: {**{k: row[k] for k in KEYS if k in row}, "per_source": row["per_source"],
                             "audit_failed": row["audit_failed"], "minutes": row["minutes"]}
                      for name, row in per_model.items()},
           "ebm_truncated_pgd_linf": truncated_pgd,
           "truncation": {"attack_steps": truncated, "deployed_steps": deployment.max_steps,
                          "published": f"{PUBLISHED_TRUNCATION[0]} of {PUBLISHED_TRUNCATION[1]} steps",
                          "full_bptt_pgd_linf": full_bptt_pgd, "side_source": side},
           "speedup_batch1": speed["batch1"]["speedup"],
           "speedup_batch256": speed.get("batch256", {}).get("speedup"),
           "speed": speed, "lava": lava_agreement(data, models_dir / f"{LAVA_PRESET}.h5"), "onnx": onnx,
           "onnx_float_accuracy": onnx["float"]["accuracy_onnx"], "onnx_int8_accuracy": onnx["int8"]["accuracy_onnx"],
           "onnx_int8_agreement": onnx["int8"]["prediction_agreement"],
           "published": [asdict(row) for row in PUBLISHED_CIFAR10],
           "side_by_side": side_by_side({name: row for name, row in per_model.items()}, TOOLKIT_PROTOCOL),
           "config": results["config"], "examples": results["examples"], "cost_estimate": estimate,
           "report_dir": str(eval_dir), "torch_threads": args.threads,
           "cost_minutes": cost_minutes(training_seconds, results, eval_dir, start, evaluation_start)}
    out["lava_float_agreement"] = out["lava"]["agreement"]
    write_results(out, out_path)
    if scratch:
        scratch.cleanup()


if __name__ == "__main__":
    main()

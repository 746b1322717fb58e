"""The work behind ``ebm distill`` and ``ebm baseline`` (the CLI only parses, calls these and prints).

    run_distill(NET.h5, FIXED_POINTS.h5, OUT.h5, ...)  -> summary dict;  format_distill_summary(summary) -> str
    run_baseline(kind, dataset, layers, OUT.h5, ...)  -> summary dict;  format_baseline_summary(summary) -> str

Both write an ``ebm-feedforward`` file (distill.io), rewritten atomically after every epoch (the best model so far
plus a checkpoint); ``resume=True`` continues an interrupted run, ``overwrite=True`` replaces an existing file,
and an existing file is refused otherwise.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

from ebm_sim.outputs import check_output, exclusive


@contextmanager
def _interruption_note(out: Path, log):
    """On Ctrl-C, say where the last finished epoch is and how to continue, then re-raise."""
    start = time.time()
    try:
        yield
    except KeyboardInterrupt:
        if out.exists() and out.stat().st_mtime >= start - 1:  # written by this run
            log(f"interrupted: {out} holds the best model and a checkpoint of the last finished epoch; run the same "
                f"command with --resume to continue")
        raise


def run_distill(network_path, fixed_points_path, out, *, test_fixed_points=None, resume: bool = False,
                overwrite: bool = False, progress: bool = True, log=print, **config) -> dict:
    """Distill the network of ``network_path`` from the fixed points of ``fixed_points_path`` (refused unless
    they were computed by that network: stored network hash) into ``out``. config: DistillConfig fields.
    test_fixed_points: optional fixed points of held-out data (e.g. ``ebm relax --split test``) to measure the
    student's accuracy and agreement with the EBM. Returns a summary dict."""
    from ebm_sim import storage

    from .io import stored_content_hash
    from .train import DistillConfig, compare_with_ebm, distill

    out = Path(out)
    config = DistillConfig(**config)  # validated before any work
    check_output(out, overwrite=overwrite, resume=resume)
    network = storage.load_dense_network(network_path, "distillation")
    fixed_points = storage.load_fixed_points(fixed_points_path, network=network)
    test = storage.load_fixed_points(test_fixed_points, network=network) if test_fixed_points else None
    fp_hash = stored_content_hash(fixed_points_path)
    provenance = {"network_file": Path(network_path).name, "fixed_points_file": Path(fixed_points_path).name}
    log(f"distilling {'-'.join(map(str, network.layer_sizes))} (network {network.content_hash()[:12]}) from "
        f"{len(fixed_points)} fixed points of {fixed_points.settings.get('dataset', 'unknown data')} "
        f"({config.val_fraction:.0%} held out); checkpoints in {out}")
    with exclusive(out), _interruption_note(out, log):
        student, history = distill(network, fixed_points, config, checkpoint_path=out, resume=resume,
                                   progress=progress, log=log, fixed_points_hash=fp_hash, provenance=provenance)
    summary = {"path": str(out), "epochs_run": len(history.get("epoch", [])), "best_epoch": int(history["best_epoch"][0]),
               "network_hash": network.content_hash(), "fixed_points_hash": fp_hash,
               "train": compare_with_ebm(student, network, fixed_points)}
    best = summary["best_epoch"] - 1
    if "val_agreement" in history and best >= 0:
        summary["validation"] = {"agreement": history["val_agreement"][best], "accuracy": history["val_accuracy"][best]}
    if test is not None:
        summary["test"] = compare_with_ebm(student, network, test)
    return summary


def format_distill_summary(s: dict) -> str:
    def line(name, r):
        mse = ", ".join(f"{m:.4f}" for m in r["state_mse"])
        return (f"  {name:<10} {r['n']:>6} samples: student {100 * r['accuracy']:.2f}%, EBM {100 * r['ebm_accuracy']:.2f}%,"
                f" agreement {100 * r['agreement']:.2f}%, state MSE per layer {mse}")

    lines = [f"distilled in {s['epochs_run']} epochs (best epoch {s['best_epoch']}), network {s['network_hash'][:12]}, "
             f"fixed points {s['fixed_points_hash'][:12]}", line("fit set", s["train"])]
    if "validation" in s:
        v = s["validation"]
        lines.append(f"  {'held out':<10} agreement {100 * v['agreement']:.2f}%, accuracy {100 * v['accuracy']:.2f}%")
    if "test" in s:
        lines.append(line("test", s["test"]))
    lines.append(f"wrote {s['path']}")
    return "\n".join(lines)


def run_baseline(kind: str, dataset: str, layers, out, *, data_dir=None, limit_train=None, limit_test=None,
                 data_seed: int | None = None, activation: str = "hard_sigmoid", resume: bool = False,
                 overwrite: bool = False, progress: bool = True, log=print, **config) -> dict:
    """Train a ``kind`` ("standard" or "pgd-at") baseline with layer sizes ``layers`` on ``dataset`` into ``out``;
    config: BaselineConfig fields. Evaluates clean test accuracy and accuracy under the training PGD (eps, steps,
    step size) on the test split. data_seed: the seed of the dataset's split and subsamples (default: config's
    seed; the pipeline fixes it so that every model sees the same data). Returns a summary dict."""
    from ebm_sim import datasets

    from .baselines import BaselineConfig, robust_accuracy, train_baseline
    from .train import evaluate

    out = Path(out)
    config = BaselineConfig(kind=kind, **config)
    check_output(out, overwrite=overwrite, resume=resume)
    data = datasets.load_dataset(dataset, data_dir, limit_train=limit_train, limit_test=limit_test,
                                 seed=config.seed if data_seed is None else data_seed)
    sizes = tuple(int(n) for n in layers)
    if sizes[0] != data.num_features or sizes[-1] != data.num_classes:
        raise ValueError(f"layer sizes {'-'.join(map(str, sizes))} do not fit {data.name}: its inputs have "
                         f"{data.num_features} features and it has {data.num_classes} classes (e.g. --layers "
                         f"{data.num_features},512,{data.num_classes})")
    what = "standard training" if kind == "standard" else (
        f"PGD adversarial training (eps {config.eps:g}, {config.pgd_steps} steps of {config.step_size:g})")
    log(f"{what} of {'-'.join(map(str, sizes))} on {data.name} ({len(data.y_train)} train / {len(data.y_test)} "
        f"test samples, {config.val_fraction:.0%} held out); checkpoints in {out}")
    provenance = {"limit_train": limit_train, "limit_test": limit_test, "image_shape": list(data.image_shape)}
    with exclusive(out), _interruption_note(out, log):
        model, history = train_baseline(sizes, data.x_train, data.y_train, config, activation=activation,
                                        checkpoint_path=out, resume=resume, progress=progress, log=log,
                                        dataset=data.name, provenance=provenance)
    test = evaluate(model, data.x_test, data.y_test)
    robust = robust_accuracy(model, data.x_test, data.y_test, config.eps, config.pgd_steps, config.step_size,
                             seed=config.seed)
    return {"path": str(out), "kind": kind, "dataset": data.name, "epochs_run": len(history.get("epoch", [])),
            "best_epoch": int(history["best_epoch"][0]), "test_accuracy": test["accuracy"],
            "test_robust_accuracy": robust["robust_accuracy"], "eps": config.eps, "pgd_steps": config.pgd_steps,
            "pgd_step_size": config.step_size, "n_test": test["n"]}


def format_baseline_summary(s: dict) -> str:
    return (f"{s['kind']} baseline on {s['dataset']}: {s['epochs_run']} epochs (best epoch {s['best_epoch']}); test "
            f"accuracy {100 * s['test_accuracy']:.2f}%, under PGD Linf eps {s['eps']:g} ({s['pgd_steps']} steps of "
            f"{s['pgd_step_size']:g}) {100 * s['test_robust_accuracy']:.2f}% ({s['n_test']} test samples)\n"
            f"wrote {s['path']}")


def run_export_onnx(model_path, out, *, quantize: str | None = None, check_samples: int = 64, seed: int = 0) -> dict:
    """``ebm export-onnx``: a feedforward model file (distilled, standard or pgd-at) -> ONNX, with its provenance in
    the ONNX metadata; ``quantize="int8"`` writes onnxruntime's dynamically quantized int8 model instead of the float
    one. Then onnxruntime is run on ``check_samples`` random inputs in [0, 1] and compared with torch.
    An EBM (ebm-network file) has no static graph to export: its relaxation stops on a tolerance."""
    import tempfile

    import numpy as np
    import torch

    from .io import artifact_format, load_model
    from .onnx_export import OnnxClassifier, compare_with_torch, export_onnx, quantize_onnx

    model_path, out = Path(model_path), Path(out)
    if artifact_format(model_path) == "ebm-network":
        raise ValueError(f"{model_path} is an EBM (ebm-network): its relaxation is not a static graph; export its "
                         f"distilled student (ebm distill) instead")
    model = load_model(model_path)
    record = model.provenance
    metadata = {"source_file": model_path.name, "source_content_hash": record.content_hash, "kind": record.kind,
                "dataset": record.dataset, "network_hash": record.network_hash,
                "fixed_points_hash": record.fixed_points_hash, "layer_sizes": list(model.layer_sizes)}
    if quantize is None:
        export_onnx(model, out, input_shape=model.layer_sizes[0], metadata=metadata)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            float_path = export_onnx(model, Path(tmp) / "float.onnx", input_shape=model.layer_sizes[0],
                                     metadata=metadata)
            quantize_onnx(float_path, out, quantize)
    x = np.random.default_rng(seed).random((check_samples, model.layer_sizes[0]), dtype=np.float32)
    difference = compare_with_torch(model, out, x)
    agreement = float(np.mean(OnnxClassifier(out).predict(x) == model(torch.from_numpy(x)).argmax(1).numpy()))
    return {"path": str(out), "source": str(model_path), "kind": record.kind, "layer_sizes": list(model.layer_sizes),
            "quantization": quantize or "none", "max_abs_difference": difference, "prediction_agreement": agreement,
            "samples": check_samples}


def parse_model_argument(text: str) -> tuple:
    """``NAME=PATH`` or ``PATH`` (name: the file's stem) -> (name, Path)."""
    name, sep, path = text.partition("=")
    if not sep:
        name, path = Path(text).stem, text
    if not name or not path:
        raise ValueError(f"a model is PATH or NAME=PATH, got {text!r}")
    return name, Path(path)


def run_robustness(model_arguments, dataset: str, out_dir, *, data_dir=None, student=None, ebm_gradients=None,
                   progress: bool = True, log=print, overwrite: bool = False, **config) -> dict:
    """``ebm robustness``: evaluate the models (``NAME=PATH`` or ``PATH``; EBM networks and feedforward files) on the
    test split of ``dataset``. student: the EBMs' distilled student (transfer attack); ebm_gradients: EBM gradient
    sources; config: RobustnessConfig fields over the dataset's default budgets. Writes results.json, table.md,
    sweeps.png, corruptions.png into out_dir (resumable: parts/). Returns {"results", "paths", "seconds"}."""
    from ebm_sim import datasets

    from .io import artifact_format
    from .robustness import RobustnessConfig, evaluate, load_model_under_test
    from .robustness.report import report_files

    start = time.time()
    cfg = RobustnessConfig.for_dataset(dataset, **{k: v for k, v in config.items() if v is not None})
    out_dir = check_output(out_dir, kind="folder", log=log)  # created, writable: before any work
    parsed = [parse_model_argument(a) for a in model_arguments]
    if not parsed:
        raise ValueError("name at least one model file to evaluate")
    for _, path in parsed:
        if not path.is_file():
            raise FileNotFoundError(f"no such model file: {path}")
    data = datasets.load_dataset(dataset, data_dir)
    image_shape = data.channels_first_shape
    models = []
    for name, path in parsed:
        ebm = artifact_format(path) == "ebm-network"
        models.append(load_model_under_test(path, name, image_shape, student=student if ebm else None,
                                            gradients=ebm_gradients if ebm else None))
    log(f"evaluating {', '.join(m.name for m in models)} on {data.name} ({len(data.y_test)} test images): "
        f"Linf eps {cfg.eps_linf:g}, L2 eps {cfg.eps_l2:g}, {cfg.samples} attacked, results in {out_dir}")
    results = evaluate(models, data.x_test, data.y_test, image_shape, cfg, out_dir, dataset=data.name,
                       progress=progress, log=log, overwrite=overwrite)
    return {"results": results, "paths": {k: str(v) for k, v in report_files(out_dir).items()},
            "seconds": time.time() - start}

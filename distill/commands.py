"""``ebm distill``, ``baseline``, ``export-onnx`` and ``robustness``: the work behind them (run_*, format_*),
their handlers (parse, call these, print) and ``add_parsers(sub)``, which registers them on the ``ebm``
subparsers (the ``ebm`` front end, ebm_cli, gathers it with the other packages' commands).

    run_distill(NET.h5, FIXED_POINTS.h5, OUT.h5, ...)  -> summary dict;  format_distill_summary(summary) -> str
    run_baseline(kind, dataset, layers, OUT.h5, ...)  -> summary dict;  format_baseline_summary(summary) -> str
    run_export_onnx(MODEL.h5, OUT.onnx, ...)          -> summary dict;  format_export_summary(summary) -> str

Dense networks (``ebm_sim.network.Network``, ebm-network version 1) and layered ones (``ebm_sim.model.LayeredNetwork``,
version 2, e.g. convolutional) take the same commands: ``distill`` reads either with its fixed points (version 1 flat,
version 2 keeping the layer shapes), ``baseline`` builds the architecture of --layers, --arch, --preset or --like
NET.h5 (the dataset's images reshaped to its input shape; the PGD budget of the dataset's family unless given), and
``export-onnx`` exports either kind of student (FeedForward or LayeredFeedForward).

Both write an ``ebm-feedforward`` file (distill.io), rewritten atomically after every epoch (the best model so far
plus a checkpoint); ``resume=True`` continues an interrupted run, ``overwrite=True`` replaces an existing file,
and an existing file is refused otherwise.
"""
from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from pathlib import Path

from ebm_sim.commands import (ACTIVATION_HELP, _add_architecture_arguments, _architecture_network, _shape_text,
                              parse_names, parse_rates)
from ebm_sim.outputs import add_output_argument, check_output, exclusive

from . import formats  # noqa: F401  (registers ebm-feedforward, which `ebm info` reads)


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
                overwrite: bool = False, progress: bool = True, log=print, nproc: int = 1, world=None,
                **config) -> dict:
    """Distill the network of ``network_path`` from the fixed points of ``fixed_points_path`` (refused unless
    they were computed by that network: stored network hash) into ``out``. config: DistillConfig fields.
    test_fixed_points: optional fixed points of held-out data (e.g. ``ebm relax --split test``) to measure the
    student's accuracy and agreement with the EBM. Returns a summary dict.
    nproc > 1 (or a torchrun launch): data parallel over that many local processes (``ebm_sim.distributed.run``;
    each rank reads the files itself, rank 0 writes ``out``; the caller holds ``out``'s lock, as ``ebm`` does);
    returns rank 0's summary (None on torchrun's other ranks). world: the process group of this rank (internal)."""
    from ebm_sim import storage
    from ebm_sim.distributed import check_nprocs, env_launched, run

    from .io import stored_content_hash
    from .train import DistillConfig, compare_with_ebm, distill

    out = Path(out)
    config = DistillConfig(**config)  # validated before any work
    if world is None and (nproc != 1 or env_launched()):
        check_nprocs(nproc, config.batch_size)
        check_output(out, overwrite=overwrite, resume=resume)
        options = {"test_fixed_points": test_fixed_points, "resume": resume, "overwrite": overwrite,
                   "progress": progress, **config.as_dict()}
        with _interruption_note(out, log):
            return run(_distill_rank, nproc, (str(network_path), str(fixed_points_path), str(out), options))
    check_output(out, overwrite=overwrite, resume=resume)
    network = storage.load_network(network_path)  # dense or layered
    fixed_points = _fixed_points_of(network, fixed_points_path)
    test = _fixed_points_of(network, test_fixed_points) if test_fixed_points else None
    fp_hash = stored_content_hash(fixed_points_path)
    provenance = {"network_file": Path(network_path).name, "fixed_points_file": Path(fixed_points_path).name}
    log(f"distilling {_shape_text(network)} (network {network.content_hash()[:12]}) from "
        f"{len(fixed_points)} fixed points of {fixed_points.settings.get('dataset', 'unknown data')} "
        f"({config.val_fraction:.0%} held out); checkpoints in {out}")
    with (exclusive(out) if world is None else world.output_lock(out)), _interruption_note(out, log):
        student, history = distill(network, fixed_points, config, checkpoint_path=out, resume=resume,
                                   progress=progress, log=log, fixed_points_hash=fp_hash, provenance=provenance,
                                   world=world)
    summary = {"path": str(out), "epochs_run": len(history.get("epoch", [])), "best_epoch": int(history["best_epoch"][0]),
               "network_hash": network.content_hash(), "fixed_points_hash": fp_hash,
               "train": compare_with_ebm(student, network, fixed_points)}
    best = summary["best_epoch"] - 1
    if "val_agreement" in history and best >= 0:
        summary["validation"] = {"agreement": history["val_agreement"][best], "accuracy": history["val_accuracy"][best]}
    if test is not None:
        summary["test"] = compare_with_ebm(student, network, test)
    return summary


def _distill_rank(world, network_path, fixed_points_path, out, options):
    """One rank of a data-parallel ``run_distill`` (``ebm_sim.distributed.run``): its summary on rank 0, else None."""
    from ebm_sim.distributed import log_on_main

    summary = run_distill(network_path, fixed_points_path, out, world=world,
                          log=log_on_main(world, lambda msg: print(msg, flush=True)), **options)
    return summary if world is None or world.is_main else None


def _fixed_points_of(network, path):
    """The fixed points of ``path``, refused (ValueError naming the file) unless ``network`` computed them (its stored
    hash) and their inputs and states have the network's shapes (``distill.train.check_fixed_points``)."""
    from ebm_sim import storage

    from .train import check_fixed_points

    fixed_points = storage.load_fixed_points(path, network=network)
    try:
        check_fixed_points(network, fixed_points)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return fixed_points


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


def _architecture_of(layers, activation: str) -> tuple:
    """(architecture for ``train_baseline``, activation, readout) of what ``run_baseline`` is given: a LayeredNetwork
    (itself: its layers, interactions, normalization, readout and activation), a dense ``Network`` (its layer sizes,
    activation and readout) or dense layer sizes (with ``activation``, no readout). A network gives its architecture
    only, never its weights."""
    from ebm_sim.model.network import is_layered

    if is_layered(layers):
        return layers, "hard_sigmoid", False
    if hasattr(layers, "layer_sizes"):
        return tuple(layers.layer_sizes), layers.activation, bool(layers.readout)
    return tuple(int(n) for n in layers), activation, False


def _architecture_text(architecture) -> str:
    """'64-128-10' for dense layer sizes, 'layers 3x32x32-... (cost)' for a network or model (``ebm init``'s)."""
    if isinstance(architecture, tuple):
        return "-".join(map(str, architecture))
    return _shape_text(architecture)


def dataset_inputs(data, split: str, shape, num_classes: int, what: str, hint: str = "") -> tuple:
    """(x (N, *shape) float, y (N,)) of ``data``'s ``split`` for a model taking one sample of ``shape`` ((n_0,) or
    (C, H, W)) and giving ``num_classes`` classes; ValueError ("{what} do not fit {dataset}: ...{hint}") unless the
    shape is the dataset's (C, H, W) images or their flat (n_0,) features and the class counts agree."""
    shape = tuple(int(n) for n in shape)
    if shape not in ((data.num_features,), tuple(data.channels_first_shape)) or num_classes != data.num_classes:
        raise ValueError(f"{what} do not fit {data.name}: {'x'.join(map(str, shape))} inputs and {num_classes} "
                         f"classes, but {data.name} has {'x'.join(map(str, data.channels_first_shape))} images "
                         f"({data.num_features} features) and {data.num_classes} classes{hint}")
    x, y = (data.x_train, data.y_train) if split == "train" else (data.x_test, data.y_test)
    return x.reshape((x.shape[0],) + shape), y


def run_baseline(kind: str, dataset: str, layers, out, *, data_dir=None, limit_train=None, limit_test=None,
                 data_seed: int | None = None, activation: str = "hard_sigmoid", resume: bool = False,
                 overwrite: bool = False, progress: bool = True, log=print, provenance: dict | None = None,
                 **config) -> dict:
    """Train a ``kind`` ("standard" or "pgd-at") baseline of the architecture ``layers`` on ``dataset`` into ``out``.

    layers: dense layer sizes (n_0, ..., n_L) with ``activation``; a dense ebm_sim ``Network`` (its sizes,
    activation and readout); or an ``ebm_sim.model.LayeredNetwork`` (its layers, convolutions, pooling,
    normalization, activation and readout: a ``LayeredFeedForward``), fresh weights in every case. The dataset's
    images are reshaped to the architecture's input shape ((n_0,) or (C, H, W)); ValueError if they do not fit.
    config: BaselineConfig fields; eps, pgd_steps, pgd_step_size and augment that are not given take the recipe of the
    dataset's family (``BaselineConfig.for_dataset``: 0.1 for (Fashion-)MNIST and digits, 8/255 and crop+flip for
    CIFAR; dense layers are not augmented).
    Evaluates clean test accuracy and accuracy under the training PGD (eps, steps, step size) on the test split.
    data_seed: the seed of the dataset's split and subsamples (default: config's seed; the pipeline fixes it so that
    every model sees the same data). provenance: extra entries for the file's provenance. Returns a summary dict."""
    from ebm_sim import datasets

    from .baselines import BaselineConfig, robust_accuracy, train_baseline
    from .train import evaluate

    out = Path(out)
    given = BaselineConfig(kind=kind, **config)  # the given fields, validated before any work
    architecture, activation, readout = _architecture_of(layers, activation)
    check_output(out, overwrite=overwrite, resume=resume)
    data = datasets.load_dataset(dataset, data_dir, limit_train=limit_train, limit_test=limit_test,
                                 seed=given.seed if data_seed is None else data_seed)
    if isinstance(architecture, tuple) and "augment" not in config:  # dense layers: no image to crop and flip
        config = {**config, "augment": "none"}
    config = BaselineConfig.for_dataset(data.name, kind=kind, **config)  # the family's recipe where not given
    if isinstance(architecture, tuple):
        shape, classes = architecture[:1], architecture[-1]
        what = f"layer sizes {_architecture_text(architecture)}"
        hint = f" (e.g. --layers {data.num_features},512,{data.num_classes})"
    else:
        shape, classes = architecture.input_shape, architecture.num_classes
        what, hint = f"the {_architecture_text(architecture)}", ""
    x_train, y_train = dataset_inputs(data, "train", shape, classes, what, hint)
    x_test, y_test = dataset_inputs(data, "test", shape, classes, what, hint)
    method = "standard training" if kind == "standard" else (
        f"PGD adversarial training (eps {config.eps:g}, {config.pgd_steps} steps of {config.step_size:g})")
    log(f"{method} of {_architecture_text(architecture)} on {data.name} ({len(y_train)} train / {len(y_test)} "
        f"test samples, {config.val_fraction:.0%} held out); checkpoints in {out}")
    provenance = {"limit_train": limit_train, "limit_test": limit_test, "image_shape": list(data.image_shape),
                  **(provenance or {})}
    with exclusive(out), _interruption_note(out, log):
        model, history = train_baseline(architecture, x_train, y_train, config, activation=activation,
                                        readout=readout, checkpoint_path=out, resume=resume, progress=progress,
                                        log=log, dataset=data.name, provenance=provenance)
    test = evaluate(model, x_test, y_test)
    robust = robust_accuracy(model, x_test, y_test, config.eps, config.pgd_steps, config.step_size,
                             seed=config.seed)
    return {"path": str(out), "kind": kind, "dataset": data.name, "architecture": _architecture_text(architecture),
            "epochs_run": len(history.get("epoch", [])),
            "best_epoch": int(history["best_epoch"][0]), "test_accuracy": test["accuracy"],
            "test_robust_accuracy": robust["robust_accuracy"], "eps": config.eps, "pgd_steps": config.pgd_steps,
            "pgd_step_size": config.step_size, "n_test": test["n"]}


def format_baseline_summary(s: dict) -> str:
    arch = f" ({s['architecture']})" if "architecture" in s else ""
    return (f"{s['kind']} baseline{arch} on {s['dataset']}: {s['epochs_run']} epochs (best epoch {s['best_epoch']}); "
            f"test accuracy {100 * s['test_accuracy']:.2f}%, under PGD Linf eps {s['eps']:g} ({s['pgd_steps']} "
            f"steps of {s['pgd_step_size']:g}) {100 * s['test_robust_accuracy']:.2f}% ({s['n_test']} test samples)\n"
            f"wrote {s['path']}")


def _layers_metadata(model) -> dict:
    """The model's layers for the ONNX metadata: {"layer_sizes"} of a FeedForward, {"layer_shapes"} of a
    LayeredFeedForward."""
    if hasattr(model, "layer_sizes"):
        return {"layer_sizes": [int(n) for n in model.layer_sizes]}
    return {"layer_shapes": [[int(n) for n in shape] for shape in model.layer_shapes]}


def run_export_onnx(model_path, out, *, quantize: str | None = None, check_samples: int = 64, seed: int = 0,
                    dataset: str | None = None, data_dir=None) -> dict:
    """``ebm export-onnx``: a feedforward model file (distilled, standard or pgd-at; a dense FeedForward or a
    convolutional LayeredFeedForward) -> ONNX, with its provenance in the ONNX metadata; ``quantize="int8"`` writes
    onnxruntime's dynamically quantized int8 model instead of the float one. Then onnxruntime is run on
    ``check_samples`` inputs and compared with torch (``onnx_export.measure_export``: max |difference| of the
    logits, prediction agreement): random inputs in [0, 1], or with ``dataset`` a seeded, class-stratified subsample
    of its test split, reshaped to the model's input shape, which adds both sides' accuracies.
    An EBM (ebm-network file) has no static graph to export: its relaxation stops on a tolerance."""
    import numpy as np

    from .io import artifact_format, load_model
    from .onnx_export import QUANTIZATIONS, export_onnx, measure_export, quantize_onnx

    model_path, out = Path(model_path), Path(out)
    if isinstance(check_samples, bool) or not isinstance(check_samples, int) or check_samples < 1:
        raise ValueError(f"check_samples must be a positive integer, got {check_samples!r}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZATIONS)}")
    if artifact_format(model_path) == "ebm-network":
        raise ValueError(f"{model_path} is an EBM (ebm-network): its relaxation is not a static graph; export its "
                         f"distilled student (ebm distill) instead")
    model = load_model(model_path)
    shape = tuple(model.input_shape)
    if dataset is None:
        x, y = np.random.default_rng(seed).random((check_samples,) + shape, dtype=np.float32), None
    else:
        from ebm_sim import datasets

        data = datasets.load_dataset(dataset, data_dir, limit_test=check_samples, seed=seed)
        x, y = dataset_inputs(data, "test", shape, model.num_classes, f"{model_path.name}'s {_shape_text(model)}")
    record = model.provenance
    metadata = {"source_file": model_path.name, "source_content_hash": record.content_hash, "kind": record.kind,
                "dataset": record.dataset, "network_hash": record.network_hash,
                "fixed_points_hash": record.fixed_points_hash, **_layers_metadata(model)}
    if quantize is None:
        export_onnx(model, out, input_shape=shape, metadata=metadata)
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            float_path = export_onnx(model, Path(tmp) / "float.onnx", input_shape=shape, metadata=metadata)
            quantize_onnx(float_path, out, quantize)
    measured = measure_export(model, out, x, y)
    return {"path": str(out), "source": str(model_path), "kind": record.kind, "layers": _shape_text(model),
            **_layers_metadata(model), "quantization": quantize or "none",
            "check_data": "random" if dataset is None else f"{data.name} test", "samples": len(x),
            **{k: v for k, v in measured.items() if k not in ("n", "quantization")}}


def format_export_summary(s: dict) -> str:
    """One line: what was written and how onnxruntime compares with torch (and, on a dataset, their accuracies)."""
    quantized = "" if s["quantization"] == "none" else f" ({s['quantization']}-quantized)"
    inputs = "random inputs" if s["check_data"] == "random" else f"{s['check_data']} images"
    text = (f"wrote {s['path']}: {s['kind']} model{quantized} {s['layers']} from {s['source']}; onnxruntime vs "
            f"torch on {s['samples']} {inputs}: max |difference| {s['max_abs_difference']:.2e}, same prediction on "
            f"{100 * s['prediction_agreement']:.1f}%")
    if "accuracy_onnx" in s:
        text += f", accuracy {100 * s['accuracy_onnx']:.1f}% (onnxruntime) / {100 * s['accuracy_torch']:.1f}% (torch)"
    return text


def parse_model_argument(text: str) -> tuple:
    """``NAME=PATH`` or ``PATH`` (name: the file's stem) -> (name, Path)."""
    name, sep, path = text.partition("=")
    if not sep:
        name, path = Path(text).stem, text
    if not name or not path:
        raise ValueError(f"a model is PATH or NAME=PATH, got {text!r}")
    return name, Path(path)


def run_robustness(model_arguments, dataset: str, out_dir, *, data_dir=None, student=None, ebm_gradients=None,
                   progress: bool = True, log=print, overwrite: bool = False, cluster: str | None = None,
                   **config) -> dict:
    """``ebm robustness``: evaluate the models (``NAME=PATH`` or ``PATH``; EBM networks and feedforward files) on the
    test split of ``dataset``. student: the EBMs' distilled student (transfer attack); ebm_gradients: EBM gradient
    sources; cluster: run the parts as Ray tasks (``evaluate``'s cluster; None: here); config: RobustnessConfig
    fields over the dataset's default budgets. Writes results.json, table.md,
    sweeps.png, corruptions.png into out_dir (resumable: parts/). Returns {"results", "paths", "seconds"}."""
    from ebm_sim import datasets

    from .io import artifact_format
    from .robustness import RobustnessConfig, evaluate, load_model_under_test
    from .robustness.report import report_files

    from ebm_sim.cluster import check_cluster

    start = time.time()
    cluster = check_cluster(cluster)  # before any work
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
                       progress=progress, log=log, overwrite=overwrite, cluster=cluster)
    return {"results": results, "paths": {k: str(v) for k, v in report_files(out_dir).items()},
            "seconds": time.time() - start}


# ---------------------------------------------------------------------------------------------- command line
def _fit_options(args) -> dict:
    return {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
            "patience": args.patience or None, "val_fraction": args.val_fraction, "schedule": args.schedule}


def cmd_distill(args) -> int:
    summary = run_distill(args.network, args.fixed_points, args.output, test_fixed_points=args.test_fixed_points,
                          resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
                          log=lambda msg: print(msg, flush=True), layer_weight=args.layer_weight,
                          output_weight=args.output_weight, output_target=args.output_target,
                          init_from_ebm=args.init_from_ebm, nproc=args.nproc, **_fit_options(args))
    if summary is not None:  # None on torchrun's ranks > 0
        print(format_distill_summary(summary))
    return 0


def cmd_export_onnx(args) -> int:
    summary = run_export_onnx(args.model, args.output, quantize=args.quantize, check_samples=args.check_samples,
                              dataset=args.dataset, data_dir=args.data_dir)
    print(format_export_summary(summary))
    return 0


#: the PGD options of ``ebm baseline`` (argparse dest = BaselineConfig field); not given: the dataset's budget
PGD_OPTIONS = ("eps", "pgd_steps", "pgd_step_size")


def baseline_architecture(args) -> tuple:
    """(architecture, provenance) ``ebm baseline`` trains: the network of ``--like NET.h5`` (dense or layered; its
    architecture, not its weights; ``--activation`` may not contradict it), or the one ``ebm init`` builds from
    ``--layers``, ``--arch`` or ``--preset`` (``ebm_sim.commands._architecture_network``)."""
    if args.like is None:
        return _architecture_network(args), {}
    from ebm_sim import storage

    network = storage.load_network(args.like)
    if args.activation is not None and args.activation != network.activation:
        raise ValueError(f"--activation {args.activation} contradicts {args.like}, whose network uses "
                         f"{network.activation}: drop --activation (--like copies the architecture)")
    return network, {"like_network_file": Path(args.like).name, "like_network_hash": network.content_hash()}


def cmd_baseline(args) -> int:
    architecture, provenance = baseline_architecture(args)
    pgd = {name: getattr(args, name) for name in PGD_OPTIONS if getattr(args, name) is not None}
    summary = run_baseline(args.kind, args.dataset, architecture, args.output, data_dir=args.data_dir,
                           limit_train=args.limit_train, limit_test=args.limit_test, resume=args.resume,
                           overwrite=args.overwrite, progress=not args.no_progress,
                           log=lambda msg: print(msg, flush=True), provenance=provenance, **pgd,
                           **_fit_options(args))
    print(format_baseline_summary(summary))
    return 0


def cmd_robustness(args) -> int:
    from .robustness.report import markdown_table

    options = {name: getattr(args, name) for name in (
        "eps_linf", "eps_l2", "sweep_linf", "sweep_l2", "pgd_steps", "pgd_restarts", "audit_steps", "audit_restarts",
        "audit_samples", "samples", "autoattack_samples", "autoattack_norms", "square_samples", "square_queries", "autoattack_iterations", "corruption_samples",
        "corruptions", "seed", "batch_size", "min_norm_steps", "as_published_steps", "checkpoint_steps")}
    if args.as_published:
        options["as_published"] = True
    if args.no_autoattack:
        options["autoattack"] = False
    if args.no_min_norm:
        options["min_norm"] = False
    if args.no_square:
        options["square"] = False
    if args.no_corruptions:
        options["corruption_samples"] = 0
    summary = run_robustness(args.models, args.dataset, args.out_dir, data_dir=args.data_dir, student=args.student,
                             ebm_gradients=args.ebm_gradients, progress=not args.no_progress, overwrite=args.overwrite,
                             log=lambda msg: print(msg, flush=True), cluster=args.cluster, **options)
    table = markdown_table(summary["results"])
    print(table.split("\n## Budgets")[0].rstrip())
    for name, result in summary["results"]["models"].items():
        print(f"{name}: audit {'passed' if result['audit']['passed'] else result['audit']['verdict']}")
    print(f"wrote {', '.join(summary['paths'].values())} in {summary['seconds'] / 60:.1f} min")
    return 0


def _add_robustness_command(sub) -> None:
    """``ebm robustness`` (the work is in distill.commands.run_robustness)."""
    from ebm_sim.datasets import DATASET_NAMES

    from .robustness.config import DATASET_BUDGETS, EBM_GRADIENTS, RobustnessConfig

    d = RobustnessConfig()

    def floats(text):
        try:
            return tuple(float(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None

    p = sub.add_parser("robustness", help="attack and corrupt models; audit the evaluation for gradient masking",
                       description="Evaluate EBMs, distilled students and baselines on a dataset's test split: FGSM, "
                                   "PGD Linf/L2 with eps sweeps, AutoAttack (standard), Square (black box), the 15 "
                                   "CIFAR-10-C corruptions at 5 severities, and an audit for gradient masking. An "
                                   "EBM is attacked through BPTT over its deployed relaxation, implicit "
                                   "differentiation and (with --student) transfer from its student; per example the "
                                   "worst case counts. Writes results.json, table.md, sweeps.png, corruptions.png; "
                                   "resumable (re-run the same command).",
                       epilog="Default budgets per dataset (pixel units): " + "; ".join(
                           f"{k}: Linf {v['eps_linf']:.3g}, L2 {v['eps_l2']:g}" for k, v in DATASET_BUDGETS.items()))
    p.add_argument("models", nargs="+", metavar="[NAME=]MODEL.h5",
                   help="ebm-network or ebm-feedforward files, optionally named (e.g. EBM=net.h5)")
    p.add_argument("--dataset", required=True, metavar="NAME", help=f"one of {', '.join(DATASET_NAMES)}")
    p.add_argument("--data-dir", metavar="DIR", default=None, help="folder with the dataset files")
    p.add_argument("--student", metavar="STUDENT.h5", default=None,
                   help="the EBMs' distilled student: adds the transfer attack to their gradient sources")
    p.add_argument("--ebm-gradients", type=parse_names, default=None, metavar="G[,G...]",
                   help=f"EBM gradient sources among {', '.join(EBM_GRADIENTS)} (default: bptt,implicit and "
                        f"transfer with --student)")
    p.add_argument("--out-dir", required=True, metavar="DIR", help="where the report and its resumable parts go")
    p.add_argument("--eps-linf", type=float, default=None, help="Linf budget (default: the dataset's)")
    p.add_argument("--eps-l2", type=float, default=None, help="L2 budget (default: the dataset's)")
    p.add_argument("--sweep-linf", type=floats, default=None, metavar="E,E,...", help="Linf eps sweep")
    p.add_argument("--sweep-l2", type=floats, default=None, metavar="E,E,...", help="L2 eps sweep")
    p.add_argument("--samples", type=int, default=None, help=f"test images attacked (default {d.samples})")
    p.add_argument("--autoattack-samples", type=int, default=None,
                   help="of those, the first N attacked by AutoAttack (default: all of them)")
    p.add_argument("--square-samples", type=int, default=None, help=f"default {d.square_samples}")
    p.add_argument("--audit-samples", type=int, default=None, help=f"default {d.audit_samples}")
    p.add_argument("--corruption-samples", type=int, default=None, help="test images corrupted (default: all)")
    p.add_argument("--corruptions", type=parse_names, default=None, metavar="NAME[,NAME...]",
                   help="corruptions to run (default: all 15)")
    p.add_argument("--pgd-steps", type=int, default=None, help=f"default {d.pgd_steps}")
    p.add_argument("--pgd-restarts", type=int, default=None, help=f"default {d.pgd_restarts}")
    p.add_argument("--audit-steps", type=int, default=None, help=f"the audit's stronger PGD (default {d.audit_steps})")
    p.add_argument("--audit-restarts", type=int, default=None, help=f"default {d.audit_restarts}")
    p.add_argument("--square-queries", type=int, default=None, help=f"default {d.square_queries}")
    p.add_argument("--autoattack-iterations", type=int, default=None,
                   help=f"AutoAttack's APGD/FAB iterations (default {d.autoattack_iterations}; fewer is reported as "
                        f"a reduced AutoAttack)")
    p.add_argument("--min-norm-steps", type=int, default=None,
                   help=f"iterations of the minimum-norm attack FMN, Linf and L2 (default {d.min_norm_steps})")
    p.add_argument("--no-min-norm", action="store_true", help="skip the minimum-norm attack (FMN)")
    p.add_argument("--no-autoattack", action="store_true", help="skip AutoAttack, Linf and L2")
    p.add_argument("--autoattack-norms", type=parse_names, default=None, metavar="Linf[,L2]",
                   help="AutoAttack's threat models (default: Linf,L2)")
    p.add_argument("--no-square", action="store_true", help="skip the Square black-box attack")
    p.add_argument("--no-corruptions", action="store_true", help="skip the 15 corruptions x 5 severities")
    p.add_argument("--as-published", action="store_true",
                   help="also attack a convolutional EBM as the published code did: every deployed step predicts, "
                        "the gradient is that of the first K unrolled steps (source bptt-truncated, reported beside "
                        "full BPTT, outside the worst case)")
    p.add_argument("--as-published-steps", type=int, default=None, metavar="K",
                   help=f"K of --as-published (default {d.as_published_steps}, as published)")
    p.add_argument("--checkpoint-steps", type=_checkpoint_steps, default=None, metavar="auto|none|C",
                   help="memory of a convolutional EBM's BPTT: checkpoint pieces of C steps; auto (default) does so "
                        "in pieces of 10 beyond 50 steps; none never")
    p.add_argument("--seed", type=int, default=None, help="draw of the examples and the attacks' randomness")
    p.add_argument("--batch-size", type=int, default=None, help=f"examples per chunk (default {d.batch_size})")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the report of another evaluation in --out-dir (processes running the same "
                        "evaluation may share a folder without it)")
    from ebm_sim.cluster import CLUSTER_HELP, cluster_argument

    p.add_argument("--cluster", type=cluster_argument, default=None, metavar="local|auto|ADDRESS",
                   help=CLUSTER_HELP + ". Every part (model, attack, budget, chunk) still to do is one Ray task that "
                        "stores its own part: the same results as without --cluster")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_robustness)


def _checkpoint_steps(text: str):
    """--checkpoint-steps: "auto", "none" or a positive number of steps per checkpointed piece."""
    if text in ("auto", "none"):
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, none or a number of steps, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"checkpoint pieces need at least 1 step, got {value}")
    return value


def _add_distill_commands(sub) -> None:
    """``ebm distill`` and ``ebm baseline`` (the work is in distill.commands; torch is imported only when they run)."""
    from ebm_sim.datasets import DATASET_NAMES
    from ebm_sim.network import ACTIVATIONS

    from .config import (BASELINE_KINDS, DATASET_FAMILIES, OUTPUT_TARGETS, PGD_PRESETS, SCHEDULES, BaselineConfig,
                         DistillConfig)

    def fit_arguments(p, d):
        p.add_argument("--epochs", type=int, default=d.epochs, help=f"maximum epochs (default {d.epochs})")
        p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
        p.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate (default {d.lr:g})")
        p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule, help=f"default {d.schedule}")
        p.add_argument("--patience", type=int, default=d.patience or 0,
                       help=f"stop after this many epochs without a lower held-out loss; 0: never (default "
                            f"{d.patience or 0})")
        p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                       help=f"share held out for early stopping (default {d.val_fraction:g})")
        p.add_argument("--seed", type=int, default=d.seed, help="seed of the init, split, batches (and PGD starts)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    d = DistillConfig()
    p = sub.add_parser("distill", help="train a feedforward student on a network's fixed points",
                       description="Distill an EBM into a feedforward network with its layers (dense sizes, or a "
                                   "layered network's convolutions, pooling, normalization and readout): per-layer "
                                   "MSE to the fixed-point states plus a cross-entropy output term, Adam, early "
                                   "stopping on a held-out split; the student file (ebm-feedforward) is rewritten "
                                   "after every epoch and records the network's and the fixed points' hashes.")
    p.add_argument("network", metavar="NET.h5", help="the EBM's network file (dense or layered, e.g. convolutional)")
    p.add_argument("fixed_points", metavar="FIXED_POINTS.h5",
                   help="its fixed points (ebm relax NET.h5 --split train); refused if made by another network or "
                        "if their shapes do not fit it")
    p.add_argument("--test-fixed-points", metavar="TEST.h5", default=None,
                   help="fixed points of held-out data (ebm relax --split test) to report accuracy and agreement")
    p.add_argument("--layer-weight", type=parse_rates, default=d.layer_weight, metavar="W[,W...]",
                   help=f"weight of each layer's state MSE, one value or one per state layer (default "
                        f"{d.layer_weight:g})")
    p.add_argument("--output-weight", type=float, default=d.output_weight,
                   help=f"weight of the cross-entropy output term (default {d.output_weight:g})")
    p.add_argument("--output-target", choices=OUTPUT_TARGETS, default=d.output_target,
                   help=f"class the output term aims at: the EBM's prediction or the label (default "
                        f"{d.output_target})")
    p.add_argument("--init-from-ebm", action="store_true", help="start from the EBM's forward weights W_k, b_k")
    fit_arguments(p, d)
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="data-parallel processes on this machine (torch.distributed, gloo), each taking a slice of "
                        "every minibatch; the result equals one process up to float rounding (default 1; under "
                        "torchrun leave it out)")
    add_output_argument(p, "-o", "--output", policy="resume", required=True, metavar="STUDENT.h5",
                        help="student file to write (rewritten every epoch; --resume continues it)")
    p.set_defaults(func=cmd_distill)

    b = BaselineConfig()
    p = sub.add_parser("baseline", help="train a standard or PGD-adversarially trained feedforward baseline",
                       description="Train a feedforward network with an EBM's architecture (dense --layers with "
                                   "hard-sigmoid hidden layers, or the layers of --arch, --preset or --like NET.h5: "
                                   "the same convolutions, pooling, normalization and readout, fresh weights) by "
                                   "standard backprop or PGD adversarial training (Madry et al. 2018, Linf, random "
                                   "start) and report its test accuracy, clean and under that PGD. The dataset's "
                                   "images are reshaped to the architecture's input shape.",
                       epilog="Default PGD budgets per dataset (pixel units): " + "; ".join(
                           f"{', '.join(n for n in DATASET_NAMES if DATASET_FAMILIES.get(n) == family)}: "
                           f"eps {v['eps']:.4g}, {v['pgd_steps']} steps of {v['pgd_step_size']:.4g}"
                           for family, v in PGD_PRESETS.items()))
    p.add_argument("--kind", choices=BASELINE_KINDS, required=True,
                   help="standard: backprop on clean images; pgd-at: PGD adversarial training (Madry et al. 2018)")
    p.add_argument("--dataset", required=True, metavar="NAME", help=f"one of {', '.join(DATASET_NAMES)}")
    p.add_argument("--data-dir", metavar="DIR", default=None, help="folder with the dataset files")
    p.add_argument("--limit-train", type=int, default=None, metavar="N", help="seeded subsample of N training samples")
    p.add_argument("--limit-test", type=int, default=None, metavar="N", help="seeded subsample of N test samples")
    _add_architecture_arguments(p, "784,512,512,10 (an EBM's, input first and classes last)").add_argument(
        "--like", metavar="NET.h5", default=None,
        help="the architecture of this network file (dense or layered; its weights are not used)")
    p.add_argument("--activation", choices=sorted(ACTIVATIONS), default=None,
                   help=ACTIVATION_HELP + "; with --arch or --preset it overrides theirs, --like keeps its network's")
    p.add_argument("--eps", type=float, default=None, help="PGD Linf budget in pixels (default: the dataset's)")
    p.add_argument("--pgd-steps", type=int, default=None, help="default: the dataset's")
    p.add_argument("--pgd-step-size", type=float, default=None, help="default: the dataset's")
    fit_arguments(p, b)
    p.set_defaults(dtype="float32", gain=1.0)  # what _architecture_network builds the architecture with
    add_output_argument(p, "-o", "--output", policy="resume", required=True, metavar="MODEL.h5",
                        help="model file to write (rewritten every epoch; --resume continues it)")
    p.set_defaults(func=cmd_baseline)


def add_parsers(sub) -> None:
    """Register ``ebm export-onnx``, ``distill``, ``baseline`` and ``robustness`` on the ``ebm`` subparsers ``sub``
    (torch is imported only when they run)."""
    p = sub.add_parser("export-onnx", help="export a feedforward model (distilled or baseline) to ONNX",
                       description="Export a distilled or baseline model (dense or convolutional) to ONNX "
                                   "(provenance in its metadata), run it with onnxruntime on random inputs (or a "
                                   "dataset's test images: --dataset) and report the difference to torch: max "
                                   "|difference| of the logits, prediction agreement (and both accuracies).")
    p.add_argument("model", metavar="MODEL.h5", help="an ebm-feedforward file (ebm distill, ebm baseline)")
    p.add_argument("--dataset", metavar="NAME", default=None,
                   help="check on a seeded subsample of this dataset's test images (reshaped to the model's input) "
                        "and report the accuracies too; default: random inputs in [0, 1]")
    p.add_argument("--data-dir", metavar="DIR", default=None, help="folder with the dataset files")
    p.add_argument("--check-samples", type=int, default=64, metavar="N", help="inputs compared (default 64)")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="write onnxruntime's dynamically quantized int8 model (int8 weights, uint8 activations "
                        "quantized at run time) instead of the float32 one")
    add_output_argument(p, "-o", "--output", required=True, metavar="MODEL.onnx", help="ONNX file to write")
    p.set_defaults(func=cmd_export_onnx)
    _add_distill_commands(sub)
    _add_robustness_command(sub)

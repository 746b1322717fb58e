"""The ``ebm`` command line: a thin front end (parse, call the library, print).

    ebm init  --layers 64,128,10 | --arch "3x32x32, conv 64 k3 p1 maxpool, readout 10" | --preset NAME
              [--seed 0] [--gain 1.0] [--activation hard_sigmoid] [--dtype float32] -o NET.h5 [--overwrite]
    ebm train --dataset NAME (--layers ... | --arch SPEC | --preset NAME) [training settings] -o NET.h5 [--resume]
    ebm relax NET.h5 --dataset digits [--split test] [--limit N] [--method fixed_point] [--tol 1e-4]
              [--max-steps 1000] [--dt DT] [--batch-size 256] [--dtype float32|float64] -o FIXED_POINTS.h5
    ebm info  FILE [FILE ...]
    ebm demo  [--out-dir runs/demo-simulator]

User mistakes (a missing or corrupt file, an unknown dataset, a network whose input size does not match the data,
bad settings, an output that exists or cannot be written) print ``ebm: error: <message>`` to stderr and exit with
status 2, never a traceback. A relaxation or training that diverges, and a full disk, exit with status 1; an
interrupted one (Ctrl-C) saves its progress, says how to resume and exits with status 130. Every output a command
names is declared with ``outputs.add_output_argument`` and claimed by ``main`` before the command runs (the rule of
ebm_sim/outputs.py: exists only with --overwrite or --resume, writable, one writer at a time).

``ebm relax`` is resumable: finished batches are saved atomically to ``<OUT>.partial.npz`` (every
``--checkpoint-every`` batches and on Ctrl-C); re-running the same command continues from there. The partial file is
deleted once the final artifact is written, and nothing is ever written under the final name before the end.
"""
from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

from .batch_relax import RunError, format_relax_summary, run_relax
from .outputs import DiskFullError, add_output_argument, claim_outputs

PROG = "ebm"
ACTIVATION_HELP = "rho(u) = clip(u, 0, 1) (hard_sigmoid, default) or clip(u/2, 0, 1) (hard_sigmoid_half)"
RELAX_METHODS = ("fixed_point", "euler", "alternating", "rk45")


# ---------------------------------------------------------------------------------------------- commands
def _layers(text: str) -> tuple:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 64,128,10, got {text!r}") from None
    if len(sizes) < 2 or any(n <= 0 for n in sizes):
        raise argparse.ArgumentTypeError(f"need at least two positive layer sizes (input,...,output), got {text!r}")
    return sizes


def _architecture_network(args, readout_from_cost: bool = False):
    """The untrained network the arguments describe: --layers (a dense Network, with a readout when the cost is
    cross_entropy), --arch (a LayeredNetwork from the spec or TOML file) or --preset (its architecture, activation and
    normalization; --activation overrides)."""
    from .network import Network

    if args.layers is not None:
        return Network.init(args.layers, seed=args.seed, dtype=args.dtype, activation=args.activation or
                            "hard_sigmoid", gain=args.gain,
                            readout=readout_from_cost and args.cost == "cross_entropy")
    from .model import LayeredNetwork
    from .model.presets import get

    if args.arch is not None:
        return LayeredNetwork.init(args.arch, seed=args.seed, dtype=args.dtype, activation=args.activation,
                                   gain=args.gain)
    preset = get(args.preset)
    return LayeredNetwork.init(preset.arch, seed=args.seed, dtype=args.dtype,
                               activation=args.activation or preset.activation, gain=args.gain,
                               normalization=preset.normalization)


def _shape_text(network) -> str:
    if hasattr(network, "layer_sizes"):
        return "layers " + "-".join(map(str, network.layer_sizes))
    return "layers " + "-".join("x".join(map(str, s)) for s in network.layer_shapes) + f" ({network.cost.kind})"


def cmd_init(args) -> int:
    from . import storage

    out = Path(args.output)
    network = _architecture_network(args)
    storage.save_network(out, network, extra_attrs={"init": {"seed": args.seed, "gain": args.gain}})
    print(f"wrote {out}: {_shape_text(network)}, {network.activation}, {network.dtype}, "
          f"seed {args.seed}, gain {args.gain:g}, network hash {network.content_hash()[:12]} (untrained)")
    return 0


def cmd_relax(args) -> int:
    summary = run_relax(args.network, args.dataset, args.output, data_dir=args.data_dir, split=args.split,
                        limit=args.limit, method=args.method, tol=args.tol, max_steps=args.max_steps, dt=args.dt,
                        batch_size=args.batch_size, dtype=args.dtype, checkpoint_every=args.checkpoint_every,
                        resume=not args.no_resume, progress=not args.no_progress)
    print(format_relax_summary(summary))
    return 0


def cmd_info(args) -> int:
    from . import storage

    status, printed = 0, 0
    for path in args.files:  # every file is described or refused; the worst outcome sets the exit status
        try:
            info = storage.artifact_info(path)
        except (ValueError, OSError) as error:
            print(f"{PROG}: error: {error}", file=sys.stderr, flush=True)
            status = 2
            continue
        print(("\n" if printed else "") + storage.format_info(info), flush=True)
        printed += 1
        if info["hash_status"] != "ok":
            status = max(status, 1)
    return status


def _rates(text: str):
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"learning rates must be numbers separated by commas, got {text!r}")
    return values[0] if len(values) == 1 else values


def cmd_train(args) -> int:
    from . import datasets
    from .network import Network
    from .training import TrainConfig, fit

    out = Path(args.output)  # checked (exists, --resume, --overwrite, writable, locked) by claim_outputs in main
    if args.cost is None:  # a spec ending in "readout N" trains with cross-entropy, any other with mse
        args.cost = "cross_entropy" if args.layers is None and _has_readout(args) else "mse"
    if args.backend is None:  # the Numba kernels cover dense networks; layered ones relax on torch
        args.backend = "numba" if args.layers is not None else "torch"
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, beta=args.beta, nudging=args.nudging,
                         cost=args.cost, method=args.method, free_steps=args.free_steps,
                         nudged_steps=args.nudged_steps, tol=args.tol, optimizer=args.optimizer, lr=args.lr,
                         momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
                         seed=args.seed, backend=args.backend, device=args.device, augment=args.augment)
    network = _architecture_network(args, readout_from_cost=True)  # spec errors before the data is read
    data = datasets.load_dataset(args.dataset, args.data_dir, limit_train=args.limit_train,
                                 limit_test=args.limit_test, seed=args.seed)
    if args.layers is not None:
        sizes = args.layers
        if sizes[0] != data.num_features or sizes[-1] != data.num_classes:
            raise ValueError(f"layer sizes {'-'.join(map(str, sizes))} do not fit {data.name}: its inputs have "
                             f"{data.num_features} features and it has {data.num_classes} classes (e.g. --layers "
                             f"{data.num_features},512,{data.num_classes})")
        x_train, x_test = data.x_train, data.x_test
    else:
        shape = data.channels_first_shape
        if tuple(network.input_shape) != tuple(shape) or network.num_classes != data.num_classes:
            raise ValueError(f"the architecture takes {'x'.join(map(str, network.input_shape))} inputs and gives "
                             f"{network.num_classes} classes; {data.name} has {'x'.join(map(str, shape))} images "
                             f"and {data.num_classes} classes")
        x_train = data.x_train.reshape((-1,) + tuple(shape))
        x_test = data.x_test.reshape((-1,) + tuple(shape))
    print(f"training {_shape_text(network)} on {data.name} ({len(data.y_train)} train / {len(data.y_test)} "
          f"test samples) with EP: {config.nudging} nudging, beta {config.beta:g}, {config.cost}, "
          f"{config.method} (free {config.free_steps} / nudged {config.nudged_steps} steps, tol {config.tol:g}), "
          f"{config.optimizer} lr {config.lr}, {config.epochs} epochs; checkpoints in {out}", flush=True)
    network = fit(network, x_train, data.y_train, x_test, data.y_test, config, checkpoint_path=out,
                  resume=args.resume, progress=not args.no_progress, log=lambda msg: print(msg, flush=True),
                  extra_attrs={"dataset": data.name, "init": {"seed": args.seed, "gain": args.gain}},
                  num_classes=data.num_classes)
    history = network.history
    if history.get("test_acc"):
        best = max(history["test_acc"])
        print(f"final test accuracy {100 * history['test_acc'][-1]:.2f}% (best {100 * best:.2f}%), "
              f"{sum(history['seconds']):.1f} s in total; wrote {out}")
    return 0


def _has_readout(args) -> bool:
    from .model.presets import get
    from .model.spec import load

    text = get(args.preset).arch if args.arch is None else args.arch
    return load(text).readout is not None


def cmd_demo(args) -> int:
    from . import demo

    results = demo.run_demo(args.out_dir, log=lambda msg: print(msg, flush=True))
    print(demo.format_report(results))
    return 0


# ---------------------------------------------------------------------------------------------- distill (torch side)
def _fit_options(args) -> dict:
    return {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
            "patience": args.patience or None, "val_fraction": args.val_fraction, "schedule": args.schedule}


def cmd_distill(args) -> int:
    from distill.commands import format_distill_summary, run_distill

    summary = run_distill(args.network, args.fixed_points, args.output, test_fixed_points=args.test_fixed_points,
                          resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
                          log=lambda msg: print(msg, flush=True), layer_weight=args.layer_weight,
                          output_weight=args.output_weight, output_target=args.output_target,
                          init_from_ebm=args.init_from_ebm, **_fit_options(args))
    print(format_distill_summary(summary))
    return 0


def cmd_export_onnx(args) -> int:
    from distill.commands import run_export_onnx

    summary = run_export_onnx(args.model, args.output, quantize=args.quantize)
    quantized = "" if args.quantize is None else f" ({args.quantize}-quantized)"
    print(f"wrote {summary['path']}: {summary['kind']} model{quantized} {'-'.join(map(str, summary['layer_sizes']))} from "
          f"{summary['source']}; onnxruntime vs torch on {summary['samples']} random inputs: max |difference| "
          f"{summary['max_abs_difference']:.2e}, same prediction on {100 * summary['prediction_agreement']:.1f}%")
    return 0


def cmd_baseline(args) -> int:
    from distill.commands import format_baseline_summary, run_baseline

    summary = run_baseline(args.kind, args.dataset, args.layers, args.output, data_dir=args.data_dir,
                           limit_train=args.limit_train, limit_test=args.limit_test, activation=args.activation,
                           resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
                           log=lambda msg: print(msg, flush=True), eps=args.eps, pgd_steps=args.pgd_steps,
                           pgd_step_size=args.pgd_step_size, **_fit_options(args))
    print(format_baseline_summary(summary))
    return 0


def _names(text: str) -> tuple:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def cmd_robustness(args) -> int:
    from distill.commands import run_robustness
    from distill.robustness.report import markdown_table

    options = {name: getattr(args, name) for name in (
        "eps_linf", "eps_l2", "sweep_linf", "sweep_l2", "pgd_steps", "pgd_restarts", "audit_steps", "audit_restarts",
        "audit_samples", "samples", "square_samples", "square_queries", "autoattack_iterations", "corruption_samples",
        "corruptions", "seed", "batch_size", "min_norm_steps")}
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
                             log=lambda msg: print(msg, flush=True), **options)
    table = markdown_table(summary["results"])
    print(table.split("\n## Budgets")[0].rstrip())
    for name, result in summary["results"]["models"].items():
        print(f"{name}: audit {'passed' if result['audit']['passed'] else result['audit']['verdict']}")
    print(f"wrote {', '.join(summary['paths'].values())} in {summary['seconds'] / 60:.1f} min")
    return 0


def cmd_pipeline(args) -> int:
    from ebm_pipeline import PipelineConfig, run_pipeline

    top = {"dataset": args.dataset, "data_dir": args.data_dir, "seed": args.seed, "limit_train": args.limit_train,
           "limit_test": args.limit_test}
    if args.config:
        config = PipelineConfig.from_file(args.config, **top)
    else:
        config = PipelineConfig(**{k: v for k, v in top.items() if v is not None})
    out = Path(args.out_dir or f"runs/pipeline-{config.dataset}")
    print(f"ebm pipeline on {config.dataset}: artifacts and report in {out}", flush=True)
    results = run_pipeline(config, out, progress=not args.no_progress, log=lambda msg: print(msg, flush=True),
                           force=args.force or ())
    print(results["budget_note"])
    for row in results["robustness"]["table"]:
        print(f"  {row['model']:<10} clean {100 * row['clean']:.1f}%  PGD-Linf "
              f"{100 * row['pgd_linf']:.1f}%  AutoAttack {100 * row['autoattack']:.1f}%  corruptions "
              f"{100 * row['corruption_mean']:.1f}%  audit {'passed' if row['audit_passed'] else 'FAILED'}")
    print(f"report: {out / 'report.html'} ({results['total_seconds'] / 60:.1f} min)")
    return 0


def _add_pipeline_command(sub) -> None:
    from .datasets import DATASET_NAMES

    p = sub.add_parser("pipeline", help="the whole study on a dataset, with a self-contained HTML report",
                       description="Train the EBM with EP, relax it and store its fixed points, distill a student, "
                                   "train standard and PGD baselines, evaluate robustness (with the audit), export "
                                   "the EBM to Lava and run it, compare latency and energy across targets, and write "
                                   "report.html, the plots and results.json. Every stage is skipped on a re-run when "
                                   "its artifacts are up to date, so an interrupted pipeline resumes.")
    p.add_argument("--dataset", default=None, metavar="NAME",
                   help=f"one of {', '.join(DATASET_NAMES)} (default digits, or the config file's)")
    p.add_argument("--config", metavar="FILE", default=None,
                   help="a TOML or YAML file with the dataset and any section overrides (see ebm_pipeline/config.py)")
    p.add_argument("--data-dir", metavar="DIR", default=None, help="folder with the dataset files")
    p.add_argument("--seed", type=int, default=None, help="seed of every stage (default 0)")
    p.add_argument("--limit-train", type=int, default=None, metavar="N",
                   help="a seeded, class-stratified subsample of N training images (a quick look at a large dataset)")
    p.add_argument("--limit-test", type=int, default=None, metavar="N", help="the same for the test split")
    p.add_argument("--out-dir", metavar="DIR", default=None, help="default runs/pipeline-<dataset>")
    p.add_argument("--force", type=_names, default=None, metavar="STAGE[,STAGE...]",
                   help="run these stages again even if their artifacts are up to date")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_pipeline)


def _add_robustness_command(sub) -> None:
    """``ebm robustness`` (the work is in distill.commands.run_robustness)."""
    from distill.robustness.config import DATASET_BUDGETS, EBM_GRADIENTS, RobustnessConfig

    from .datasets import DATASET_NAMES

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
    p.add_argument("--ebm-gradients", type=_names, default=None, metavar="G[,G...]",
                   help=f"EBM gradient sources among {', '.join(EBM_GRADIENTS)} (default: bptt,implicit and "
                        f"transfer with --student)")
    p.add_argument("--out-dir", required=True, metavar="DIR", help="where the report and its resumable parts go")
    p.add_argument("--eps-linf", type=float, default=None, help="Linf budget (default: the dataset's)")
    p.add_argument("--eps-l2", type=float, default=None, help="L2 budget (default: the dataset's)")
    p.add_argument("--sweep-linf", type=floats, default=None, metavar="E,E,...", help="Linf eps sweep")
    p.add_argument("--sweep-l2", type=floats, default=None, metavar="E,E,...", help="L2 eps sweep")
    p.add_argument("--samples", type=int, default=None, help=f"test images attacked (default {d.samples})")
    p.add_argument("--square-samples", type=int, default=None, help=f"default {d.square_samples}")
    p.add_argument("--audit-samples", type=int, default=None, help=f"default {d.audit_samples}")
    p.add_argument("--corruption-samples", type=int, default=None, help="test images corrupted (default: all)")
    p.add_argument("--corruptions", type=_names, default=None, metavar="NAME[,NAME...]",
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
    p.add_argument("--no-square", action="store_true", help="skip the Square black-box attack")
    p.add_argument("--no-corruptions", action="store_true", help="skip the 15 corruptions x 5 severities")
    p.add_argument("--seed", type=int, default=None, help="draw of the examples and the attacks' randomness")
    p.add_argument("--batch-size", type=int, default=None, help=f"examples per chunk (default {d.batch_size})")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the report of another evaluation in --out-dir (processes running the same "
                        "evaluation may share a folder without it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_robustness)


def _add_distill_commands(sub) -> None:
    """``ebm distill`` and ``ebm baseline`` (the work is in distill.commands; torch is imported only when they run)."""
    from distill.config import BASELINE_KINDS, OUTPUT_TARGETS, SCHEDULES, BaselineConfig, DistillConfig

    from .datasets import DATASET_NAMES
    from .network import ACTIVATIONS

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
                       description="Distill an EBM into a feedforward network with its layer sizes: per-layer MSE "
                                   "to the fixed-point states plus a cross-entropy output term, Adam, early stopping "
                                   "on a held-out split; the student file (ebm-feedforward) is rewritten after every "
                                   "epoch and records the network's and the fixed points' hashes.")
    p.add_argument("network", metavar="NET.h5", help="the EBM's network file")
    p.add_argument("fixed_points", metavar="FIXED_POINTS.h5",
                   help="its fixed points (ebm relax NET.h5 --split train); refused if made by another network")
    p.add_argument("--test-fixed-points", metavar="TEST.h5", default=None,
                   help="fixed points of held-out data (ebm relax --split test) to report accuracy and agreement")
    p.add_argument("--layer-weight", type=_rates, default=d.layer_weight, metavar="W[,W...]",
                   help=f"weight of each layer's state MSE, one value or one per state layer (default "
                        f"{d.layer_weight:g})")
    p.add_argument("--output-weight", type=float, default=d.output_weight,
                   help=f"weight of the cross-entropy output term (default {d.output_weight:g})")
    p.add_argument("--output-target", choices=OUTPUT_TARGETS, default=d.output_target,
                   help=f"class the output term aims at: the EBM's prediction or the label (default "
                        f"{d.output_target})")
    p.add_argument("--init-from-ebm", action="store_true", help="start from the EBM's forward weights W_k, b_k")
    fit_arguments(p, d)
    add_output_argument(p, "-o", "--output", policy="resume", required=True, metavar="STUDENT.h5",
                        help="student file to write (rewritten every epoch; --resume continues it)")
    p.set_defaults(func=cmd_distill)

    b = BaselineConfig()
    p = sub.add_parser("baseline", help="train a standard or PGD-adversarially trained feedforward baseline",
                       description="Train a feedforward network (hard-sigmoid hidden layers) by standard backprop or "
                                   "PGD adversarial training (Madry et al. 2018, Linf, random start) and report its "
                                   "test accuracy, clean and under that PGD.")
    p.add_argument("--kind", choices=BASELINE_KINDS, required=True,
                   help="standard: backprop on clean images; pgd-at: PGD adversarial training (Madry et al. 2018)")
    p.add_argument("--dataset", required=True, metavar="NAME", help=f"one of {', '.join(DATASET_NAMES)}")
    p.add_argument("--data-dir", metavar="DIR", default=None, help="folder with the dataset files")
    p.add_argument("--limit-train", type=int, default=None, metavar="N", help="seeded subsample of N training samples")
    p.add_argument("--limit-test", type=int, default=None, metavar="N", help="seeded subsample of N test samples")
    p.add_argument("--layers", type=_layers, required=True, metavar="N0,...,NL",
                   help="layer sizes, input first and classes last (e.g. the EBM's: 784,512,512,10)")
    p.add_argument("--activation", choices=sorted(ACTIVATIONS), default="hard_sigmoid", help=ACTIVATION_HELP)
    p.add_argument("--eps", type=float, default=b.eps, help=f"PGD Linf budget in pixels (default {b.eps:g})")
    p.add_argument("--pgd-steps", type=int, default=b.pgd_steps, help=f"default {b.pgd_steps}")
    p.add_argument("--pgd-step-size", type=float, default=b.pgd_step_size,
                   help=f"default {b.pgd_step_size:g}")
    fit_arguments(p, b)
    add_output_argument(p, "-o", "--output", policy="resume", required=True, metavar="MODEL.h5",
                        help="model file to write (rewritten every epoch; --resume continues it)")
    p.set_defaults(func=cmd_baseline)


# ---------------------------------------------------------------------------------------------- parser
def _add_architecture_arguments(p, example: str) -> None:
    from .model.presets import PRESETS

    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--layers", type=_layers, metavar="N0,...,NL", help=f"dense layer sizes, e.g. {example}")
    group.add_argument("--arch", metavar="SPEC|FILE.toml",
                       help="an architecture spec, e.g. '3x32x32, conv 64 k3 p1 maxpool, conv 128 k3 s2 p1, "
                            "readout 10' (grammar: docs/architecture.md), or a TOML file holding one")
    group.add_argument("--preset", choices=sorted(PRESETS),
                       help="a named recipe: its architecture, normalization and (ebm train) training settings; "
                            "flags given beside it override them")


def preset_train_defaults(argv) -> dict | None:
    """The training settings of ``ebm train --preset NAME`` as parser defaults (flags given explicitly override
    them), or None. An unknown name is left to the parser to refuse."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "train":
        return None
    name = None
    for index, word in enumerate(argv):
        if word == "--preset" and index + 1 < len(argv):
            name = argv[index + 1]
        elif word.startswith("--preset="):
            name = word.split("=", 1)[1]
    from .model.presets import PRESETS

    if name not in PRESETS:
        return None
    preset = PRESETS[name]
    return {"dataset": preset.dataset, **preset.train}


def build_parser(train_defaults: dict | None = None) -> argparse.ArgumentParser:
    from .datasets import DATASET_NAMES
    from .network import ACTIVATIONS
    from .training import AUGMENTATIONS, BACKENDS as TRAIN_BACKENDS, COSTS, NUDGINGS, OPTIMIZERS, SCHEDULES

    parser = argparse.ArgumentParser(
        prog=PROG, description="ebm-toolkit: simulate energy-based models (Hopfield energy, equilibrium "
                               "propagation) and manage their HDF5 artifacts.",
        epilog="Errors from user input print 'ebm: error: ...' and exit with status 2.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("export-onnx", help="export a feedforward model (distilled or baseline) to ONNX",
                       description="Export a distilled or baseline model to ONNX (provenance in its metadata), run "
                                   "it with onnxruntime on random inputs and report the difference to torch.")
    p.add_argument("model", metavar="MODEL.h5", help="an ebm-feedforward file (ebm distill, ebm baseline)")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="write onnxruntime's dynamically quantized int8 model (int8 weights, uint8 activations "
                        "quantized at run time) instead of the float32 one")
    add_output_argument(p, "-o", "--output", required=True, metavar="MODEL.onnx", help="ONNX file to write")
    p.set_defaults(func=cmd_export_onnx)

    p = sub.add_parser("init", help="create a seeded, untrained network file",
                       description="Create a seeded network: every parameter ~ U(-gain/sqrt(fan_in), "
                                   "gain/sqrt(fan_in)) (torch's default). Dense networks from --layers, any network "
                                   "(e.g. convolutional) from --arch or --preset.")
    _add_architecture_arguments(p, "64,128,10 (digits) or 784,512,10 (MNIST)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--gain", type=float, default=1.0,
                   help="scale of the initial weights (default 1.0; smaller, e.g. 0.5, makes the dynamics "
                        "contract faster and the fixed point unique)")
    p.add_argument("--activation", choices=sorted(ACTIVATIONS), default=None,
                   help=ACTIVATION_HELP + "; a preset or TOML file may set it")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="default float32")
    add_output_argument(p, "-o", "--output", required=True, metavar="NET.h5", help="network file to write")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("relax", help="relax a dataset to the network's fixed points and save them",
                       description="Relax every sample of a dataset split to equilibrium (free phase, beta = 0) in "
                                   "batches and write an ebm-fixed-points HDF5 file. Resumable: finished batches "
                                   "are kept in OUT.partial.npz; re-run the same command after an interruption.")
    p.add_argument("network", metavar="NETWORK.h5", help="network file (ebm init, or a trained network)")
    p.add_argument("--dataset", required=True, metavar="NAME", help=f"one of {', '.join(DATASET_NAMES)}")
    p.add_argument("--data-dir", metavar="DIR", default=None,
                   help="folder with the dataset files (default: the dataset's standard place or $EBM_DATA_DIR; "
                        "digits is embedded)")
    p.add_argument("--split", choices=("test", "train"), default="test", help="default test")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="relax a seeded, class-stratified subsample of N samples")
    p.add_argument("--method", choices=RELAX_METHODS, default="fixed_point", help="integrator (default fixed_point)")
    p.add_argument("--tol", type=float, default=1e-4, help="residual tolerance (default 1e-4)")
    p.add_argument("--max-steps", type=int, default=1000, help="step cap per sample (default 1000)")
    p.add_argument("--dt", type=float, default=None,
                   help="time step (euler: default 0.5; rk45: initial step, default 0.1; fixed_point and "
                        "alternating use 1)")
    p.add_argument("--batch-size", type=int, default=256, help="samples per batch (default 256)")
    p.add_argument("--dtype", choices=("float32", "float64"), default=None,
                   help="compute in this precision (default: the network's)")
    p.add_argument("--checkpoint-every", type=int, default=10, metavar="N",
                   help="save finished batches to OUT.partial.npz every N batches (default 10; also on Ctrl-C)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing OUT.partial.npz and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_output_argument(p, "-o", "--output", required=True, metavar="FIXED_POINTS.h5",
                        help="fixed-point file to write (its unfinished batches wait in OUT.partial.npz)")
    p.set_defaults(func=cmd_relax)

    p = sub.add_parser("train", help="train a network with equilibrium propagation",
                       description="Train a layered Hopfield network with EP: dense networks on the Numba "
                                   "simulator (or torch), convolutional ones (--arch, --preset) on torch. The network "
                                   "file is rewritten atomically after every epoch (weights, history, optimizer "
                                   "state); --resume continues an interrupted run exactly.")
    p.add_argument("--dataset", required=train_defaults is None, metavar="NAME",
                   help=f"one of {', '.join(DATASET_NAMES)} (a preset names its own)")
    p.add_argument("--data-dir", metavar="DIR", default=None, help="folder with the dataset files")
    p.add_argument("--limit-train", type=int, default=None, metavar="N", help="seeded subsample of N training samples")
    p.add_argument("--limit-test", type=int, default=None, metavar="N", help="seeded subsample of N test samples")
    _add_architecture_arguments(p, "784,512,10 (input first, classes last)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialization, batches and nudging signs")
    p.add_argument("--gain", type=float, default=1.0, help="scale of the initial weights (default 1.0)")
    p.add_argument("--activation", choices=sorted(ACTIVATIONS), default=None,
                   help=ACTIVATION_HELP + "; a preset or TOML file may set it")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="precision of the parameters and the simulation (default float32)")
    p.add_argument("--epochs", type=int, default=10, help="epochs to train (default 10)")
    p.add_argument("--batch-size", type=int, default=50, help="samples per minibatch (default 50)")
    p.add_argument("--beta", type=float, default=0.5, help="nudging strength (> 0; default 0.5)")
    p.add_argument("--nudging", choices=NUDGINGS, default="symmetric",
                   help="symmetric +/-beta (default), positive (one-sided +beta) or random (one-sided, random sign)")
    p.add_argument("--cost", choices=COSTS, default=None,
                   help="mse on the output layer, or cross_entropy through a softmax readout: with --layers the last "
                        "layer then reads out the one before it and is not part of the dynamics (default mse); with "
                        "--arch/--preset the spec decides (cross_entropy when it ends in 'readout N')")
    p.add_argument("--method", choices=RELAX_METHODS, default="fixed_point", help="integrator of both phases")
    p.add_argument("--free-steps", type=int, default=30, help="step cap of the free phase (default 30)")
    p.add_argument("--nudged-steps", type=int, default=10, help="step cap of each nudged phase (default 10)")
    p.add_argument("--tol", type=float, default=1e-4, help="residual at which a phase stops early (default 1e-4)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam",
                   help="adam (default) or sgd (with --momentum), on the EP gradient")
    p.add_argument("--lr", type=_rates, default=5e-4,
                   help="learning rate, or one per weight matrix separated by commas (default 5e-4)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="L2 weight decay (default 0)")
    p.add_argument("--schedule", choices=SCHEDULES, default="constant", help="constant or cosine annealing")
    p.add_argument("--backend", choices=TRAIN_BACKENDS, default=None,
                   help="numba (the default of --layers) or torch (the default of --arch and --preset, faster at "
                        "training batches; --device cuda for a GPU)")
    p.add_argument("--device", default="cpu", help="torch device of the torch backend (default cpu)")
    p.add_argument("--augment", choices=AUGMENTATIONS, default="none",
                   help="none (default) or crop_flip: random crop with 4 pixels of padding and horizontal flip, "
                        "seeded (image networks from --arch/--preset)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_output_argument(p, "-o", "--output", policy="resume", required=True, metavar="NET.h5",
                        help="network file (checkpointed every epoch; --resume continues it)")
    p.set_defaults(func=cmd_train)
    if train_defaults:
        p.set_defaults(**train_defaults)

    p = sub.add_parser("info", help="describe an artifact (network, fixed points, trajectory)",
                       description="Print the header, hash check and contents of ebm-toolkit HDF5 files. "
                                   "Every file is described or refused in turn; exit status 1 if a file's content "
                                   "hash does not match, 2 if a file cannot be read as an artifact.")
    p.add_argument("files", nargs="+", metavar="FILE", help="artifact files (.h5) to describe")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="run the simulator end to end on the embedded digits (under a minute)",
                       description="Initialize a seeded 64-256-10 network, relax the digits test set with every "
                                   "integrator, compare them, check the energy decreases, write three artifacts.")
    add_output_argument(p, "--out-dir", policy="folder", default="runs/demo-simulator", metavar="DIR",
                        help="where to write (default runs/demo-simulator; its three files are rewritten)")
    p.set_defaults(func=cmd_demo)
    _add_distill_commands(sub)
    _add_robustness_command(sub)
    _add_pipeline_command(sub)
    _add_hardware_commands(sub)
    return parser


def _add_hardware_commands(sub) -> None:
    """``ebm hardware ...`` (parsers and work live in hardware.commands; Lava is imported only when they run)."""
    from hardware import commands

    commands.add_parsers(sub)


USER_ERRORS = (ValueError, FileNotFoundError, OSError, pickle.UnpicklingError)
SIGPIPE_STATUS = 141  # what a shell reports for a program ended by SIGPIPE (128 + 13)


def _note(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _quiet_stdout() -> None:
    """After a closed pipe (``ebm info x.h5 | head``): send what is left of stdout to /dev/null, so that Python's
    final flush does not report the broken pipe as an error."""
    import os
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file descriptor (captured in a test)
        pass


def main(argv=None) -> int:
    """Entry point of the ``ebm`` console script; returns the exit status (0 ok, 1 failed run or full disk, 2 user
    error, 130 interrupted, 141 output pipe closed by the reader). The outputs a command declares are checked and
    locked (ebm_sim.outputs: exists, --overwrite/--resume, writable, one writer) before it runs."""
    parser = build_parser(preset_train_defaults(argv))
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed by argparse
        return e.code if isinstance(e.code, int) else 2
    try:
        with claim_outputs(args, log=_note):
            return args.func(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return SIGPIPE_STATUS
    except (RunError, FloatingPointError, DiskFullError) as e:  # a run that cannot finish (diverging, disk full)
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except MemoryError as e:  # what no check could foresee (the sizes a command can check are refused before)
        print(f"{PROG}: error: out of memory{': ' + str(e) if str(e) else ''}; use smaller batches, layers or "
              f"--limit", file=sys.stderr)
        return 1
    except USER_ERRORS as e:  # ArtifactError, OutputError and MemoryLimitError are ValueErrors
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


def console_main() -> None:
    """The ``ebm`` console script: ``main``, then exit with its status. Ctrl-C from then on is ignored: the command
    has finished, and a KeyboardInterrupt in the interpreter's shutdown would only print a traceback."""
    import signal

    status = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(status)


if __name__ == "__main__":
    console_main()

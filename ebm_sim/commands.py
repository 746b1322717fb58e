"""The simulator's own ``ebm`` subcommands (parse, call ebm_sim, print): their parsers, handlers and the argument
helpers other packages' commands share (``parse_layers``, ``parse_rates``, ``parse_names``, ``ACTIVATION_HELP``).

    ebm init  --layers 64,128,10 | --arch "3x32x32, conv 64 k3 p1 maxpool, readout 10" | --preset NAME
              [--seed 0] [--gain 1.0] [--activation hard_sigmoid] [--dtype float32] -o NET.h5 [--overwrite]
    ebm train --dataset NAME (--layers ... | --arch SPEC | --preset NAME) [training settings] -o NET.h5 [--resume]
              [--nproc N]   (N data-parallel processes; or under torchrun, see docs/distributed_training.md)
    ebm relax NET.h5 --dataset digits [--split test] [--limit N] [--method M] [--tol T] [--max-steps N] [--dt DT]
              [--batch-size 256] [--dtype float32|float64] [--cluster local|auto|ADDRESS] -o FIXED_POINTS.h5
              (dense or layered networks; method, tol, steps and dt default to the network's stored deployment)
    ebm info  FILE [FILE ...]
    ebm demo  [--out-dir runs/demo-simulator]

``add_parsers(sub, train_defaults)`` registers them on the ``ebm`` subparsers; the ``ebm`` front end (ebm_cli)
gathers them with the other packages' commands and runs them. ``preset_train_defaults(argv)`` gives the training
settings of ``ebm train --preset NAME`` as the train parser's defaults. This module imports nothing outside ebm_sim:
distill, hardware and ebm_pipeline use ebm_sim, never the other way round.

``ebm relax`` is resumable: finished batches are saved atomically to ``<OUT>.partial.npz`` (every
``--checkpoint-every`` batches and on Ctrl-C); re-running the same command continues from there. The partial file is
deleted once the final artifact is written, and nothing is ever written under the final name before the end. With
``--cluster`` it relaxes shards of whole batches as Ray tasks and merges them into the same file (docs/scaling.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import integrators
from .batch_relax import format_relax_summary, run_relax
from .cluster import CLUSTER_HELP, cluster_argument
from .outputs import add_output_argument

PROG = "ebm"
ACTIVATION_HELP = "rho(u) = clip(u, 0, 1) (hard_sigmoid, default) or clip(u/2, 0, 1) (hard_sigmoid_half)"
RELAX_METHODS = integrators.DEPLOYABLE  # the integrator registry's methods, the slow reference aside


# ---------------------------------------------------------------------------------------------- argument types
def parse_layers(text: str) -> tuple:
    """Argument type of dense layer sizes, input first: '64,128,10' -> (64, 128, 10)."""
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 64,128,10, got {text!r}") from None
    if len(sizes) < 2 or any(n <= 0 for n in sizes):
        raise argparse.ArgumentTypeError(f"need at least two positive layer sizes (input,...,output), got {text!r}")
    return sizes


def parse_rates(text: str):
    """Argument type of one number or one per layer: '5e-4' -> 0.0005, '0.1,0.05' -> [0.1, 0.05]."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"learning rates must be numbers separated by commas, got {text!r}")
    return values[0] if len(values) == 1 else values


def parse_names(text: str) -> tuple:
    """Argument type of a comma-separated list of names: 'a, b' -> ('a', 'b')."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


# ---------------------------------------------------------------------------------------------- commands
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
                        resume=not args.no_resume, progress=not args.no_progress, cluster=args.cluster,
                        shard_size=args.shard_size)
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


def cmd_train(args) -> int:
    from . import datasets
    from .network import Network
    from .training import TrainConfig

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
    from .distributed import check_nprocs, env_secondary_rank, run
    check_nprocs(args.nproc, config.batch_size, config.device if config.backend == "torch" else None)  # before work
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
    if not env_secondary_rank():  # under torchrun rank 0 speaks for all
        print(f"training {_shape_text(network)} on {data.name} ({len(data.y_train)} train / {len(data.y_test)} "
              f"test samples) with EP: {config.nudging} nudging, beta {config.beta:g}, {config.cost}, "
              f"{config.method} (free {config.free_steps} / nudged {config.nudged_steps} steps, tol {config.tol:g}), "
              f"{config.optimizer} lr {config.lr}, {config.epochs} epochs"
              + (f", {args.nproc} processes" if args.nproc > 1 else "") + f"; checkpoints in {out}", flush=True)
    try:
        history = run(_train_rank, args.nproc,
                      (network, x_train, data.y_train, x_test, data.y_test, config, out, args.resume,
                       not args.no_progress, {"dataset": data.name, "init": {"seed": args.seed, "gain": args.gain}},
                       data.num_classes), config.device if config.backend == "torch" else None)
    except KeyboardInterrupt:
        if args.nproc > 1:  # the ranks were stopped: say what the file holds (rank 0 may not have had the time)
            print(f"interrupted: {out} holds the last finished epoch{'' if out.exists() else ' (none yet)'}; run "
                  f"the same command with --resume to continue", flush=True)
        raise
    if history and history.get("test_acc"):
        best = max(history["test_acc"])
        print(f"final test accuracy {100 * history['test_acc'][-1]:.2f}% (best {100 * best:.2f}%), "
              f"{sum(history['seconds']):.1f} s in total; wrote {out}")
    return 0


def _train_rank(world, network, x_train, y_train, x_test, y_test, config, out, resume, progress, extra, num_classes):
    """``ebm train``'s work in one process (world None) or one rank of several (``ebm_sim.distributed.run``):
    the history on rank 0, None elsewhere."""
    from dataclasses import replace

    from .distributed import rank_device
    from .training import fit

    if world is not None:
        config = replace(config, device=rank_device(world, config.device))
    network = fit(network, x_train, y_train, x_test, y_test, config, checkpoint_path=out, resume=resume,
                  progress=progress, log=lambda msg: print(msg, flush=True), extra_attrs=extra,
                  num_classes=num_classes, world=world)
    return network.history if world is None or world.is_main else None


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


# ---------------------------------------------------------------------------------------------- parsers
def _add_architecture_arguments(p, example: str):
    """--layers / --arch / --preset, one of them required; returns their mutually exclusive group (a command may add
    another way to give the architecture to it)."""
    from .model.presets import PRESETS

    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--layers", type=parse_layers, metavar="N0,...,NL", help=f"dense layer sizes, e.g. {example}")
    group.add_argument("--arch", metavar="SPEC|FILE.toml",
                       help="an architecture spec, e.g. '3x32x32, conv 64 k3 p1 maxpool, conv 128 k3 s2 p1, "
                            "readout 10' (grammar: docs/architecture.md), or a TOML file holding one")
    group.add_argument("--preset", choices=sorted(PRESETS),
                       help="a named recipe: its architecture, normalization and (ebm train) training settings; "
                            "flags given beside it override them")
    return group


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


def add_parsers(sub, train_defaults: dict | None = None) -> None:
    """Register ``ebm init``, ``relax``, ``train``, ``info`` and ``demo`` on the ``ebm`` subparsers ``sub``;
    ``train_defaults`` (``preset_train_defaults``) become the train parser's defaults."""
    from .datasets import DATASET_NAMES
    from .network import ACTIVATIONS
    from .training import AUGMENTATIONS, BACKENDS as TRAIN_BACKENDS, COSTS, NUDGINGS, OPTIMIZERS, SCHEDULES

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
    p.add_argument("--method", choices=RELAX_METHODS, default=None,
                   help="integrator (default: the network's deployment, stored by ebm train; fixed_point for an "
                        "untrained network)")
    p.add_argument("--tol", type=float, default=None,
                   help="residual tolerance (default: the deployment's; 1e-4 for an untrained network)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="step cap per sample (default: the deployment's; 1000 for an untrained network)")
    p.add_argument("--dt", type=float, default=None,
                   help="time step (default: the deployment's, or the method's: euler 0.5; rk45: initial step 0.1; "
                        "fixed_point and alternating use 1)")
    p.add_argument("--batch-size", type=int, default=256, help="samples per batch (default 256)")
    p.add_argument("--dtype", choices=("float32", "float64"), default=None,
                   help="compute in this precision (default: the network's)")
    p.add_argument("--checkpoint-every", type=int, default=10, metavar="N",
                   help="save finished batches to OUT.partial.npz every N batches (default 10; also on Ctrl-C)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing OUT.partial.npz and start over")
    p.add_argument("--cluster", type=cluster_argument, default=None, metavar="local|auto|ADDRESS",
                   help=CLUSTER_HELP + ". The samples are relaxed in shards, one Ray task each, kept in OUT.shards/ "
                        "(resumable) and merged into OUT: the same file as without --cluster")
    p.add_argument("--shard-size", type=int, default=None, metavar="N",
                   help="samples per shard with --cluster, a multiple of --batch-size (default: about two shards "
                        "per CPU of the cluster)")
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
    p.add_argument("--lr", type=parse_rates, default=5e-4,
                   help="learning rate, or one per weight matrix separated by commas (default 5e-4)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="L2 weight decay (default 0)")
    p.add_argument("--schedule", choices=SCHEDULES, default="constant", help="constant or cosine annealing")
    p.add_argument("--backend", choices=TRAIN_BACKENDS, default=None,
                   help="numba (the default of --layers) or torch (the default of --arch and --preset, faster at "
                        "training batches; --device cuda for a GPU)")
    p.add_argument("--device", default="cpu", help="torch device of the torch backend (default cpu)")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="data-parallel processes on this machine (torch.distributed, gloo; NCCL with --device "
                        "cuda), each taking a slice of every minibatch; the result equals one process up to float "
                        "rounding (default 1; under torchrun leave it out)")
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

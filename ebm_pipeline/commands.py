"""``ebm pipeline``: the whole study's subcommand (parse, call run_pipeline, print). ``add_parsers(sub)`` registers it
on the ``ebm`` subparsers; the ``ebm`` front end (ebm_cli) gathers it with the other packages' commands.
"""
from __future__ import annotations

from pathlib import Path

from ebm_sim.commands import parse_names


def cmd_pipeline(args) -> int:
    from . import PipelineConfig, run_pipeline

    network = {"arch": args.arch} if args.arch else {"preset": args.preset} if args.preset else None
    dataset = args.dataset
    if dataset is None and args.preset and not args.config:  # a preset names the dataset it was made for
        from ebm_sim.model.presets import get
        dataset = get(args.preset).dataset
    top = {"dataset": dataset, "data_dir": args.data_dir, "seed": args.seed, "limit_train": args.limit_train,
           "limit_test": args.limit_test, "quick": True if args.quick else None, "cluster": args.cluster}
    if args.config:
        config = PipelineConfig.from_file(args.config, network=network, **top)
    else:
        config = PipelineConfig(**{k: v for k, v in top.items() if v is not None},
                                sections={"network": network} if network else {})
    out = Path(args.out_dir or f"runs/pipeline-{config.dataset}{'-conv' if config.layered else ''}")
    print(f"ebm pipeline on {config.dataset} ({config.architecture_text()}): artifacts and report in {out}",
          flush=True)
    results = run_pipeline(config, out, progress=not args.no_progress, log=lambda msg: print(msg, flush=True),
                           force=args.force or ())
    print(results["budget_note"])
    for row in (results["robustness"] or {}).get("table", []):
        print(f"  {row['model']:<10} clean {100 * row['clean']:.1f}%  PGD-Linf "
              f"{100 * row['pgd_linf']:.1f}%  AutoAttack {100 * row['autoattack']:.1f}%  corruptions "
              f"{100 * row['corruption_mean']:.1f}%  audit {'passed' if row['audit_passed'] else 'FAILED'}")
    for name, stage in results["stages"].items():
        summary = stage["summary"]
        if stage.get("incomplete"):
            print(f"  [{name}] INCOMPLETE: {summary['incomplete']}")
            for model, reason in summary.get("not_evaluated", {}).items():
                print(f"    {model}: {reason}")
        elif summary.get("skipped"):
            print(f"  [{name}] skipped: {summary['skipped']}")
    print(f"report: {out / 'report.html'} ({results['total_seconds'] / 60:.1f} min)")
    return 0


def add_parsers(sub) -> None:
    """Register ``ebm pipeline`` on the ``ebm`` subparsers ``sub``."""
    from ebm_sim.datasets import DATASET_NAMES

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
    from ebm_sim.model.presets import PRESETS

    arch = p.add_mutually_exclusive_group()
    arch.add_argument("--arch", metavar="SPEC", default=None,
                      help="a convolutional (layered) EBM, e.g. '3x32x32, conv 16 k3 p1 avgpool, conv 32 k3 p1 "
                           "avgpool, readout 10' (grammar: docs/architecture.md): the convolutional study, trained "
                           "with the cifar10-cpu-lava recipe at the pipeline's budget (replaces the config file's "
                           "network)")
    arch.add_argument("--preset", choices=sorted(PRESETS), default=None,
                      help="a named convolutional recipe (ebm_sim.model.presets): its architecture, normalization "
                           "and training settings, cut to the pipeline's budget; its dataset unless --dataset")
    p.add_argument("--quick", action="store_true",
                   help="a smoke-test budget (2 epochs per model, 20 attacked images, the CIFAR sets subsampled "
                        "to 1,000 / 200 images): minutes, meaningless figures")
    p.add_argument("--data-dir", metavar="DIR", default=None, help="folder with the dataset files")
    p.add_argument("--seed", type=int, default=None, help="seed of every stage (default 0)")
    p.add_argument("--limit-train", type=int, default=None, metavar="N",
                   help="a seeded, class-stratified subsample of N training images (a quick look at a large dataset)")
    p.add_argument("--limit-test", type=int, default=None, metavar="N", help="the same for the test split")
    p.add_argument("--out-dir", metavar="DIR", default=None,
                   help="default runs/pipeline-<dataset> (runs/pipeline-<dataset>-conv for --arch / --preset)")
    p.add_argument("--force", type=parse_names, default=None, metavar="STAGE[,STAGE...]",
                   help="run these stages again even if their artifacts are up to date")
    from ebm_sim.cluster import CLUSTER_HELP, cluster_argument

    p.add_argument("--cluster", type=cluster_argument, default=None, metavar="local|auto|ADDRESS",
                   help=CLUSTER_HELP + " (the relax and robustness stages; or the config file's cluster key)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_pipeline)

"""Benchmark: robustness of an EP-trained EBM, its distilled student, and standard and PGD-trained baselines.

    python benchmarks/robustness.py [--quick] [--out benchmarks/results/robustness.json] [--threads 2]

Full run (Fashion-MNIST): the 784-512-512-10 EBM of benchmarks/train.py (benchmarks/results/networks/), a student
distilled from its fixed points (ebm distill defaults), and two baselines of the same architecture (ebm baseline:
standard, and PGD adversarial training at Linf 0.1, 10 steps of 0.025, 10 epochs); the four are trained once into
--models-dir (default benchmarks/results/networks/, committed, so that anyone can re-audit them) and reused (an
interrupted training resumes). Then distill.robustness.evaluate with Fashion-MNIST's budgets on 1,000 test images:
FGSM, PGD-Linf (eps sweep 0 to 0.3) and PGD-L2 (sweep 0 to 3) with 40 steps, AutoAttack standard in Linf (0.1) and
L2 (1.5), the minimum-norm attack FMN (Linf and L2, 100 steps); Square (5,000 queries) on 500; the audit's PGD (100
steps, 3 restarts) and the gradient check on 200; the 15 corruptions at 5 severities on the whole test set. The EBM
is attacked through BPTT over its deployed relaxation, implicit differentiation and transfer from the student; per
example the worst case counts. The evaluation is resumable (its parts are kept in --eval-dir): re-run the same
command after an interruption.
--quick: the digits EBM, small models and budgets (AutoAttack and Square reduced, labelled so), under two minutes;
it writes to benchmarks/results/quick/ (not tracked), never over the recorded full results.
Writes the report (table.md, sweeps.png, corruptions.png, results.json) to --eval-dir and the summary JSON to --out,
printed as the last line: per model clean, fgsm, pgd_linf, pgd_l2 (worst case of PGD-L2, AutoAttack-L2 and FMN),
autoattack (worst case of AutoAttack-Linf and FMN), autoattack_l2, square, corruption_mean, min_norm_linf_median,
min_norm_l2_median, the sweeps (worst case, PGD alone, FMN alone), audit_passed (failed checks, warnings), and the
cost in minutes.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]

from _common import output_path, write_results  # noqa: E402
from ebm_sim import storage  # noqa: E402
from ebm_sim.datasets import load_dataset  # noqa: E402
from ebm_sim.batch_relax import relax_to_file  # noqa: E402

NETWORKS = ROOT / "benchmarks" / "results" / "networks"
FULL = {"dataset": "fashion-mnist", "network": "fashion_deep_784-512-512-10.h5", "distill_epochs": 30,
        "baseline_epochs": {"standard": 30, "pgd-at": 10}}
QUICK = {"dataset": "digits", "network": "digits_64-256-10.h5", "distill_epochs": 15,
         "baseline_epochs": {"standard": 15, "pgd-at": 15}}
QUICK_BUDGET = dict(samples=60, square_samples=30, audit_samples=30, pgd_steps=5, audit_steps=10, audit_restarts=2,
                    square_queries=50, autoattack_iterations=5, min_norm_steps=20, sweep_linf=(0.0, 0.1, 0.3),
                    sweep_l2=(0.0, 0.5, 1.0), severities=(1, 3, 5), batch_size=60)
KEYS = ("clean", "fgsm", "pgd_linf", "pgd_l2", "autoattack", "autoattack_l2", "square", "corruption_mean",
        "min_norm_linf_median", "min_norm_l2_median")
RESULTS = ROOT / "benchmarks" / "results"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def finished(path: Path) -> bool:
    """A model file whose training ended (no checkpoint left in it)."""
    from distill.io import load_feedforward
    return path.exists() and load_feedforward(path).checkpoint is None


def train_student(network_path: Path, network, x_train, y_train, dataset: str, path: Path, epochs: int,
                  progress: bool) -> None:
    """Relax the training set (x_train in the network's input shape: flat rows, or images for a layered network) at
    the deployed settings, distill (resuming an interrupted run)."""
    from distill.config import DistillConfig
    from distill.io import stored_content_hash
    from ebm_sim.deployment import Deployment
    from distill.train import distill

    d = Deployment.of_network_file(network_path)
    with tempfile.TemporaryDirectory() as tmp:
        fp_path = Path(tmp) / "train_fixed_points.h5"
        relax_to_file(network, x_train, y_train, fp_path, batch_size=2048, progress=progress, log=log,
                      **d.relax_options())
        distill(network, storage.load_fixed_points(fp_path, network), DistillConfig(epochs=epochs),
                checkpoint_path=path, resume=path.exists(), fixed_points_hash=stored_content_hash(fp_path),
                dataset=dataset, progress=progress, log=log)


def prepare_models(settings: dict, models_dir: Path, progress: bool) -> dict:
    """{name: path} of the four models, training (or resuming) those not finished in models_dir."""
    from distill.baselines import train_baseline
    from distill.config import BaselineConfig

    data = load_dataset(settings["dataset"])
    network_path = NETWORKS / settings["network"]
    if not network_path.exists():
        raise SystemExit(f"{network_path} is missing: run `python benchmarks/train.py` first (it trains it)")
    network = storage.load_network(network_path)
    models_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{settings['dataset']}-{network.content_hash()[:12]}"
    paths = {"EBM": network_path, "distilled": models_dir / f"student-{tag}.h5",
             "standard": models_dir / f"standard-{settings['dataset']}.h5",
             "pgd-at": models_dir / f"pgd-at-{settings['dataset']}.h5"}
    timings = {}
    if not finished(paths["distilled"]):
        start = time.perf_counter()
        train_student(network_path, network, data.x_train, data.y_train, data.name, paths["distilled"],
                      settings["distill_epochs"], progress)
        timings["distilled"] = time.perf_counter() - start
    for kind in ("standard", "pgd-at"):
        if finished(paths[kind]):
            continue
        start = time.perf_counter()
        train_baseline(network.layer_sizes, data.x_train, data.y_train,
                       BaselineConfig(kind=kind, epochs=settings["baseline_epochs"][kind]),
                       checkpoint_path=paths[kind], resume=paths[kind].exists(), progress=progress, log=log,
                       dataset=data.name)
        timings[kind] = time.perf_counter() - start
    return paths, timings


def summary(results: dict) -> dict:
    """Per model: the table's accuracies, audit_passed, the failed checks, minutes; plus the budgets."""
    models = {}
    for row in results["table"]:
        model = results["models"][row["model"]]
        models[row["model"]] = {**{k: row[k] for k in KEYS}, "audit_passed": row["audit_passed"],
                                "audit_failed": row["audit_failed"], "audit_warnings": model["audit"]["warnings"],
                                "kind": row["kind"], "minutes": model["seconds"] / 60,
                                "per_source": {col: {s: v["accuracy"] for s, v in entry["per_source"].items()}
                                               for col, entry in model["attacks"].items()},
                                "per_attack": {col: entry["per_attack"] for col, entry in model["attacks"].items()},
                                **{f"sweep_{norm}": [[p["eps"], p["accuracy"], p["pgd"], p["fmn"]]
                                                     for p in model["sweeps"][norm]] for norm in ("linf", "l2")},
                                "sweep_columns": ["eps", "worst case", "PGD", "FMN"]}
        if "relaxation" in model:
            models[row["model"]]["relaxation"] = model["relaxation"]
    return models


def cost_by_attack(eval_dir: Path) -> dict:
    """Minutes of compute per attack (name and norm, e.g. "fmn-L2", "autoattack-Linf"), gradient check and
    corruption, summed over the models' parts in eval_dir/parts (each part records its own seconds)."""
    import json

    minutes = {}
    for path in (eval_dir / "parts").glob("*.json"):
        stored = json.loads(path.read_text())
        key, record = stored["key"], stored["record"]
        attack = key.get("attack")
        name = f"{attack['name']}-{attack['norm']}" if attack else key["kind"]
        minutes[name] = minutes.get(name, 0.0) + record.get("seconds", 0.0) / 60
    return dict(sorted(minutes.items()))


def cost_minutes(training_seconds: dict, results: dict, eval_dir: Path, start: float, evaluation_start: float) -> dict:
    """The run's cost in minutes: training (in all and per model), the evaluation's wall time in this run and its
    compute over every part (also from earlier runs), the run's total, and per attack (``cost_by_attack``); start and
    evaluation_start are ``time.perf_counter()`` values."""
    return {"training": sum(training_seconds.values()) / 60,
            "evaluation_this_run": (time.perf_counter() - evaluation_start) / 60,
            "evaluation_compute": sum(m["seconds"] for m in results["models"].values()) / 60,
            "total_this_run": (time.perf_counter() - start) / 60,
            "training_per_model": {k: v / 60 for k, v in training_seconds.items()},
            "per_attack": cost_by_attack(eval_dir)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits, small budgets (under two minutes)")
    parser.add_argument("--out", default=None, help="summary JSON (default benchmarks/results/robustness.json; "
                                                    "quick: benchmarks/results/quick/robustness.json)")
    parser.add_argument("--models-dir", default=None, help="where the student and baselines are trained and kept "
                                                           "(default benchmarks/results/networks, quick: a temp dir)")
    parser.add_argument("--eval-dir", default=None, help="the evaluation's report and resumable parts (default "
                                                         "benchmarks/results/robustness, quick: a temp dir)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    import torch

    from distill.robustness import RobustnessConfig, evaluate, load_model_under_test

    torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else FULL
    scratch = tempfile.TemporaryDirectory() if args.quick else None
    base = Path(scratch.name) if scratch else RESULTS
    models_dir = Path(args.models_dir) if args.models_dir else (base / "models" if scratch else NETWORKS)
    eval_dir = Path(args.eval_dir) if args.eval_dir else base / "robustness"
    out_path = output_path("robustness", args.quick, args.out)
    start = time.perf_counter()
    paths, training_seconds = prepare_models(settings, models_dir, not args.no_progress)
    data = load_dataset(settings["dataset"])
    image_shape = data.channels_first_shape
    models = [load_model_under_test(paths["EBM"], "EBM", image_shape, student=paths["distilled"])]
    models += [load_model_under_test(paths[name], name, image_shape) for name in ("distilled", "standard", "pgd-at")]
    config = RobustnessConfig.for_dataset(data.name, **(QUICK_BUDGET if args.quick else {}))
    evaluation_start = time.perf_counter()
    results = evaluate(models, data.x_test, data.y_test, image_shape, config, eval_dir, dataset=data.name,
                       progress=not args.no_progress, log=log, overwrite=True)  # a benchmark re-measures
    out = {"quick": args.quick, "dataset": data.name, "network_file": str(paths["EBM"].relative_to(ROOT)),
           "models": summary(results), "config": results["config"], "examples": results["examples"],
           "report_dir": str(eval_dir), "torch_threads": args.threads,
           "cost_minutes": cost_minutes(training_seconds, results, eval_dir, start, evaluation_start)}
    write_results(out, out_path)
    if scratch:
        scratch.cleanup()


if __name__ == "__main__":
    main()

"""Assemble the parts of an evaluation into results, and write them as a Markdown table, JSON and PNG plots.

results.json (format "ebm-robustness-results", version 1):
  {"format", "version", "dataset", "config": RobustnessConfig.as_dict(), "examples": {subset: count},
   "models": {name: {
      "info": {kind, file, content_hash, gradient_sources, deployment?, student?},
      "clean": {accuracy, ci95, n} on the whole test set; "clean_on_samples": the same on the attacked examples,
      "attacks": {fgsm | pgd_linf | pgd_l2 | autoattack | square:
                  {accuracy, ci95, n (worst case over the sources), budget (the attack's full budget),
                   per_source: {source: {accuracy, ci95, n}}}},
      "sweeps": {"linf" | "l2": [{eps, accuracy, ci95, n, per_source}]},
      "comparisons": the paired numbers the audit compares (same examples),
      "gradients": {source: {n, nan_fraction, zero_fraction, matches_deployed, median_l1}},
      "relaxation" (EBMs): {"clean" | "adversarial": {converged_fraction, median_residual, max_residual, mean_steps}},
      "corruptions": {accuracy (mean over corruptions and severities), n, per_corruption:
                      {name: {mean, severities: {s: accuracy}}}},
      "audit": {passed, checks: [{name, passed, detail}], failed, verdict},
      "seconds": compute time of this model's parts}},
   "table": the rows of table.md}
Accuracies are shares in [0, 1]; ci95 is the 95 % Wilson interval.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ebm_sim.storage import save_figure

from .audit import ATTACK_COLUMNS, run_audit
from .stats import accuracy
from .store import flags_of, unbits

FORMAT = "ebm-robustness-results"
FORMAT_VERSION = 1

GROUP_OF_COLUMN = {"fgsm": "fgsm", "pgd_linf": "pgd-linf", "pgd_l2": "pgd-l2", "autoattack": "autoattack",
                   "square": "square"}


def _tasks_of(parts: dict, model: str, group: str, eps: float | None = None) -> dict:
    """{source: [(chunk, record), ...]} of a model's tasks in ``group`` (at ``eps``)."""
    found = {}
    for (name, task), items in parts.items():
        if name == model and task.group == group and (eps is None or math.isclose(task.spec.eps, eps)):
            found[task.source] = (task, items)
    return found


def _robust_result(parts, model, group, eps, indices) -> dict | None:
    """Worst case over the sources (and each source's own accuracy) of a group at eps on ``indices``."""
    tasks = _tasks_of(parts, model, group, eps)
    if not tasks:
        return None
    per_source, worst, budget = {}, np.ones(len(indices), dtype=bool), None
    for source, (task, items) in sorted(tasks.items()):
        flags = flags_of(items, "robust", indices)
        per_source[source] = accuracy(flags)
        worst &= flags
        budget = task.spec.as_dict()
    return {**accuracy(worst), "budget": budget, "per_source": per_source, "_flags": worst}


def _relaxation_summary(records: list) -> dict | None:
    """Pooled over relaxation records ({"converged": bits, "residual": [...], "steps": [...]}, one per part)."""
    converged = np.concatenate([unbits(r["converged"]) for r in records])
    residual = np.concatenate([r["residual"] for r in records])
    steps = np.concatenate([r["steps"] for r in records])
    if not len(converged):
        return None
    return {"converged_fraction": float(converged.mean()), "median_residual": float(np.median(residual)),
            "max_residual": float(np.max(residual)), "mean_steps": float(np.mean(steps)), "n": int(len(converged))}


def assemble_model(model, parts: dict, clean: dict, draw: dict, y_test: np.ndarray, config) -> dict:
    """The result of one model (see the module docstring), audit included."""
    name = model.name
    predictions = np.asarray(clean["predictions"])
    correct = predictions == y_test
    samples = draw["samples"]
    result = {"info": model.describe(), "clean": accuracy(correct), "clean_on_samples": accuracy(correct[samples])}
    attacks = {}
    for column in ATTACK_COLUMNS:
        eps = config.eps_l2 if column == "pgd_l2" else config.eps_linf
        subset = draw["square"] if column == "square" else samples
        found = _robust_result(parts, name, GROUP_OF_COLUMN[column], eps, subset)
        if found is not None:
            attacks[column] = found
    sweeps = {}
    for norm, group, values in (("linf", "pgd-linf", config.sweep_linf), ("l2", "pgd-l2", config.sweep_l2)):
        curve = []
        for eps in values:
            point = (_robust_result(parts, name, group, eps, samples) if eps > 0 else
                     {**accuracy(correct[samples]), "per_source": {}})
            if point is not None:
                point.pop("_flags", None)
                point.pop("budget", None)
                curve.append({"eps": float(eps), **point})
        sweeps[norm] = curve
    result["attacks"], result["sweeps"] = attacks, sweeps

    comparisons = {}
    if "fgsm" in attacks and "pgd_linf" in attacks:
        comparisons["fgsm_vs_pgd"] = {"eps": config.eps_linf, "n": len(samples),
                                      "fgsm": float(attacks["fgsm"]["_flags"].mean()),
                                      "pgd": float(attacks["pgd_linf"]["_flags"].mean())}
    if "square" in attacks and "pgd_linf" in attacks:
        square_set = draw["square"]
        white = np.ones(len(square_set), dtype=bool)
        for group in ("pgd-linf", "autoattack"):
            for source, (task, items) in _tasks_of(parts, name, group, config.eps_linf).items():
                if set(map(int, square_set)) <= {int(i) for chunk, _ in items for i in chunk}:
                    white &= flags_of(items, "robust", square_set)
        comparisons["white_vs_black_box"] = {"n": len(square_set), "white_box": float(white.mean()),
                                             "square": float(attacks["square"]["_flags"].mean())}
    audit_set = draw["audit"]
    strong = _robust_result(parts, name, "pgd-audit", config.eps_linf, audit_set)
    base = _robust_result(parts, name, "pgd-linf", config.eps_linf, audit_set)
    if strong is not None and base is not None:
        comparisons["more_steps_and_restarts"] = {
            "n": len(audit_set), "base": base["accuracy"], "strong": strong["accuracy"],
            "base_budget": _budget_text(base["budget"]), "strong_budget": _budget_text(strong["budget"])}
    result["comparisons"] = comparisons
    for column in attacks.values():
        column.pop("_flags")

    gradients = {}
    for source, (task, items) in _tasks_of(parts, name, "gradients").items():
        nan, zero = flags_of(items, "nan", audit_set), flags_of(items, "zero", audit_set)
        matches = flags_of(items, "matches_deployed", audit_set)
        l1 = np.concatenate([r["l1"] for _, r in items])
        gradients[source] = {"n": len(audit_set), "nan_fraction": float(nan.mean()), "zero_fraction": float(zero.mean()),
                             "matches_deployed": float(matches.mean()), "median_l1": float(np.median(l1))}
        adjoint = [r["adjoint_converged"] for _, r in items if "adjoint_converged" in r]
        if adjoint:
            gradients[source]["adjoint_converged"] = float(np.mean(adjoint))
    result["gradients"] = gradients

    if "relaxation" in clean:
        adversarial = [r["adversarial_relaxation"]
                       for source, (task, items) in _tasks_of(parts, name, "pgd-linf", config.eps_linf).items()
                       for _, r in items if "adversarial_relaxation" in r]
        result["relaxation"] = {"clean": _relaxation_summary([clean["relaxation"]]),
                                "adversarial": _relaxation_summary(adversarial) if adversarial else None}

    per_corruption = {}
    n_corrupted = 0
    for (model_name, task), items in parts.items():
        if model_name != name or task.kind != "corruption":
            continue
        flags = np.concatenate([unbits(r["correct"]) for _, r in items])
        n_corrupted = len(flags)
        per_corruption.setdefault(task.corruption, {})[task.severity] = float(flags.mean())
    if per_corruption:
        table = {c: {"mean": float(np.mean(list(sev.values()))), "severities": dict(sorted(sev.items()))}
                 for c, sev in per_corruption.items()}
        all_values = [v for sev in per_corruption.values() for v in sev.values()]
        result["corruptions"] = {"accuracy": float(np.mean(all_values)), "n": n_corrupted, "per_corruption": table}
    result["seconds"] = float(clean.get("seconds", 0.0) + sum(
        r.get("seconds", 0.0) for (m, _), items in parts.items() if m == name for _, r in items))
    result["audit"] = run_audit(result, config)
    return result


def _budget_text(budget: dict) -> str:
    text = f"{budget.get('steps', '?')} steps"
    if budget.get("restarts", 1) > 1:
        text += f", {budget['restarts']} restarts"
    return text


def assemble(models, parts: dict, clean: dict, draw: dict, y_test: np.ndarray, config, dataset=None) -> dict:
    results = {"format": FORMAT, "version": FORMAT_VERSION, "dataset": dataset, "config": config.as_dict(),
               "examples": {subset: int(len(indices)) for subset, indices in draw.items()},
               "models": {m.name: assemble_model(m, parts, clean[m.name], draw, y_test, config) for m in models}}
    results["table"] = table_rows(results)
    return results


# ---------------------------------------------------------------------------------------------- table
TABLE_COLUMNS = ("clean", "fgsm", "pgd_linf", "pgd_l2", "autoattack", "square", "corruption_mean")


def table_rows(results: dict) -> list:
    """One row per model: accuracies of the table's columns (None where not run), audit_passed, verdict."""
    rows = []
    for name, r in results["models"].items():
        row = {"model": name, "kind": r["info"]["kind"], "clean": r["clean"]["accuracy"]}
        for column in ATTACK_COLUMNS:
            row[column] = r["attacks"][column]["accuracy"] if column in r["attacks"] else None
        row["corruption_mean"] = r["corruptions"]["accuracy"] if "corruptions" in r else None
        row["audit_passed"] = r["audit"]["passed"]
        row["audit_failed"] = r["audit"]["failed"]
        rows.append(row)
    return rows


def _cell(entry: dict | None) -> str:
    if entry is None:
        return "—"
    low, high = entry["ci95"]
    return f"{100 * entry['accuracy']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def markdown_table(results: dict) -> str:
    """The Markdown report: the main table (accuracy % [95 % CI]), the budgets, the audit per model, corruptions."""
    c = results["config"]
    lines = [f"# Robustness on {results.get('dataset') or 'the test set'}", "",
             "Accuracy in % with its 95 % Wilson interval. Adversarial columns: the worst case per example over the "
             "model's gradient sources (EBM: BPTT through the deployed relaxation, implicit differentiation, "
             "transfer from its distilled student), judged by the deployed prediction.", "",
             "| model | clean | FGSM | PGD-Linf | PGD-L2 | AutoAttack | Square | corruption mean | audit |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["models"].items():
        attacks = r["attacks"]
        corruption = r.get("corruptions")
        audit = "passed" if r["audit"]["passed"] else "**UNRELIABLE**: failed " + ", ".join(r["audit"]["failed"])
        unreliable = "" if r["audit"]["passed"] else " (unreliable)"
        cells = [_cell(r["clean"])] + [(_cell(attacks.get(col)) + (unreliable if col in attacks else ""))
                                       for col in ATTACK_COLUMNS]
        cells.append("—" if corruption is None else f"{100 * corruption['accuracy']:.1f}")
        lines.append(f"| {name} ({r['info']['kind']}) | " + " | ".join(cells) + f" | {audit} |")
    lines += ["", "## Budgets", "",
              f"- examples: {results['examples']['samples']} attacked (FGSM, PGD, AutoAttack), "
              f"{results['examples']['square']} for Square, {results['examples']['audit']} for the audit's stronger "
              f"PGD and the gradient check, {results['examples']['corruption']} corrupted; seed {c['seed']}",
              "- FGSM, PGD-Linf, AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square"
              + ("" if c["autoattack_iterations"] >= 100 and c["square_queries"] >= 5000 else
                 f"; REDUCED budget: {c['autoattack_iterations']} iterations, Square {c['square_queries']} queries")
              + f"), Square: Linf eps {c['eps_linf']:g}; PGD-L2: eps {c['eps_l2']:g}; pixel units, images in [0, 1]",
              f"- PGD: {c['pgd_steps']} steps of {'2.5 eps / steps' if c['pgd_step_size'] is None else c['pgd_step_size']}"
              f", {c['pgd_restarts']} random start(s); audit PGD: {c['audit_steps']} steps, {c['audit_restarts']} "
              f"restarts; Square: {c['square_queries']} queries",
              f"- eps sweeps (PGD): Linf {', '.join(f'{e:g}' for e in c['sweep_linf'])}; "
              f"L2 {', '.join(f'{e:g}' for e in c['sweep_l2'])}", ""]
    for name, r in results["models"].items():
        lines += [f"## {name}: audit {'passed' if r['audit']['passed'] else 'FAILED'}", ""]
        lines += [f"- [{'x' if check['passed'] else ' '}] {check['name']}: {check['detail']}"
                  for check in r["audit"]["checks"]]
        per_source = {col: r["attacks"][col]["per_source"] for col in ATTACK_COLUMNS if col in r["attacks"]}
        if any(len(v) > 1 for v in per_source.values()):
            lines += ["", "Per gradient source: " + "; ".join(
                f"{col}: " + ", ".join(f"{s} {100 * v['accuracy']:.1f}" for s, v in sorted(sources.items()))
                for col, sources in per_source.items())]
        lines.append(f"\nCompute: {r['seconds'] / 60:.1f} min.\n")
    corrupted = [(name, r["corruptions"]) for name, r in results["models"].items() if "corruptions" in r]
    if corrupted:
        names = sorted(corrupted[0][1]["per_corruption"])
        lines += ["## Corruptions (accuracy %, mean over severities)", "",
                  "| corruption | " + " | ".join(n for n, _ in corrupted) + " |",
                  "|---|" + "---|" * len(corrupted)]
        for corruption in names:
            lines.append(f"| {corruption} | " + " | ".join(
                f"{100 * cr['per_corruption'][corruption]['mean']:.1f}" for _, cr in corrupted) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- plots
def plot_sweeps(results: dict, path: Path) -> Path:
    """Accuracy against eps (Linf and L2), one line per model with 95 % intervals, as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend (a notebook's) stays as it is

    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    for ax, norm in zip(axes, ("linf", "l2")):
        for name, r in results["models"].items():
            curve = r["sweeps"][norm]
            if not curve:
                continue
            eps = [p["eps"] for p in curve]
            acc = np.array([100 * p["accuracy"] for p in curve])
            low = np.clip(acc - np.array([100 * p["ci95"][0] for p in curve]), 0, None)  # rounding: never < 0
            high = np.clip(np.array([100 * p["ci95"][1] for p in curve]) - acc, 0, None)
            label = name + ("" if r["audit"]["passed"] else " (audit failed)")
            ax.errorbar(eps, acc, yerr=[low, high], marker="o", capsize=3, label=label)
        ax.set_xlabel(f"eps ({'L-inf' if norm == 'linf' else 'L2'}, pixels in [0, 1])")
        ax.set_ylabel("accuracy under PGD (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.set_title(f"PGD-{'Linf' if norm == 'linf' else 'L2'}, worst case over gradient sources")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110, bbox_inches="tight")
    return path


def plot_corruptions(results: dict, path: Path) -> Path | None:
    """Accuracy per corruption and severity, one heatmap per model, as a PNG (None without corruption results)."""
    from matplotlib.figure import Figure

    models = [(name, r["corruptions"]) for name, r in results["models"].items() if "corruptions" in r]
    if not models:
        return None
    corruptions = list(models[0][1]["per_corruption"])
    severities = sorted({int(s) for _, c in models for v in c["per_corruption"].values() for s in v["severities"]})
    fig = Figure(figsize=(3.2 * len(models) + 1, 0.32 * len(corruptions) + 1.8))
    axes = fig.subplots(1, len(models), squeeze=False)
    for ax, (name, c) in zip(axes[0], models):
        grid = np.array([[100 * c["per_corruption"][k]["severities"].get(s, c["per_corruption"][k]["severities"].get(
            str(s), np.nan)) for s in severities] for k in corruptions])
        image = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(severities)), [str(s) for s in severities])
        ax.set_yticks(range(len(corruptions)), corruptions if ax is axes[0][0] else [""] * len(corruptions))
        ax.set_xlabel("severity")
        ax.set_title(f"{name}\nmean {100 * c['accuracy']:.1f} %", fontsize=9)
        for (i, j), value in np.ndenumerate(grid):
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=6,
                    color="white" if value < 60 else "black")
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy (%)", shrink=0.8)
    save_figure(fig, path, dpi=110, bbox_inches="tight")
    return path


REPORT_FILES = {"json": "results.json", "table": "table.md", "sweeps": "sweeps.png", "corruptions": "corruptions.png"}


def report_files(out_dir) -> dict:
    """{kind: path} of the report files present in ``out_dir``."""
    return {kind: Path(out_dir) / name for kind, name in REPORT_FILES.items() if (Path(out_dir) / name).exists()}


def write_report(results: dict, out_dir) -> dict:
    """results.json, table.md, sweeps.png and corruptions.png (when corruptions ran) in ``out_dir``; returns their
    paths."""
    from ebm_sim.storage import write_json, write_text
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: out_dir / REPORT_FILES[kind] for kind in ("json", "table", "sweeps")}
    (out_dir / REPORT_FILES["corruptions"]).unlink(missing_ok=True)  # a stale one from an earlier configuration
    write_json(paths["json"], results)
    write_text(paths["table"], markdown_table(results))
    plot_sweeps(results, paths["sweeps"])
    corruption_plot = plot_corruptions(results, out_dir / REPORT_FILES["corruptions"])
    if corruption_plot is not None:
        paths["corruptions"] = corruption_plot
    return paths

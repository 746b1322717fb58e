"""Assemble the parts of an evaluation into results, and write them as a Markdown table, JSON and PNG plots.

results.json (format "ebm-robustness-results", version 1):
  {"format", "version", "dataset", "config": RobustnessConfig.as_dict(), "examples": {subset: count},
   "models": {name: {
      "info": {kind, file, content_hash, gradient_sources, deployment?, student?},
      "clean": {accuracy, ci95, n} on the whole test set; "clean_on_samples": the same on the attacked examples,
      "attacks": {fgsm | pgd_linf | pgd_l2 | autoattack | autoattack_l2 | square (audit.COLUMNS):
                  {accuracy, ci95, n (worst case over the column's attacks and the sources), budget (the first
                   attack's full budget), budgets {attack group: budget}, per_source: {source: {accuracy, ci95, n}}
                   (AutoAttack: its gradient-based attacks per gradient source, and "black-box": its Square, run once
                   on the deployed model; its budget holds that Square's under "square"),
                   per_attack: {attack group: accuracy} on the per_attack_n examples every attack of the column
                   ran on, reference (autoattack): {"pgd-linf": PGD alone on those examples}}} (a column of attacks
                   run on different subsets, e.g. L2 with AutoAttack on fewer examples than PGD: the worst case per
                   example over the attacks that ran on it),
      "sweeps": {"linf" | "l2": [{eps, accuracy, ci95, n (worst case per example over every attack of the norm at
                                  or below eps: PGD, FMN, AutoAttack), pgd (PGD at eps alone), fmn (FMN alone),
                                  per_source (PGD)}]},
      "min_norm": {"linf" | "l2": {median, n, broken}}: per example an upper bound on the smallest adversarial
                  perturbation (the least of FMN's norm over the sources, the smallest sweep eps where PGD succeeded,
                  the table eps where AutoAttack did; 0 if misclassified clean); median over the attacked examples
                  (None above every norm tried), broken: the share with a finite bound,
      "comparisons": the paired numbers the audit compares (same examples),
      "gradients": {source: {n, nan_fraction, zero_fraction, matches_deployed, median_l1}},
      "relaxation" (EBMs): {"clean" | "adversarial": {converged_fraction, median_residual, max_residual, mean_steps}},
      "corruptions": {accuracy (mean over corruptions and severities), n, per_corruption:
                      {name: {mean, severities: {s: accuracy}}}},
      "side_sources" (an EBM with a side source, e.g. "bptt-truncated" with ``as_published``): {source: {label,
                  attack_steps, deployed_steps, paired_with (the source it is compared with, "bptt"), paired_label,
                  attacks: {column: {accuracy, ci95, n, budget}} of the side source alone, paired: {column: the same
                  of the paired source alone}, sweeps: {"linf" | "l2": [{eps, accuracy, paired}]} (PGD alone)}},
      "audit": {passed, checks: [{name, passed, detail}], failed, verdict},
      "seconds": compute time of this model's parts}},
   "table": the rows of table.md}
Accuracies are shares in [0, 1]; ci95 is the 95 % Wilson interval.

Side sources (``config.SIDE_SOURCES``) are kept out of every worst case above ("attacks", "sweeps", "min_norm",
"comparisons"): the headline is the protocol's (BPTT through every step, implicit differentiation, transfer), the
same whether or not the side source ran, and the side source is reported in its own rows ("side_sources", and in
table.md "<model>: full BPTT alone" and "<model>: as published (first K unrolled steps)"). The audit fails a model
whose side source is stronger than the worst case (audit.check_side_sources): the headline would then miss
adversarial examples that the truncated gradient finds.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ebm_sim.storage import save_figure

from .audit import ATTACK_COLUMNS, COLUMN_LABELS, COLUMNS, run_audit
from .config import BLACK_BOX_SOURCE, SIDE_SOURCES
from .stats import accuracy
from .store import flags_of, unbits, values_of

FORMAT = "ebm-robustness-results"
FORMAT_VERSION = 1
NORM_GROUPS = {"linf": ("pgd-linf", "min-norm-linf", "autoattack"), "l2": ("pgd-l2", "min-norm-l2", "autoattack-l2")}


def _tasks_of(parts: dict, model: str, group: str, eps: float | None = None, sources=None) -> dict:
    """{source: (task, [(chunk, record), ...])} of a model's tasks in ``group`` (at ``eps``; a minimum-norm attack
    has no eps and serves every one) from ``sources`` (None: those of the worst case, every source but the side
    sources)."""
    found = {}
    for (name, task), items in parts.items():
        if sources is None and task.source in SIDE_SOURCES or sources is not None and task.source not in sources:
            continue
        if name == model and task.group == group and (eps is None or task.spec.minimum_norm
                                                       or math.isclose(task.spec.eps, eps)):
            found[task.source] = (task, items)
    return found


def _norms(items, indices) -> np.ndarray:
    """A minimum-norm task's norms for ``indices`` (inf where it found no adversarial point)."""
    return np.array([math.inf if v is None else float(v) for v in values_of(items, "norms", indices)])


def covered(items, indices) -> np.ndarray:
    """Which of ``indices`` a task's parts [(chunk indices, record)] ran on (an attack of a smaller subset, e.g.
    AutoAttack on ``autoattack_samples``, covers the first ones of the attacked examples only)."""
    done = {int(i) for chunk, _ in items for i in chunk}
    return np.array([int(i) in done for i in indices], dtype=bool)


def _flags(task, items, indices, eps: float, ran: np.ndarray | None = None) -> np.ndarray:
    """Robust flags at ``eps`` on ``indices``: a minimum-norm attack's smallest norm exceeds eps, else the part's
    flags; True where the task did not run (``ran``: ``covered``, computed when not given; the caller counts only
    examples some attack ran on)."""
    ran = covered(items, indices) if ran is None else ran
    flags = np.ones(len(indices), dtype=bool)
    chosen = np.asarray(indices)[ran]
    flags[ran] = _norms(items, chosen) > eps if task.spec.minimum_norm else flags_of(items, "robust", chosen)
    return flags


def _robust_result(parts, model, groups, eps, indices, sources=None, reference_groups=()) -> dict | None:
    """Worst case per example over the attack ``groups`` and the sources (``_tasks_of``) at ``eps`` on those of
    ``indices`` that at least one of the groups ran on (an attack of a smaller subset counts where it ran), with each
    source's (worst over the groups) accuracy and each group's (worst over the sources) accuracy on the examples
    every group ran on (``per_attack``, comparable with one another; ``reference``: the same for
    ``reference_groups``, outside the worst case)."""
    indices = np.asarray(indices)
    worst, per_source, budgets, flags_of_group = np.ones(len(indices), dtype=bool), {}, {}, {}
    ran_any, ran_all = np.zeros(len(indices), dtype=bool), np.ones(len(indices), dtype=bool)
    for group in tuple(groups) + tuple(reference_groups):
        tasks = _tasks_of(parts, model, group, eps, sources)
        if not tasks:
            continue
        group_worst, ran = np.ones(len(indices), dtype=bool), np.zeros(len(indices), dtype=bool)
        for source, (task, items) in sorted(tasks.items()):
            ran_here = covered(items, indices)
            flags = _flags(task, items, indices, eps, ran_here)
            ran |= ran_here
            group_worst &= flags
            if group in groups:
                per_source[source] = per_source.get(source, True) & flags
        if group in groups:
            budgets[group] = _group_budget(tasks)
        flags_of_group[group] = group_worst
        if group in groups:
            worst &= group_worst
            ran_any |= ran
        ran_all &= ran
    if not budgets:
        return None

    def share(flags, where):
        return float(flags[where].mean()) if where.any() else math.nan

    per_attack = {g: share(f, ran_all) for g, f in flags_of_group.items() if g in groups}
    reference = {g: share(f, ran_all) for g, f in flags_of_group.items() if g not in groups}
    return {**accuracy(worst[ran_any]), "budget": next(iter(budgets.values())), "budgets": budgets,
            "per_source": {s: accuracy(f[ran_any]) for s, f in sorted(per_source.items())}, "per_attack": per_attack,
            **({"reference": reference} if reference_groups else {}),
            "per_attack_n": int(ran_all.sum()), "_flags": worst[ran_any], "_indices": indices[ran_any]}


def _group_budget(tasks: dict) -> dict:
    """The full budget of one attack group ({source: (task, items)}): its white-box attack's, with the Square it
    runs once on the deployed model beside it (AutoAttack: "square": that Square's budget)."""
    white = [task.spec for source, (task, _) in sorted(tasks.items()) if source != BLACK_BOX_SOURCE]
    black = [task.spec for source, (task, _) in tasks.items() if source == BLACK_BOX_SOURCE]
    if not white:
        return black[0].as_dict()
    return {**white[0].as_dict(), **({"square": black[0].as_dict()} if black else {})}


def minimal_norm_bounds(parts, model, norm: str, indices, correct, config) -> np.ndarray | None:
    """Per example of ``indices``, an upper bound on its smallest adversarial perturbation in ``norm``: the least of
    FMN's norm (over the sources), the smallest sweep eps at which PGD succeeded and the table eps if AutoAttack
    did; 0 where misclassified clean; inf where nothing succeeded. None without any attack of the norm."""
    pgd_group, fmn_group, aa_group = NORM_GROUPS[norm]
    bound = np.where(correct, math.inf, 0.0)
    seen = False
    for source, (task, items) in _tasks_of(parts, model, fmn_group).items():
        bound, seen = np.minimum(bound, _norms(items, indices)), True
    sweep = config.sweep_linf if norm == "linf" else config.sweep_l2
    table_eps = config.eps_linf if norm == "linf" else config.eps_l2
    for group, values in ((pgd_group, sweep), (aa_group, (table_eps,))):
        for eps in (e for e in values if e > 0):
            for source, (task, items) in _tasks_of(parts, model, group, eps).items():
                robust = _flags(task, items, indices, eps)  # True where the attack did not run
                bound, seen = np.where(robust, bound, np.minimum(bound, eps)), True
    return bound if seen else None


def _relaxation_summary(records: list) -> dict | None:
    """Pooled over relaxation records ({"converged": bits, "residual": [...], "steps": [...]}, one per part)."""
    converged = np.concatenate([unbits(r["converged"]) for r in records])
    residual = np.concatenate([r["residual"] for r in records])
    steps = np.concatenate([r["steps"] for r in records])
    if not len(converged):
        return None
    return {"converged_fraction": float(converged.mean()), "median_residual": float(np.median(residual)),
            "max_residual": float(np.max(residual)), "mean_steps": float(np.mean(steps)), "n": int(len(converged))}


def column_examples(column: str, draw: dict) -> np.ndarray:
    """The examples a table column is measured on: Square's on the Square subset, AutoAttack's on AutoAttack's
    (``autoattack_samples``), the others on the attacked examples."""
    subset = {"square": "square", "autoattack": "autoattack", "autoattack_l2": "autoattack"}.get(column, "samples")
    return draw.get(subset, draw["samples"])


def assemble_model(model, parts: dict, clean: dict, draw: dict, y_test: np.ndarray, config) -> dict:
    """The result of one model (see the module docstring), audit included."""
    name = model.name
    predictions = np.asarray(clean["predictions"])
    correct = predictions == y_test
    samples = draw["samples"]
    result = {"info": model.describe(), "clean": accuracy(correct), "clean_on_samples": accuracy(correct[samples])}
    attacks = {}
    for column, (_, norm, groups) in COLUMNS.items():
        eps = config.eps_l2 if norm == "l2" else config.eps_linf
        reference = ("pgd-linf",) if column == "autoattack" else ()  # PGD alone on AutoAttack's examples (audit)
        found = _robust_result(parts, name, groups, eps, column_examples(column, draw), reference_groups=reference)
        if found is not None:
            attacks[column] = found
    sweeps, min_norm = {}, {}
    for norm, values in (("linf", config.sweep_linf), ("l2", config.sweep_l2)):
        bound = minimal_norm_bounds(parts, name, norm, samples, correct[samples], config)
        curve = []
        for eps in values:
            if bound is None:
                continue
            pgd, fmn = (_robust_result(parts, name, (group,), eps, samples) if eps > 0 else None
                        for group in NORM_GROUPS[norm][:2])
            clean_share = float(correct[samples].mean())
            curve.append({"eps": float(eps), **accuracy(bound > eps),
                          "pgd": pgd["accuracy"] if pgd else clean_share,
                          "fmn": fmn["accuracy"] if fmn else (clean_share if eps == 0 else None),
                          "per_source": pgd["per_source"] if pgd else {}})
        sweeps[norm] = curve
        if bound is not None and len(bound):
            median = float(np.median(bound))
            min_norm[norm] = {"median": median if math.isfinite(median) else None, "n": int(len(bound)),
                              "broken": float(np.isfinite(bound).mean())}
    result["attacks"], result["sweeps"], result["min_norm"] = attacks, sweeps, min_norm

    comparisons = {}
    if "fgsm" in attacks and "pgd_linf" in attacks:
        comparisons["fgsm_vs_pgd"] = {"eps": config.eps_linf, "n": len(samples),
                                      "fgsm": float(attacks["fgsm"]["_flags"].mean()),
                                      "pgd": float(attacks["pgd_linf"]["_flags"].mean())}
    if "square" in attacks and "pgd_linf" in attacks:
        square_set = draw["square"]
        white = np.ones(len(square_set), dtype=bool)
        for group in ("pgd-linf", "autoattack", "min-norm-linf"):  # (AutoAttack's own Square left out)
            for source, (task, items) in _tasks_of(parts, name, group, config.eps_linf).items():
                if source != BLACK_BOX_SOURCE and set(map(int, square_set)) <= {int(i) for chunk, _ in items
                                                                                  for i in chunk}:
                    white &= _flags(task, items, square_set, config.eps_linf)
        comparisons["white_vs_black_box"] = {"n": len(square_set), "white_box": float(white.mean()),
                                             "square": float(attacks["square"]["_flags"].mean())}
    audit_set = draw["audit"]
    strong = _robust_result(parts, name, ("pgd-audit",), config.eps_linf, audit_set)
    base = _robust_result(parts, name, ("pgd-linf",), config.eps_linf, audit_set)
    if strong is not None and base is not None:
        comparisons["more_steps_and_restarts"] = {
            "n": len(audit_set), "base": base["accuracy"], "strong": strong["accuracy"],
            "base_budget": _budget_text(base["budget"]), "strong_budget": _budget_text(strong["budget"])}
    result["comparisons"] = comparisons
    for column in attacks.values():
        column.pop("_flags"), column.pop("_indices")

    gradients = {}
    for source, (task, items) in _tasks_of(parts, name, "gradients", sources=model.sources).items():
        nan, zero = flags_of(items, "nan", audit_set), flags_of(items, "zero", audit_set)
        matches = flags_of(items, "matches_deployed", audit_set)
        l1 = np.concatenate([r["l1"] for _, r in items])
        gradients[source] = {"n": len(audit_set), "nan_fraction": float(nan.mean()), "zero_fraction": float(zero.mean()),
                             "matches_deployed": float(matches.mean()), "median_l1": float(np.median(l1))}
        adjoint = [r["adjoint_converged"] for _, r in items if "adjoint_converged" in r]
        if adjoint:
            gradients[source]["adjoint_converged"] = float(np.mean(adjoint))
        records = [r for _, r in _tasks_of(parts, name, "pgd-linf", config.eps_linf, model.sources).get(
            source, (None, []))[1] if "matches_deployed_adversarial" in r]
        if records:
            used = np.concatenate([unbits(r["matches_deployed_adversarial"]) for r in records])
            raw = np.concatenate([unbits(r["raw_matches_deployed_adversarial"]) for r in records])
            if len(used):
                gradients[source]["adversarial"] = {"n": int(len(used)), "matches_deployed": float(used.mean()),
                                                    "raw_matches_deployed": float(raw.mean())}
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
    sides = side_results(model, parts, draw, config)
    if sides:
        result["side_sources"] = sides
    result["seconds"] = float(clean.get("seconds", 0.0) + sum(
        record.get("seconds", 0.0) for record in _distinct_records(parts, name)))
    result["audit"] = run_audit(result, config)
    return result


def _distinct_records(parts: dict, model: str) -> list:
    """The records of a model's parts, each once: one part may serve two tasks (AutoAttack's Square and the
    standalone Square on the same examples share their key, so their parts)."""
    seen, records = set(), []
    for (name, task), items in parts.items():
        if name != model:
            continue
        what = (task.kind, task.spec, task.source, task.corruption, task.severity)  # as in its part key: not the group
        for chunk, record in items:
            key = (what, np.asarray(chunk).tobytes())
            if key not in seen:
                seen.add(key)
                records.append(record)
    return records


def side_results(model, parts: dict, draw: dict, config) -> dict:
    """The "side_sources" entry of a model (see the module docstring; {} without side sources): per side source its
    accuracy alone in each white-box column and along the PGD sweeps, beside the paired source's, same examples and
    same random draws."""
    found = {}
    for source, info in model.side_sources().items():
        paired = info["paired_with"]
        entry = {**info, "attacks": {}, "paired": {}, "sweeps": {}}
        for column, (_, norm, groups) in COLUMNS.items():
            eps = config.eps_l2 if norm == "l2" else config.eps_linf
            for key, which in (("attacks", source), ("paired", paired)):
                value = _robust_result(parts, model.name, groups, eps, column_examples(column, draw), sources=(which,))
                if value is not None:
                    entry[key][column] = {k: value[k] for k in ("accuracy", "ci95", "n", "budget")}
        for norm, values in (("linf", config.sweep_linf), ("l2", config.sweep_l2)):
            curve = []
            for eps in (e for e in values if e > 0):
                own, other = (_robust_result(parts, model.name, (NORM_GROUPS[norm][0],), eps, draw["samples"],
                                             sources=(s,))
                              for s in (source, paired))
                if own is not None:
                    curve.append({"eps": float(eps), "accuracy": own["accuracy"],
                                  "paired": None if other is None else other["accuracy"]})
            entry["sweeps"][norm] = curve
        found[source] = entry
    return found


TIMING_KEYS = ("seconds", "minutes")  # the parts of results that change from run to run of the same evaluation


def without_timings(value):
    """Results (any JSON value) without their timings (TIMING_KEYS): what two runs of the same evaluation share, e.g.
    on Ray and in one process."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


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
TABLE_COLUMNS = ("clean",) + ATTACK_COLUMNS + ("corruption_mean",)


def table_rows(results: dict) -> list:
    """One row per model: accuracies of the table's columns (None where not run), audit_passed, verdict."""
    rows = []
    for name, r in results["models"].items():
        row = {"model": name, "kind": r["info"]["kind"], "clean": r["clean"]["accuracy"]}
        for column in ATTACK_COLUMNS:
            row[column] = r["attacks"][column]["accuracy"] if column in r["attacks"] else None
        row["corruption_mean"] = r["corruptions"]["accuracy"] if "corruptions" in r else None
        for norm in ("linf", "l2"):
            row[f"min_norm_{norm}_median"] = r.get("min_norm", {}).get(norm, {}).get("median")
        row["audit_passed"] = r["audit"]["passed"]
        row["audit_failed"] = r["audit"]["failed"]
        row["side_sources"] = {source: {"label": side["label"], **{column: side["attacks"].get(column, {}).get(
            "accuracy") for column in ATTACK_COLUMNS}} for source, side in r.get("side_sources", {}).items()}
        rows.append(row)
    return rows


def _norm_cell(entry: dict | None) -> str:
    if not entry:
        return "—"
    return f"> max ({100 * entry['broken']:.0f} % broken)" if entry["median"] is None else f"{entry['median']:.3g}"


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
             "transfer from its distilled student), judged by the deployed prediction."
             + (" Rows \"full BPTT alone\" and \"as published (first K unrolled steps)\": one gradient source "
                "each, same examples and random starts; the truncated one is *not* in the worst case (the audit "
                "fails the model if it is stronger)." if any(r.get("side_sources") for r in results["models"].values())
                else ""), "",
             "| model | clean | " + " | ".join(COLUMN_LABELS) + " | corruption mean | median min. norm Linf / L2 "
             "| audit |",
             "|---|---|" + "---|" * len(COLUMN_LABELS) + "---|---|---|"]
    for name, r in results["models"].items():
        attacks = r["attacks"]
        corruption = r.get("corruptions")
        audit = "passed" if r["audit"]["passed"] else "**UNRELIABLE**: failed " + ", ".join(r["audit"]["failed"])
        unreliable = "" if r["audit"]["passed"] else " (unreliable)"
        cells = [_cell(r["clean"])] + [(_cell(attacks.get(col)) + (unreliable if col in attacks else ""))
                                       for col in ATTACK_COLUMNS]
        cells.append("—" if corruption is None else f"{100 * corruption['accuracy']:.1f}")
        cells.append(" / ".join(_norm_cell(r.get("min_norm", {}).get(norm)) for norm in ("linf", "l2")))
        lines.append(f"| {name} ({r['info']['kind']}) | " + " | ".join(cells) + f" | {audit} |")
        for source, side in r.get("side_sources", {}).items():
            for label, columns, note in ((f"{side['paired_label']} ({side['paired_with']})", side["paired"],
                                          "one source of the worst case"),
                                         (f"{side['label']} ({source})", side["attacks"], "not in the worst case")):
                if columns:
                    cells = [_cell(r["clean"])] + [_cell(columns.get(col)) for col in ATTACK_COLUMNS] + ["—", "—"]
                    lines.append(f"| {name}: {label} | " + " | ".join(cells) + f" | {note} |")
    lines += ["", "## Budgets", "",
              f"- examples: {results['examples']['samples']} attacked (FGSM, PGD, FMN), "
              f"{results['examples'].get('autoattack', results['examples']['samples'])} of them by AutoAttack (a "
              f"column of attacks run on different examples takes the worst case per example over those that ran "
              f"on it), "
              f"{results['examples']['square']} for Square, {results['examples']['audit']} for the audit's stronger "
              f"PGD and the gradient check, {results['examples']['corruption']} corrupted; seed {c['seed']}",
              "- FGSM, PGD-Linf, AutoAttack-Linf (standard: APGD-CE, APGD-T, FAB-T through each gradient source, "
              "its Square once on the deployed model"
              + ("" if c["autoattack_iterations"] >= 100 and c["square_queries"] >= 5000 else
                 f"; REDUCED budget: {c['autoattack_iterations']} iterations, Square {c['square_queries']} queries")
              + f"), Square: Linf eps {c['eps_linf']:g}; PGD-L2, AutoAttack-L2: eps {c['eps_l2']:g}; pixel units, "
                f"images in [0, 1]",
              f"- minimum-norm attack: FMN (Pintor et al. 2021), Linf and L2, {c.get('min_norm_steps', '?')} steps"
              + ("" if c.get("min_norm", False) else " (not run)") + "; the Linf and L2 headline columns are the "
              "worst case per example over AutoAttack and FMN (and PGD for L2); the median minimal norm is an upper "
              "bound per example (FMN, PGD's sweep, AutoAttack) with its median over the attacked examples",
              f"- PGD: {c['pgd_steps']} steps of {'2.5 eps / steps' if c['pgd_step_size'] is None else c['pgd_step_size']}"
              f", {c['pgd_restarts']} random start(s); audit PGD: {c['audit_steps']} steps, {c['audit_restarts']} "
              f"restarts; Square: {c['square_queries']} queries",
              f"- eps sweeps (worst case per example over PGD at each eps and below, FMN, AutoAttack at the table's "
              f"eps): Linf {', '.join(f'{e:g}' for e in c['sweep_linf'])}; "
              f"L2 {', '.join(f'{e:g}' for e in c['sweep_l2'])}", ""]
    for name, r in results["models"].items():
        lines += [f"## {name}: audit {'passed' if r['audit']['passed'] else 'FAILED'}", ""]
        lines += [f"- [{'x' if check['passed'] else ('!' if check.get('warning') else ' ')}] {check['name']}"
                  f"{' (warning)' if check.get('warning') else ''}: {check['detail']}" for check in r["audit"]["checks"]]
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
        ax.set_ylabel("robust accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.set_title(f"{'Linf' if norm == 'linf' else 'L2'}: worst case of PGD, FMN, AutoAttack and the gradient "
                     f"sources", fontsize=9)
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

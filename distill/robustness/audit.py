"""The audit for gradient masking and unsound evaluations, run with every evaluation (README.md, "Robustness
evaluation"; Carlini et al. 2019, "On Evaluating Adversarial Robustness"; Athalye et al. 2018).

Each check reads the assembled result of one model (``distill.robustness.report.assemble``) and returns
{"name", "passed", "detail"}; a failed check marks the model's adversarial results as unreliable, and the report
says which check failed next to the numbers. The checks (tolerance: ``slack`` on accuracies, absolute, and at least two of the examples compared):
- accuracy falls monotonically with eps (Linf and L2 sweeps), and reaches (almost) 0 at the largest Linf eps;
- iterative beats single-step: PGD-Linf accuracy <= FGSM accuracy at the same eps, same examples;
- white-box beats black-box: the white-box worst case (PGD-Linf and AutoAttack) <= Square, same examples;
- more steps and restarts change little: the audit's stronger PGD lowers accuracy by at most ``slack``;
- no NaN input gradients, and all-zero input gradients on at most ``max_zero_gradients`` of the examples, for every
  gradient source;
- the EBM's gradient sources through the relaxation predict what is deployed (argmax agreement >= 99 %), on clean
  examples and on the PGD-Linf adversarial points, as the attacks use them (the raw logits' agreement, before
  ``agree_with_deployed``, is reported beside it);
- a warning, not a failure: fixed-step PGD within ``slack`` of the adaptive and minimum-norm attacks at the same
  budget, else "PGD is step-limited" (the headline columns and the sweeps show the adaptive numbers);
- a warning, not a failure (EBMs): the deployed relaxation converges about as often on adversarial inputs as on clean
  ones (within 10 points; otherwise the attacks found points where the prediction rests on an unfinished
  relaxation: valid adversarial examples against what is deployed, since BPTT differentiates the truncated
  relaxation itself, but implicit gradients there are not those of the function deployed). The residuals
  themselves are reported beside the check.
- a side source (the "as published" truncated BPTT, ``config.SIDE_SOURCES``) is no stronger than the worst case over
  the protocol's sources in any column (a failure: the headline leaves out the side source, so it would miss the
  adversarial examples that only the side source finds); its gradient checks are warnings (they concern its own
  row, not the headline).
"""
from __future__ import annotations

import math

from .config import SIDE_SOURCES

# The table's adversarial columns: key -> (label, norm, the attack groups whose per-example worst case it is).
# "pgd_l2" and "autoattack" are the headline numbers of their norm: the adaptive and minimum-norm attacks with them.
COLUMNS = {
    "fgsm": ("FGSM", "linf", ("fgsm",)),
    "pgd_linf": ("PGD-Linf", "linf", ("pgd-linf",)),
    "pgd_l2": ("L2: PGD, AutoAttack, FMN", "l2", ("pgd-l2", "autoattack-l2", "min-norm-l2")),
    "autoattack": ("Linf: AutoAttack, FMN", "linf", ("autoattack", "min-norm-linf")),
    "autoattack_l2": ("AutoAttack-L2", "l2", ("autoattack-l2",)),
    "square": ("Square", "linf", ("square",)),
}
ATTACK_COLUMNS = tuple(COLUMNS)
COLUMN_LABELS = tuple(label for label, _, _ in COLUMNS.values())


def _pct(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f} %"


def tolerance(config, n: int | None) -> float:
    """How far an accuracy may go the wrong way: ``slack``, and at least two examples of the n compared (one or two
    examples either way are noise on small audits), plus float rounding."""
    return max(config.slack, 2.0 / n if n else 0.0) + 1e-9


def check_monotone(result: dict, config) -> list:
    checks = []
    for norm in ("linf", "l2"):  # PGD alone: the combined curve is monotone by construction
        curve = [(point["eps"], point.get("pgd", point["accuracy"])) for point in result["sweeps"][norm]]
        n = min((point.get("n") or 0 for point in result["sweeps"][norm]), default=0)
        rises = [(e0, a0, e1, a1) for (e0, a0), (e1, a1) in zip(curve, curve[1:]) if a1 > a0 + tolerance(config, n)]
        detail = ("falls monotonically over eps " + ", ".join(f"{e:g}" for e, _ in curve) if not rises else
                  "rises with eps: " + "; ".join(f"{_pct(a0)} at {e0:g} -> {_pct(a1)} at {e1:g}"
                                                 for e0, a0, e1, a1 in rises))
        checks.append({"name": f"monotone_in_eps_{norm}", "passed": not rises, "detail": "PGD " + detail})
    # reaches zero: whether the attacks together break the model at a large budget, so the worst case per example
    # over the sweep's attacks (PGD, FMN); a model whose gradients mislead PGD alone is caught by the PGD-vs-adaptive
    # warnings and the white-box/black-box comparison
    last = result["sweeps"]["linf"][-1]
    eps, acc = last["eps"], last["accuracy"]
    pgd = f" (PGD alone {_pct(last['pgd'])})" if "pgd" in last else ""
    checks.append({"name": "reaches_zero", "passed": acc <= config.zero_accuracy,
                   "detail": f"Linf worst-case accuracy {_pct(acc)}{pgd} at the largest eps {eps:g} (threshold "
                             f"{_pct(config.zero_accuracy)})"})
    return checks


def check_comparisons(result: dict, config) -> list:
    checks = []
    comparisons = result["comparisons"]
    pair = comparisons.get("fgsm_vs_pgd")
    if pair:
        checks.append({"name": "iterative_beats_single_step", "passed": pair["pgd"] <= pair["fgsm"] + tolerance(config, pair["n"]),
                       "detail": f"PGD-Linf {_pct(pair['pgd'])} vs FGSM {_pct(pair['fgsm'])} at eps {pair['eps']:g} "
                                 f"on {pair['n']} examples"})
    pair = comparisons.get("white_vs_black_box")
    if pair:
        checks.append({"name": "white_box_beats_black_box",
                       "passed": pair["white_box"] <= pair["square"] + tolerance(config, pair["n"]),
                       "detail": f"white-box worst case {_pct(pair['white_box'])} vs Square {_pct(pair['square'])} "
                                 f"on {pair['n']} examples"})
    pair = comparisons.get("more_steps_and_restarts")
    if pair:
        checks.append({"name": "more_steps_change_little",
                       "passed": pair["base"] - pair["strong"] <= tolerance(config, pair["n"]),
                       "detail": f"PGD-Linf {pair['base_budget']}: {_pct(pair['base'])}; {pair['strong_budget']}: "
                                 f"{_pct(pair['strong'])} on {pair['n']} examples"})
    return checks


def check_gradients(result: dict, config) -> list:
    checks = []
    for source, g in sorted(result["gradients"].items()):
        side = {"warning": True} if source in SIDE_SOURCES else {}
        passed = g["nan_fraction"] == 0 and g["zero_fraction"] <= config.max_zero_gradients
        checks.append({"name": f"gradients_{source}", "passed": passed, **side,
                       "detail": f"{source}: NaN on {_pct(g['nan_fraction'])}, all-zero on {_pct(g['zero_fraction'])} "
                                 f"of {g['n']} clean examples (median L1 norm {g['median_l1']:.3g}"
                                 + (f"; adjoint iteration converged on {_pct(g['adjoint_converged'])}"
                                    if "adjoint_converged" in g else "") + ")"})
        if source in ("bptt", "implicit") or source in SIDE_SOURCES:
            checks.append({"name": f"{source}_predicts_as_deployed", "passed": g["matches_deployed"] >= 0.99, **side,
                           "detail": f"{source} logits' argmax equals the deployed prediction on "
                                     f"{_pct(g['matches_deployed'])} of clean examples"})
            adversarial = g.get("adversarial")
            if adversarial:
                checks.append({"name": f"{source}_predicts_as_deployed_on_adversarial_points",
                               "passed": adversarial["matches_deployed"] >= 0.99, **side,
                               "detail": f"as the attacks use them, {source} logits decide as deployed on "
                                         f"{_pct(adversarial['matches_deployed'])} of {adversarial['n']} PGD-Linf "
                                         f"adversarial points (raw logits, before agree_with_deployed: "
                                         f"{_pct(adversarial['raw_matches_deployed'])})"})
    return checks


def check_step_limited(result: dict, config) -> list:
    """Warnings: PGD alone against the adaptive and minimum-norm attacks of its norm, at the table's budget."""
    checks = []
    for column, pgd_group, eps in (("autoattack", "pgd-linf", config.eps_linf), ("pgd_l2", "pgd-l2", config.eps_l2)):
        attacks = result.get("attacks", {})
        entry = attacks.get(column)
        same_examples = {**(entry or {}).get("per_attack", {}), **(entry or {}).get("reference", {})}
        pgd_accuracy = same_examples.get(pgd_group)  # PGD alone on the examples every attack of the column ran on
        if pgd_accuracy is None and pgd_group == "pgd-linf" and "pgd_linf" in attacks:  # (results without it)
            pgd_accuracy = attacks["pgd_linf"]["accuracy"]
        adaptive = {g: a for g, a in (entry or {}).get("per_attack", {}).items() if g != pgd_group}
        if pgd_accuracy is None or math.isnan(pgd_accuracy) or not adaptive:
            continue
        best = min(adaptive.values())
        n = entry.get("per_attack_n", entry["n"])
        passed = pgd_accuracy - best <= tolerance(config, n)
        label = "Linf" if pgd_group == "pgd-linf" else "L2"
        others = ", ".join(f"{g} {_pct(a)}" for g, a in sorted(adaptive.items()))
        detail = (f"PGD-{label} {_pct(pgd_accuracy)} vs {others} at eps {eps:g} on {n} examples"
                  + ("" if passed else f": PGD is step-limited; the {label} column shows the adaptive number "
                                       f"({_pct(entry['accuracy'])})"))
        checks.append({"name": f"pgd_not_step_limited_{label.lower()}", "passed": passed, "warning": True,
                       "detail": detail})
    return checks


def check_relaxation(result: dict, config) -> list:
    relaxation = result.get("relaxation")
    if not relaxation or relaxation.get("adversarial") is None:
        return []
    clean, adversarial = relaxation["clean"], relaxation["adversarial"]
    passed = adversarial["converged_fraction"] >= clean["converged_fraction"] - 0.10
    return [{"name": "relaxation_converges_on_adversarial_inputs", "passed": passed, "warning": True,
             "detail": f"converged (residual < tol) on {_pct(clean['converged_fraction'])} of clean and "
                       f"{_pct(adversarial['converged_fraction'])} of PGD-Linf adversarial inputs; median residual "
                       f"{clean['median_residual']:.2g} / {adversarial['median_residual']:.2g}, mean steps "
                       f"{clean['mean_steps']:.1f} / {adversarial['mean_steps']:.1f}"}]


def check_side_sources(result: dict, config) -> list:
    """A side source (e.g. the "as published" truncated BPTT) is not stronger than the worst case over the protocol's
    sources, column by column (same examples)."""
    checks = []
    for source, side in sorted(result.get("side_sources", {}).items()):
        stronger = [(column, entry, result["attacks"][column]) for column, entry in side["attacks"].items()
                    if column in result.get("attacks", {})
                    and entry["accuracy"] < result["attacks"][column]["accuracy"] - tolerance(config, entry["n"])]
        compared = ", ".join(f"{COLUMNS[c][0]} {_pct(e['accuracy'])} vs {_pct(result['attacks'][c]['accuracy'])}"
                             for c, e in side["attacks"].items() if c in result.get("attacks", {}))
        detail = (f"{side['label']} ({source}) against the worst case: {compared or 'nothing compared'}"
                  + ("" if not stronger else "; STRONGER in " + ", ".join(COLUMNS[c][0] for c, _, _ in stronger)
                     + ": the truncated gradient finds adversarial examples the protocol's sources miss"))
        checks.append({"name": f"{source}_not_stronger_than_worst_case", "passed": not stronger, "detail": detail})
    return checks


AUDIT_CHECKS = (check_monotone, check_comparisons, check_gradients, check_step_limited, check_relaxation,
                check_side_sources)


def run_audit(result: dict, config) -> dict:
    """{"passed": no check failed, "checks": [...], "failed": [names], "warnings": [names of warnings not met],
    "verdict": one sentence}. A warning (``"warning": True``) that does not hold is said, but does not fail."""
    checks = [check for fn in AUDIT_CHECKS for check in fn(result, config)]
    failed = [c["name"] for c in checks if not c["passed"] and not c.get("warning")]
    warnings = [c for c in checks if not c["passed"] and c.get("warning")]
    verdict = ("all audit checks passed" if not failed else
               "UNRELIABLE: the adversarial results fail the audit (" + "; ".join(
                   c["detail"] for c in checks if not c["passed"] and not c.get("warning")) + ")")
    if warnings:
        verdict += "; note: " + "; ".join(c["detail"] for c in warnings)
    return {"passed": not failed, "checks": checks, "failed": failed, "warnings": [c["name"] for c in warnings],
            "verdict": verdict}

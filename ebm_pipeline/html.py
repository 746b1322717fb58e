"""report.html: one self-contained page (styles inline, every image embedded as a base64 data URI, no scripts, no
external resources) with the pipeline's tables and plots, the budgets it used and its full configuration."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f0f0; } td.text, th.text { text-align: left; }
.bad { color: #a00; font-weight: bold; } .good { color: #070; } .note { color: #555; font-size: 0.9em; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 0.8em; }
"""


def esc(value) -> str:
    return html.escape(str(value))


def image(path: Path, alt: str) -> str:
    """An <img> whose source is the PNG itself (data URI)."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def table(headers, rows, text_columns=(0,)) -> str:
    """An HTML table; cells are escaped unless given as ("raw", html)."""
    def cell(tag, value, column):
        cls = ' class="text"' if column in text_columns else ""
        body = value[1] if isinstance(value, tuple) and value[0] == "raw" else esc(value)
        return f"<{tag}{cls}>{body}</{tag}>"
    head = "".join(cell("th", h, i) for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(cell("td", v, i) for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def pct(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def pct_ci(entry) -> str:
    if not entry:
        return "—"
    low, high = entry["ci95"]
    return f"{100 * entry['accuracy']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def robustness_section(results: dict) -> str:
    from distill.robustness.audit import ATTACK_COLUMNS, COLUMN_LABELS
    rows = []
    for name, r in results["models"].items():
        verdict = ("raw", '<span class="good">passed</span>') if r["audit"]["passed"] else (
            "raw", '<span class="bad">UNRELIABLE</span>: failed ' + esc(", ".join(r["audit"]["failed"])))
        corruption = r.get("corruptions")
        rows.append([f"{name} ({r['info']['kind']})", pct_ci(r["clean"])]
                    + [pct_ci(r["attacks"].get(c)) for c in ATTACK_COLUMNS]
                    + [pct(corruption["accuracy"]) if corruption else "—", verdict])
    parts = [table(["model", "clean", *COLUMN_LABELS, "corruption mean", "audit"], rows)]
    c = results["config"]
    parts.append(f'<p class="note">Accuracy % [95 % Wilson interval]; adversarial columns are the worst case per '
                 f'example over each model\'s gradient sources (EBM: BPTT through the deployed relaxation, implicit '
                 f'differentiation, transfer from its student), judged by the deployed prediction. Budgets: Linf eps '
                 f'{c["eps_linf"]:g}, L2 eps {c["eps_l2"]:g}; PGD {c["pgd_steps"]} steps, {c["pgd_restarts"]} '
                 f'start(s); AutoAttack (Linf and L2) {c["autoattack_iterations"]} iterations and Square '
                 f'{c["square_queries"]} queries{" (REDUCED from the standard 100 / 5000)" if c["autoattack_iterations"] < 100 or c["square_queries"] < 5000 else ""}; '
                 f'FMN minimum-norm attack {c.get("min_norm_steps", "?")} steps; the Linf and L2 headline columns are '
                 f'the worst case per example over AutoAttack and FMN (and PGD for L2); '
                 f'{results["examples"]["samples"]} attacked test images'
                 f'{_autoattack_subset(results["examples"])}, {results["examples"]["square"]} for Square, '
                 f'{results["examples"]["corruption"]} corrupted.</p>')
    for name, r in results["models"].items():
        items = "".join(f'<li class="{"good" if ch["passed"] else "bad"}">{esc(ch["name"])}: {esc(ch["detail"])}'
                        f'</li>' for ch in r["audit"]["checks"])
        parts.append(f"<h3>Audit: {esc(name)}</h3><ul>{items}</ul>")
    return "\n".join(parts)


def _autoattack_subset(examples: dict) -> str:
    """", the first N of them by AutoAttack" when AutoAttack ran on fewer examples than the other attacks."""
    n = examples.get("autoattack", examples["samples"])
    return "" if n == examples["samples"] else f" (the first {n} of them by AutoAttack)"


def skipped_note(what: str, reason: str) -> str:
    """The paragraph of a stage that did not run its work here, with the reason recorded in its results."""
    return f'<p class="bad">{esc(what)} skipped: {esc(reason)}</p>'


def hardware_section(compare: dict) -> str:
    if compare.get("skipped"):
        return skipped_note("Hardware targets", compare["skipped"])
    rows = []
    for row in compare["targets"]:
        if not row["measured"] and not row.get("estimated"):
            rows.append([row["label"], "not measured: " + row.get("reason", ""), "", "", "", "", ""])
            continue

        def num(key, fmt):
            value = row.get(key)
            return "—" if value is None else format(value, fmt)
        rows.append([row["label"], num("latency_ms_batch1", ".4g"), num("samples_per_s", ".4g"),
                     num("steps_mean", ".1f"), pct(row.get("accuracy")), num("energy_uj", ".4g"),
                     row.get("energy_kind", "unknown")])
    notes = [row.get("energy_note") for row in compare["targets"] if row.get("energy_kind") == "estimated"]
    return (table(["target", "ms / sample (batch 1)", "samples/s (best batch)", "steps", "accuracy %",
                   "energy / inference (µJ)", "energy kind"], rows, text_columns=(0, 6))
            + "".join(f'<p class="note">{esc(n)}</p>' for n in notes if n))


def render(context: dict, images: dict) -> str:
    """The page. context: the pipeline's results (results.json); images: {name: PNG path}."""
    cfg = context["config"]
    blocks = [f"<h1>ebm-toolkit pipeline: {esc(cfg['dataset'])}"
              f"{' (convolutional EBM)' if context.get('kind') == 'conv' else ''}</h1>",
              f'<p class="note">Written {esc(context["finished"])} by ebm-toolkit {esc(context["toolkit_version"])}; '
              f'{context["total_seconds"] / 60:.1f} min in this run. {esc(context["budget_note"])}</p>']
    def status(s):
        if s["skipped"]:
            return "skipped (artifact up to date)"
        if s.get("incomplete"):
            return "INCOMPLETE: " + s["summary"]["incomplete"]
        return "ran" + (" (work skipped, see below)" if s["summary"].get("skipped") else "")
    stage_rows = [[name, status(s), f"{s['seconds']:.1f}", ", ".join(s["outputs"])]
                  for name, s in context["stages"].items()]
    blocks += ["<h2>Stages</h2>", table(["stage", "this run", "seconds (when it ran)", "artifacts"], stage_rows,
                                         text_columns=(0, 1, 3))]
    train = context["stages"]["train"]["summary"]
    layers = (f"Architecture {train['architecture']} (layer shapes "
              f"{'-'.join('x'.join(map(str, s)) for s in train['layer_shapes'])}, {train['parameters']:,} "
              f"parameters)" if "layer_shapes" in train else f"Layers {'-'.join(map(str, train['layer_sizes']))}")
    blocks += ["<h2>EBM trained with equilibrium propagation</h2>",
               f"<p>{esc(layers)}, {train['epochs']} epochs: test accuracy "
               f"{pct(train['test_acc'])} % (deployed relaxation: {esc(json.dumps(context['deployment']))}).</p>",
               image(images["training"], "training curves")]
    dynamics = context["stages"]["dynamics"]["summary"]
    blocks += ["<h2>Relaxation dynamics</h2>", image(images["dynamics"], "energy and residual per integrator"),
               table(["integrator", "mean steps", "converged %", "seconds", "trajectory"],
                     [[m, f"{t['steps_mean']:.1f}", pct(t["converged"]), f"{t['seconds']:.3f}",
                       "every step" if t.get("recorded", True) else "start and end only"]
                      for m, t in dynamics["integrators"].items()]),
               f'<p class="note">{dynamics["samples"]} test images, tolerance {dynamics["tol"]:g}'
               + (f' (the EBM is deployed with a fixed count of {context["deployment"]["max_steps"]} steps, '
                  f'tol 0)' if dynamics.get("deployed_tol") == 0 else "") + '.</p>']
    d = context["stages"]["distill"]["summary"]
    test = d.get("test", {})
    blocks += ["<h2>Distillation</h2>", table(
        ["", "EBM", "distilled student", "agreement"],
        [["test accuracy %", pct(test.get("ebm_accuracy")), pct(test.get("accuracy")), pct(test.get("agreement"))]]),
        f'<p class="note">State MSE per layer on the test set: '
        f'{esc(", ".join(f"{v:.4f}" for v in test.get("state_mse", [])))}; {d.get("epochs_run")} epochs.</p>']
    base = [[name, pct(context["stages"][name]["summary"].get("test_accuracy")),
             pct(context["stages"][name]["summary"].get("test_robust_accuracy"))]
            for name in ("standard", "pgd_at")]
    blocks += ["<h3>Baselines (same architecture)</h3>",
               table(["baseline", "test accuracy %", "under the training PGD %"], base)]
    refused = context["stages"]["robustness"]["summary"].get("not_evaluated", {})
    blocks += ["<h2>Robustness</h2>"]
    blocks += [f'<p class="bad">Not evaluated: {esc(name)}: {esc(reason)}</p>' for name, reason in refused.items()]
    if context["robustness"] is not None:
        blocks += [robustness_section(context["robustness"]), image(images["sweeps"], "accuracy against eps"),
                   image(images["corruptions"], "corruption accuracy heatmap") if "corruptions" in images else ""]
    lava = context["stages"]["lava"]["summary"]
    blocks += ["<h2>Lava (neuromorphic mapping)</h2>"]
    if lava.get("skipped"):
        blocks += [skipped_note("The Lava mapping", lava["skipped"])]
    else:
        blocks += [table(
            ["Lava model", "samples", "accuracy %", "agreement with the simulator's relaxation %", "ms per step",
             "mean steps"],
            [[kind, r["samples"], pct(r["accuracy"]), pct(r.get("numba", {}).get("agreement")),
              f"{r['ms_per_step']:.3f}", f"{r['steps_mean']:.1f}"] for kind, r in lava["runs"].items()]),
            f'<p class="note">{esc(lava["estimate"]["summary"])}</p>' if lava.get("estimate") else "",
            f'<p class="note">{esc(lava["export"])}</p>' if lava.get("export") else ""]
    blocks += ["<h2>Latency and energy across hardware targets</h2>", hardware_section(context["hardware"]),
               image(images["hardware"], "latency and energy per target (log scale)")
               if "hardware" in images else ""]
    blocks += ["<h2>Full configuration</h2>", f"<pre>{esc(json.dumps(cfg, indent=2, default=str))}</pre>"]
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>ebm-toolkit pipeline: "
            f"{esc(cfg['dataset'])}</title><style>{STYLE}</style></head><body>" + "\n".join(blocks)
            + "</body></html>\n")

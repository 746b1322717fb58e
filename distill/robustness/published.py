"""The published CIFAR-10 robustness numbers the toolkit's study is compared with, and the side-by-side table.

Sources: "Energy-based learning algorithms are adversarially robust" (ICLR 2024 submission, arXiv 2401.11543),
Table 1 and its appendix (CIFAR-10; ranges over the paper's runs), and the authors' released result files
(github.com/lanl/AdvEP) for the L2 rows. Their EBM is Laborieux et al.'s 128-256-512-512 convolutional network trained
with EP (about 88 % clean); it predicted with 250 relaxation steps and was attacked through the first 29 unrolled
steps; AutoAttack ran on about 200 images (Square: 1,000 queries in the released files). Each row records its
budget, images and gradient source so that a reader sees where the protocols differ from the toolkit's (every
deployed step differentiated, implicit differentiation and transfer, the worst case per example; the published
truncation reported beside it, not in it).

    rows = PUBLISHED_CIFAR10                       # list of PublishedRow
    text = side_by_side(toolkit_rows)              # markdown: published rows, then the toolkit's
"""
from __future__ import annotations

from dataclasses import dataclass, field

COLUMNS = ("clean", "pgd_linf", "autoattack", "square", "pgd_l2", "corruption_mean")
COLUMN_TITLES = {"clean": "clean", "pgd_linf": "PGD Linf 8/255", "autoattack": "AutoAttack Linf 8/255",
                 "square": "Square Linf 8/255", "pgd_l2": "PGD L2 0.5", "corruption_mean": "CIFAR-10-C mean"}


@dataclass(frozen=True)
class PublishedRow:
    """One model's published accuracies (a share, or a (low, high) range over runs; None: not reported)."""

    model: str
    values: dict
    protocol: str
    source: str
    notes: tuple = field(default_factory=tuple)


_ICLR = "arXiv 2401.11543 (ICLR 2024 submission), Table 1"
_PROTOCOL = "Laborieux et al.'s 128-256-512-512 architecture; AutoAttack on about 200 images"
PUBLISHED_CIFAR10 = [
    PublishedRow("EP-CNN (published)", {"clean": (0.871, 0.887), "pgd_linf": (0.115, 0.130),
                                        "autoattack": (0.07, 0.09), "square": (0.455, 0.485), "pgd_l2": 0.800,
                                        "corruption_mean": 0.76},
                 _PROTOCOL + "; predicts with 250 steps, attacked through the first 29 unrolled steps",
                 _ICLR + "; L2: lanl/AdvEP result files (eps 1.0: 73.8 %)",
                 ("gradients truncated to 29 of 250 steps: the toolkit's 'as published' source",
                  "the released files also hold PGD Linf through 70 unrolled steps: 11.7 %, and Square with 1,000 "
                  "queries: 45.5 %")),
    PublishedRow("BP-CNN (published)", {"clean": 0.889, "pgd_linf": 0.072, "autoattack": 0.04, "square": 0.135},
                 _PROTOCOL, _ICLR),
    PublishedRow("PGD-trained CNN (published)", {"clean": 0.839, "pgd_linf": 0.267, "autoattack": 0.24,
                                                 "square": 0.53}, _PROTOCOL, _ICLR),
]


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, (tuple, list)):
        low, high = value
        return f"{100 * low:.1f}-{100 * high:.1f}"
    return f"{100 * value:.1f}"


def side_by_side(toolkit_rows: dict, toolkit_protocol: str = "") -> str:
    """A markdown table (accuracies in %): the published rows, then ``toolkit_rows`` ({model: {column: share or
    None}}, e.g. benchmarks/results/cifar.json's "models"), with each row's protocol under the table."""
    header = "| model | " + " | ".join(COLUMN_TITLES[c] for c in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    for row in PUBLISHED_CIFAR10:
        lines.append(f"| {row.model} | " + " | ".join(_cell(row.values.get(c)) for c in COLUMNS) + " |")
    for model, values in toolkit_rows.items():
        lines.append(f"| {model} (this toolkit) | " + " | ".join(_cell(values.get(c)) for c in COLUMNS) + " |")
    notes = [f"- {row.model}: {row.protocol} ({row.source})" + "".join(f"; {n}" for n in row.notes)
             for row in PUBLISHED_CIFAR10]
    if toolkit_protocol:
        notes.append(f"- this toolkit: {toolkit_protocol}")
    return "\n".join(lines + [""] + notes) + "\n"

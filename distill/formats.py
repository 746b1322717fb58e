"""The artifact format distill writes, registered with ebm_sim.storage when distill is used (``distill.io``,
``distill.commands``): ``ebm-feedforward`` (version 1; schema in docs/formats.md), a feedforward model -- a distilled
student or a baseline -- with its provenance. Light: no torch."""
from __future__ import annotations

import json

from ebm_sim import storage

FORMAT = "ebm-feedforward"
SUMMARY_KEYS = ("kind", "layer_sizes", "activation", "readout", "dataset", "network_hash", "fixed_points_hash",
                "model_hash")


def summary(attrs: dict) -> dict:
    """What ``ebm info`` shows of a feedforward model: its kind, architecture, provenance and configuration."""
    return {**{key: attrs.get(key) for key in SUMMARY_KEYS}, "config": json.loads(attrs.get("config", "{}"))}


storage.register_format(FORMAT, "a feedforward model", summary=summary)

"""The artifact format distill writes, registered with ebm_sim.storage when distill is used (``distill.io``,
``distill.commands``): ``ebm-feedforward`` (version 1: dense, version 2: layered/convolutional; schema in
docs/formats.md), a feedforward model -- a distilled student or a baseline -- with its provenance. Light: no torch."""
from __future__ import annotations

import json

from ebm_sim import storage

FORMAT = "ebm-feedforward"
DENSE_VERSION = 1     # a FeedForward: weights/W{k}, biases/b{k}, layer_sizes
LAYERED_VERSION = 2   # a LayeredFeedForward (conv students and baselines): params/i{j}/{name}, the architecture as JSON
SUMMARY_KEYS = ("kind", "layer_sizes", "layer_shapes", "activation", "readout", "dataset", "network_hash",
                "fixed_points_hash", "model_hash")


def summary(attrs: dict) -> dict:
    """What ``ebm info`` shows of a feedforward model: its kind, architecture, provenance and configuration."""
    shown = {key: attrs.get(key) for key in SUMMARY_KEYS if key in attrs}
    return {**shown, "config": json.loads(attrs.get("config", "{}"))}


storage.register_format(FORMAT, "a feedforward model", (DENSE_VERSION, LAYERED_VERSION), summary=summary)

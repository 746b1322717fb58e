"""The artifact format hardware writes, registered with ebm_sim.storage when it is used (``hardware.commands``,
``lava_file.save_program``): ``ebm-lava-program`` (schema in docs/formats.md), a Lava export. ``lava_file`` itself
reads it without ebm_sim, so a Lava host needs no part of the simulator."""
from __future__ import annotations

from ebm_sim import storage

from .lava_file import FORMAT, VERSION

SUMMARY_KEYS = ("kind", "layer_sizes", "dt", "steps", "tol", "frac_bits", "weight_bits", "forward_exps",
                "backward_exps", "network_hash")


def summary(attrs: dict) -> dict:
    """What ``ebm info`` shows of a Lava export: its kind, layers, relaxation and fixed-point choices."""
    return {key: attrs.get(key) for key in SUMMARY_KEYS}


storage.register_format(FORMAT, "a Lava program", (VERSION,), summary)

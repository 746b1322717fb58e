"""Stages of the pipeline and the ledger that lets a re-run skip what is already done.

A stage has a name, a key (SHA-256 of everything its result depends on: its configuration sections, the data's
fingerprint and the hashes of the artifacts it reads) and output files. When it finishes, the ledger
(``<out_dir>/pipeline.json``, rewritten atomically) records its key, the hash of each output (an artifact's stored
content hash, else the file's SHA-256), its summary and its duration. On the next run a stage is skipped when its
key is the same and every output is still there with the recorded hash; otherwise it runs again (and resumes its
own partial work where it has any: training checkpoints, ``ebm relax``'s partial file, the robustness parts). A stage
whose summary says it is ``incomplete`` (part of its work refused, e.g. a model the robustness evaluation cannot take
yet) is not recorded: the next run tries it again.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from ebm_sim.storage import write_json


def file_hash(path: Path) -> str:
    """An HDF5 artifact's stored content hash, or the SHA-256 of the file's bytes."""
    path = Path(path)
    if path.suffix == ".h5":
        try:
            import h5py
            with h5py.File(path, "r") as f:
                stored = f.attrs.get("content_hash")
            if stored:
                return str(stored)
        except OSError:
            pass
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stage_key(*parts) -> str:
    """SHA-256 of JSON-serializable parts (configuration digests, hashes, settings)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class Ledger:
    """What each finished stage produced (see the module docstring)."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / "pipeline.json"
        self.entries = {}
        if self.path.exists():
            try:
                self.entries = json.loads(self.path.read_text()).get("stages", {})
            except ValueError:
                self.entries = {}  # unreadable: every stage checks its outputs again

    def finished(self, name: str, key: str) -> dict | None:
        """The recorded entry when stage ``name`` ran with ``key`` and its outputs are intact, else None."""
        entry = self.entries.get(name)
        if not entry or entry.get("key") != key:
            return None
        base = self.path.parent
        for relative, digest in entry["outputs"].items():
            path = base / relative
            if not path.exists() or file_hash(path) != digest:
                return None
        return entry

    def entry(self, key: str, outputs, summary: dict, seconds: float) -> dict:
        """What ``record`` stores for a stage: its key, its outputs' hashes, summary, duration and end time."""
        base = self.path.parent
        return {"key": key, "outputs": {str(Path(p).relative_to(base)): file_hash(p) for p in outputs},
                "summary": summary, "seconds": seconds, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def record(self, name: str, key: str, outputs, summary: dict, seconds: float) -> dict:
        entry = self.entry(key, outputs, summary, seconds)
        self.entries[name] = entry
        write_json(self.path, {"stages": self.entries})
        return entry

    def output_hash(self, name: str, relative: str) -> str:
        return self.entries[name]["outputs"][relative]

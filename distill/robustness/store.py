"""Finished pieces of an evaluation on disk, so that an interrupted evaluation resumes where it stopped.

A part is one chunk of one task (an attack, a gradient check, a corruption) on one model, stored as a JSON file
``<directory>/<sha256 of its key>.json`` = {"key": {...}, "record": {...}}. The key holds everything that determines
the result (model and student hashes, deployment, the attack's full budget, the gradient source, the example indices,
the seed, the data's fingerprint), so a part is reused only for exactly the same work; files are written atomically
(temporary file + rename), so an interruption never leaves a half-written part.

Several processes may evaluate into one folder: a process that starts a part claims it (``claim``: a file
``.<name>.claim`` created exclusively, holding its process id and host); the others leave a claimed part to its
owner and come back for it once it is stored, or take it over when its owner no longer runs on this host.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ebm_sim.storage import write_text


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


class PartStore:
    """get(key) -> record or None; put(key, record). Keys and records are JSON-serializable dicts."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, key: dict) -> Path:
        return self.directory / f"{hashlib.sha256(_canonical(key).encode()).hexdigest()[:32]}.json"

    def get(self, key: dict):
        path = self.path(key)
        if not path.exists():
            return None
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # unreadable: recompute it
        if _canonical(stored.get("key")) != _canonical(key):
            return None
        return stored.get("record")

    def put(self, key: dict, record: dict) -> None:
        write_text(self.path(key), _canonical({"key": key, "record": record}))

    def claim_path(self, key: dict) -> Path:
        return self.directory / f".{self.path(key).stem}.claim"

    def claim(self, key: dict) -> bool:
        """Claim the part for this process: True unless another live process of this host holds it (a claim of a
        process that no longer runs, or of this one, is taken over)."""
        import os
        import socket

        path, me = self.claim_path(key), f"{os.getpid()}@{socket.gethostname()}"
        for _ in range(2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    owner = path.read_text().strip()
                except OSError:
                    continue  # released meanwhile: try again
                pid, _, host = owner.partition("@")
                if owner == me:
                    return True
                if host != socket.gethostname() or not pid.isdigit() or _running(int(pid)):
                    return False
                path.unlink(missing_ok=True)  # its owner is gone: take it over
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(me)
            return True
        return False

    def release(self, key: dict) -> None:
        self.claim_path(key).unlink(missing_ok=True)


def _running(pid: int) -> bool:
    import os
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def bits(flags) -> str:
    """A boolean array as a string of '0' and '1' (compact, readable JSON)."""
    return "".join("1" if f else "0" for f in flags)


def unbits(text: str) -> np.ndarray:
    """The inverse of ``bits``: a boolean array."""
    return np.frombuffer(text.encode(), dtype=np.uint8) == ord("1")


def values_of(parts_of_task: list, field: str, indices) -> list:
    """Per-example values of one task for ``indices`` (in that order), from its parts [(chunk indices, record)]
    whose ``field`` is a list with one value per example of the chunk."""
    lookup = {}
    for chunk, record in parts_of_task:
        for index, value in zip(chunk, record[field]):
            lookup[int(index)] = value
    return [lookup[int(i)] for i in indices]


def flags_of(parts_of_task: list, field: str, indices) -> np.ndarray:
    """Per-example flags of one task for ``indices`` (in that order), from its parts [(chunk indices, record)]."""
    lookup = {}
    for chunk, record in parts_of_task:
        for index, flag in zip(chunk, unbits(record[field])):
            lookup[int(index)] = bool(flag)
    return np.array([lookup[int(i)] for i in indices], dtype=bool)

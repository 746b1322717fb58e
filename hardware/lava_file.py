"""The Lava export file: a ``LavaProgram`` in one HDF5 file that a Lava host loads with h5py and numpy alone.

    save_program(path, program)  ->  content hash;   load_program(path)  ->  LavaProgram

Format ``ebm-lava-program``, version 1, with the toolkit's common header (``format``, ``version``, ``created``,
``toolkit_version``, ``content_hash``: SHA-256 over the datasets and the hashed attributes, the algorithm of
docs/formats.md). Files are written by ``ebm_sim.storage.write_artifact`` (atomic: temporary file, fsync, rename), so
``ebm info`` and ``storage.read_artifact`` read them like every artifact; the *loader* here re-implements the
documented hash check instead of importing ``ebm_sim.storage``, so that a Lava host needs no part of the simulator
(only this file, hardware/program.py and hardware/lava_processes/). Schema: docs/hardware.md.

Loads refuse a missing, non-HDF5, corrupt, wrong-format, wrong-version or tampered file with ``LavaFileError`` (a
ValueError) naming the problem.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np

from .program import LavaProgram

FORMAT = "ebm-lava-program"
VERSION = 1
_UNHASHED = ("created", "toolkit_version", "content_hash")
_INT_LISTS = ("layer_sizes", "shifts", "forward_exps", "backward_exps", "weight_bits", "field_bits")
_SCALARS = ("kind", "dt", "steps", "tol", "dt_mantissa", "frac_bits", "network_hash")


class LavaFileError(ValueError):
    """A file that cannot be loaded as a Lava export."""


def content_hash(datasets: dict, attrs: dict) -> str:
    """SHA-256 of docs/formats.md: for each dataset by sorted name, name NUL dtype.str NUL shape NUL bytes NUL; then
    the canonical JSON (sorted keys) of the hashed attributes (all but created, toolkit_version, content_hash)."""
    h = hashlib.sha256()
    for name in sorted(datasets):
        array = np.ascontiguousarray(datasets[name])
        h.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        h.update(array)
        h.update(b"\0")
    h.update(json.dumps({k: v for k, v in attrs.items() if k not in _UNHASHED}, sort_keys=True).encode())
    return h.hexdigest()


def _plain(value):
    """An HDF5 attribute as the plain Python value it was written from (int arrays -> lists, bytes -> str)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    return value


def save_program(path, program: LavaProgram) -> str:
    """Write ``program`` atomically to ``path`` (replacing it); returns the file's content hash.

    datasets  weights/W{k} (n_{k+1}, n_k): int32 8-bit mantissas (fixed) or float64 (float), k = 0..L-1
              biases/b{k} (n_k,): int32 in units 2^-field_bits[k-1] (fixed) or float64, k = 1..L
    attrs     kind, layer_sizes, shifts, dt, steps, tol, forward_exps, backward_exps, dt_mantissa, frac_bits,
              weight_bits, field_bits, network_hash, program_hash, topology (JSON list of Dense processes), notes
              (JSON), plus the common header.
    """
    if not isinstance(program, LavaProgram):
        raise ValueError(f"save_program needs a LavaProgram, got {type(program).__name__}")
    if hasattr(program, "links"):  # hardware.layered_program.LayeredProgram (not imported: a host needs no scipy)
        raise ValueError("the ebm-lava-program format (version 1) holds chains of dense layers; a convolutional "
                         "(layered) program cannot be exported yet: run it with hardware.lava_run.run_lava")
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: directory {path.parent} does not exist")
    described = program.describe()
    datasets = {f"weights/W{k}": np.ascontiguousarray(w) for k, w in enumerate(program.weights)}
    datasets.update({f"biases/b{k + 1}": np.ascontiguousarray(b) for k, b in enumerate(program.biases)})
    attrs = {**{key: described[key] for key in _INT_LISTS + _SCALARS},
             "program_hash": program.content_hash(), "topology": json.dumps(described["topology"], sort_keys=True),
             "notes": json.dumps(program.notes, sort_keys=True)}
    from ebm_sim import storage  # the toolkit's writer (atomic, common header); reading needs none of ebm_sim

    from . import formats  # noqa: F401  (registers the format with it)
    return storage.write_artifact(path, FORMAT, datasets, attrs)


def _check_plain(path: Path, found: dict) -> None:
    """Before reading: every dataset plain (numbers, compact or contiguous, unfiltered, fully written, in the file)
    and all of them together no larger than the file, so that a small forged file cannot exhaust memory (the rule of
    ``ebm_sim.storage.check_stored_sizes``, restated here for hosts without ebm_sim)."""
    for name, obj in found.items():
        plist = obj.id.get_create_plist()
        if (obj.dtype.kind not in "biufS" or plist.get_layout() not in (h5py.h5d.COMPACT, h5py.h5d.CONTIGUOUS)
                or plist.get_nfilters() or plist.get_external_count() or obj.id.get_storage_size() != obj.nbytes):
            raise LavaFileError(f"{path}: dataset {name!r} is not a plain, fully stored array: not a Lava export")
    if sum(obj.nbytes for obj in found.values()) > path.stat().st_size:
        raise LavaFileError(f"{path}: its datasets declare more bytes than the file holds: not a Lava export")


def _read(path: Path) -> tuple[dict, dict]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with h5py.File(path, "r") as f:
            attrs = {key: _plain(value) for key, value in f.attrs.items()}
            found = {}
            f.visititems(lambda name, obj: found.__setitem__(name, obj) if isinstance(obj, h5py.Dataset) else None)
            _check_plain(path, found)
            datasets = {name: obj[...] for name, obj in found.items()}
    except OSError as e:
        raise LavaFileError(f"{path} is not a readable HDF5 file (corrupt, truncated or another kind of file): "
                            f"{e}") from e
    return datasets, attrs


def load_program(path) -> LavaProgram:
    """Read a Lava export written by ``save_program``; the program is checked again (shapes, integer ranges,
    exponents) as it is rebuilt."""
    path = Path(path)
    datasets, attrs = _read(path)
    if attrs.get("format") != FORMAT:
        raise LavaFileError(f"{path} is not a Lava export (format {attrs.get('format')!r}, expected {FORMAT!r})")
    if attrs.get("version") != VERSION:
        raise LavaFileError(f"{path}: unsupported {FORMAT} version {attrs.get('version')!r} (this reader: {VERSION})")
    if attrs.get("content_hash") != content_hash(datasets, attrs):
        raise LavaFileError(f"{path}: content hash mismatch, the file was modified or is corrupt")
    try:
        num = len(attrs["layer_sizes"]) - 1
        weights = tuple(datasets[f"weights/W{k}"] for k in range(num))
        biases = tuple(datasets[f"biases/b{k}"] for k in range(1, num + 1))
        program = LavaProgram(attrs["kind"], tuple(attrs["layer_sizes"]), weights, biases, tuple(attrs["shifts"]),
                              float(attrs["dt"]), int(attrs["steps"]), float(attrs["tol"]),
                              forward_exps=tuple(attrs["forward_exps"]), backward_exps=tuple(attrs["backward_exps"]),
                              dt_mantissa=int(attrs["dt_mantissa"]), frac_bits=int(attrs["frac_bits"]),
                              weight_bits=tuple(attrs["weight_bits"]), field_bits=tuple(attrs["field_bits"]),
                              network_hash=attrs["network_hash"], notes=json.loads(attrs["notes"]))
    except (KeyError, TypeError, ValueError) as e:  # a missing dataset or attribute, or values the program refuses
        raise LavaFileError(f"{path}: malformed {FORMAT} file ({type(e).__name__}: {e})") from e
    if program.content_hash() != attrs.get("program_hash"):
        raise LavaFileError(f"{path}: program hash mismatch: not written by this exporter")
    return program

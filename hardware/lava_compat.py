"""Python 3.11 compatibility fixes for lava-nc 0.10.0, applied at install time by ``make``.

lava-nc 0.10.0 declares ``python<3.11``. Two source lines need changing on this toolkit's Python (upstream has not
fixed either):

1. ``lava/magma/compiler/var_model.py``: the dataclass ``ByteEncoder`` is the default value of other dataclasses'
   fields, and Python 3.11 refuses unhashable (mutable) dataclass defaults, so the compiler fails to import.
   ``@dataclass(frozen=True)`` on ``ByteEncoder`` makes it hashable.
2. ``lava/magma/runtime/message_infrastructure/multiprocessing.py`` calls ``mp.set_start_method('fork')`` when it is
   imported, which raises "context has already been set" in any process that touched multiprocessing first (tqdm's
   progress-bar lock does): Lava could then not run after a progress bar. The patched line sets 'fork' (which Lava
   needs) only when it is not already the start method.

The patches are idempotent and touch nothing else. Run as a script (``python hardware/lava_compat.py``); it imports
nothing from lava.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Patch:
    """Replace ``broken`` by ``fixed`` (once) in ``relative_path`` under the installed ``lava`` package."""

    relative_path: Path
    broken: str
    fixed: str
    anchor: str  # a phrase that names what was expected, for the error message


BYTE_ENCODER = Patch(Path("magma") / "compiler" / "var_model.py",
                     "@dataclass\nclass ByteEncoder:", "@dataclass(frozen=True)\nclass ByteEncoder:",
                     "the ByteEncoder dataclass")
START_METHOD = Patch(Path("magma") / "runtime" / "message_infrastructure" / "multiprocessing.py",
                     "    mp.set_start_method('fork')\n",
                     "    if mp.get_start_method(allow_none=True) != 'fork':\n"
                     "        mp.set_start_method('fork', force=True)\n",
                     "the multiprocessing start-method call")
PATCHES = (BYTE_ENCODER, START_METHOD)

# the first fix, under the names the tests use
BROKEN, FIXED, RELATIVE_PATH = BYTE_ENCODER.broken, BYTE_ENCODER.fixed, BYTE_ENCODER.relative_path


def lava_root() -> Path:
    """The installed ``lava`` package folder (found without importing lava)."""
    spec = importlib.util.find_spec("lava")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("lava-nc is not installed in this interpreter: "
                           "pip install --no-deps --ignore-requires-python lava-nc==0.10.0")
    for root in spec.submodule_search_locations:
        if (Path(root) / RELATIVE_PATH).is_file():
            return Path(root)
    raise RuntimeError(f"lava is installed but {RELATIVE_PATH} was not found under "
                       f"{list(spec.submodule_search_locations)}")


def var_model_path() -> Path:
    """Location of lava's ``var_model.py`` in the running interpreter."""
    return lava_root() / RELATIVE_PATH


def patch_source(text: str, patch: Patch = BYTE_ENCODER) -> tuple[str, bool]:
    """Return (patched text, changed?). Raises if the text is neither broken nor already fixed."""
    if patch.fixed in text:
        return text, False
    if patch.broken not in text:
        raise RuntimeError(f"unexpected lava source: {patch.anchor} was not found in {patch.relative_path}; "
                           f"is this lava-nc 0.10.0?")
    return text.replace(patch.broken, patch.fixed, 1), True


def apply(path: Path | None = None, patch: Patch = BYTE_ENCODER) -> bool:
    """Patch one file in place (atomically; stale bytecode removed). Returns True if the file changed."""
    path = lava_root() / patch.relative_path if path is None else Path(path)
    new_text, changed = patch_source(path.read_text(), patch)
    if changed:
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(new_text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        for pyc in (path.parent / "__pycache__").glob(f"{path.stem}.*.pyc"):
            pyc.unlink()
    return changed


def apply_all() -> dict:
    """Apply every patch to the installed lava; returns {relative path: changed?}."""
    return {str(patch.relative_path): apply(None, patch) for patch in PATCHES}


if __name__ == "__main__":
    for name, changed in apply_all().items():
        print(f"lava compatibility fix: {'applied' if changed else 'already in place'} ({name})")
    sys.exit(0)

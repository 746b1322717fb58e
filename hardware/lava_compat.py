"""Python 3.11 compatibility fix for lava-nc 0.10.0, applied at install time.

lava-nc 0.10.0 declares ``python<3.11``. On 3.11 its compiler fails to import: in
``lava/magma/compiler/var_model.py`` the dataclass ``ByteEncoder`` is used as a default value of
other dataclasses' fields, and Python 3.11 refuses unhashable (mutable) dataclass defaults.
Declaring ``ByteEncoder`` as ``@dataclass(frozen=True)`` makes it hashable and fixes the import
(upstream has not fixed this). The patch is idempotent and touches nothing else.

Run as a script (``python hardware/lava_compat.py``) by ``make``; it imports nothing from lava.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

BROKEN = "@dataclass\nclass ByteEncoder:"
FIXED = "@dataclass(frozen=True)\nclass ByteEncoder:"
RELATIVE_PATH = Path("magma") / "compiler" / "var_model.py"


def var_model_path() -> Path:
    """Location of lava's ``var_model.py`` in the running interpreter (without importing lava)."""
    spec = importlib.util.find_spec("lava")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("lava-nc is not installed in this interpreter: "
                           "pip install --no-deps --ignore-requires-python lava-nc==0.10.0")
    for root in spec.submodule_search_locations:
        candidate = Path(root) / RELATIVE_PATH
        if candidate.is_file():
            return candidate
    raise RuntimeError(f"lava is installed but {RELATIVE_PATH} was not found under "
                       f"{list(spec.submodule_search_locations)}")


def patch_source(text: str) -> tuple[str, bool]:
    """Return (patched text, changed?). Raises if the file is neither broken nor already fixed."""
    if FIXED in text:
        return text, False
    if BROKEN not in text:
        raise RuntimeError("unexpected lava var_model.py: the ByteEncoder dataclass was not found; "
                           "is this lava-nc 0.10.0?")
    return text.replace(BROKEN, FIXED, 1), True


def apply(path: Path | None = None) -> bool:
    """Patch lava in place (atomically). Returns True if the file changed."""
    path = var_model_path() if path is None else Path(path)
    new_text, changed = patch_source(path.read_text())
    if changed:
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            handle.write(new_text)
        os.replace(tmp, path)
        # stale bytecode would still hold the broken class
        for pyc in (path.parent / "__pycache__").glob("var_model.*.pyc"):
            pyc.unlink()
    return changed


if __name__ == "__main__":
    changed = apply()
    print(f"lava compatibility fix: {'applied' if changed else 'already in place'} ({var_model_path()})")
    sys.exit(0)

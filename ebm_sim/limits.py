"""Sane limits checked before memory is allocated: a declared size (a layer width, an array shape in a file header)
is compared with the memory this process can still get, so that a typo or a forged header is refused with a clear
message instead of ending in a MemoryError traceback or the kernel's OOM killer.

    available_memory()                 -> bytes (MemAvailable, capped by the cgroup's limit where one is set)
    require_memory(nbytes, what, hint) -> None, or MemoryLimitError naming ``what`` and both sizes
"""
from __future__ import annotations

import os
from pathlib import Path


class MemoryLimitError(ValueError):
    """A declared size that does not fit in the memory available (refused before allocating it)."""


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not Linux
        return None


def _cgroup_room() -> int | None:
    """What the cgroup (v2) still allows this process tree, if it has a limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        return max(int(limit) - used, 0)
    except (OSError, ValueError):
        return None


def available_memory() -> int | None:
    """Bytes of memory this process can still allocate without swapping (None where the platform does not say)."""
    values = [v for v in (_meminfo_available(), _cgroup_room()) if v is not None]
    return min(values) if values else None


def require_memory(nbytes: int, what: str, hint: str = "") -> None:
    """Refuse (MemoryLimitError) ``what`` when its ``nbytes`` exceed the memory available."""
    from .outputs import format_bytes

    available = available_memory()
    if available is not None and int(nbytes) > available:
        raise MemoryLimitError(f"{what} needs {format_bytes(int(nbytes))} of memory but only "
                               f"{format_bytes(available)} are available{'; ' + hint if hint else ''}")

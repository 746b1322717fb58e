"""Where the toolkit writes: one policy for every file and folder it writes, and the atomic writer they all use.

The rules (README, "Outputs: one rule for every command that writes"):

1. **Checked before any work.** ``check_output(path, overwrite=..., resume=...)`` refuses, naming the problem: a
   missing parent folder, a parent that is not a folder or not writable (probed by creating a file there), an output
   that is a folder where a file is expected, an existing output without ``overwrite`` (or ``resume``, where the
   command continues an interrupted run), and ``resume`` together with ``overwrite``.
2. **One writer at a time.** ``exclusive(path)`` holds an advisory lock (``flock``) on ``.NAME.lock`` beside the
   output for as long as the command runs; a second writer of the same output (file or folder) is refused at once,
   naming the process that holds it. The lock file is removed when the holder ends (a killed holder's lock file is
   harmless: the kernel released its lock and the next writer takes it over). Locks are re-entrant within a process.
3. **Atomic writes.** ``atomic_path(path)`` creates ``.NAME.<pid>.<8 hex>.tmp`` in the target's folder and locks it
   (``flock``) while the caller writes it; then it is fsync'ed and renamed onto the target. On any exception (Ctrl-C
   included) the temporary file is removed and the target left as it was. Temporary files no writer holds (their
   process was killed with SIGKILL, say) are removed by the next write into that folder, and reported by
   ``check_output``; the lock, not only the process id, tells a live writer (in another PID namespace, or on
   another host of a filesystem with working ``flock``) from a dead one.
4. **Space.** ``require_space(path, nbytes)`` refuses a write that needs more than the free space of the target's
   filesystem before it starts; a disk that fills up during the write (another process, say) gives the same
   ``DiskFullError`` (no temporary file left, target intact) instead of the writer's own failure.
"""
from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
STALE_AFTER = 60.0  # seconds after which an unlocked temporary file is stale even if its process id is in use
WRITE_MARGIN = 64 * 1024  # bytes asked for beyond a write's size hint: the filesystem's blocks, small headers
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class OutputError(ValueError):
    """An output that cannot be written as asked: it exists, its folder is missing or read-only, another process is
    writing it. Raised before any work (``ebm: error``, exit status 2)."""


class DiskFullError(OSError):
    """A write refused or stopped because the target's filesystem has too little free space (``ebm: error``, exit
    status 1); the target is left as it was and no temporary file remains."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28]"
        return str(self.strerror)


def format_bytes(nbytes: float) -> str:
    """1536 -> '1.5 KB', 3e9 -> '3.0 GB' (powers of 1024)."""
    value = float(nbytes)
    for unit in ("bytes", "KB", "MB", "GB"):
        if abs(value) < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"  # pragma: no cover - the loop returns


def free_space(folder) -> int:
    """Bytes free to an unprivileged writer on the filesystem holding ``folder``."""
    return shutil.disk_usage(folder).free


def _disk_full(path: Path, needed: int | None, free: int) -> DiskFullError:
    need = f"it needs about {format_bytes(needed)}" if needed else "the disk filled up while it was written"
    return DiskFullError(errno.ENOSPC, f"no space left to write {path}: {need} and {format_bytes(free)} are free on "
                                       f"the filesystem of {path.parent}; {path.name} was left as it was. Free some "
                                       f"space (or write elsewhere) and run again")


def require_space(path, nbytes: int) -> None:
    """Refuse (DiskFullError) to write about ``nbytes`` bytes to ``path`` when its filesystem has less free space
    (plus WRITE_MARGIN); the previous file counts as free only once the new one replaces it, so it is not added."""
    path = Path(path)
    free = free_space(path.parent)
    needed = int(nbytes) + WRITE_MARGIN
    if needed > free:
        raise _disk_full(path, needed, free)


def is_disk_full(error: BaseException) -> bool:
    """Whether an exception (OSError from Python's I/O or h5py, RuntimeError from HDF5) reports a full disk."""
    if isinstance(error, OSError) and error.errno in _FULL_ERRNOS:
        return True
    return isinstance(error, (OSError, RuntimeError)) and "No space left on device" in str(error)


# ---------------------------------------------------------------------------------------------- temporary files
def _pid_running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


_CLEANED: set = set()  # folders whose stale temporary files this process has already removed


def _locked_by_a_writer(path: str) -> bool:
    """Whether a live writer holds the lock ``atomic_path`` keeps on its temporary file while it writes."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # a filesystem without flock: fall back on the process id alone
        return False
    finally:
        os.close(fd)  # also releases a lock just taken
    return False


def remove_stale_temps(folder, *, once: bool = False) -> list:
    """Remove the toolkit's temporary files (``.NAME.<pid>.<hex>.tmp``) in ``folder`` that no writer holds: unlocked
    (``atomic_path`` locks its file while writing) and either left by a process that no longer runs or older than
    STALE_AFTER seconds (a recycled process id). Returns their paths. ``once``: do nothing if this process already
    cleaned ``folder``."""
    folder = Path(folder)
    key = str(folder.resolve()) if folder.exists() else str(folder)
    if once and key in _CLEANED:
        return []
    _CLEANED.add(key)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = TEMP_PATTERN.match(entry.name)
        if match is None or _locked_by_a_writer(entry.path):
            continue
        try:
            fresh = now - entry.stat().st_mtime < STALE_AFTER
        except OSError:
            continue
        if fresh and _pid_running(int(match["pid"])):  # between a writer's open and its lock
            continue
        try:
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:  # removed meanwhile by another cleaner, or a read-only folder (check_output reports it)
            pass
    return removed


def temp_path(path: Path) -> Path:
    """The temporary name of a write to ``path``: ``.NAME.<pid>.<8 hex>.tmp`` in the same folder."""
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


@contextmanager
def atomic_path(path, size_hint: int | None = None):
    """Yield a temporary path next to ``path``; on success fsync it and rename it onto ``path``; on any exception
    remove it (the target is untouched). ``size_hint``: bytes about to be written, refused up front when the disk
    has less free space. A full disk during the write raises DiskFullError."""
    path = Path(path)
    if not path.parent.is_dir():
        raise OutputError(f"cannot write {path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder")
    remove_stale_temps(path.parent, once=True)
    if size_hint is not None:
        require_space(path, size_hint)
    import fcntl

    tmp = temp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as error:
        if is_disk_full(error):
            raise _disk_full(path, None, free_space(path.parent)) from None
        raise OutputError(f"cannot write {path}: {error.strerror or error}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # "a writer is here": remove_stale_temps leaves a locked file alone
        except OSError:  # a filesystem without flock: the process id in the name still protects it
            pass
        yield tmp
        os.fsync(fd)  # the same inode the caller wrote through its own handle
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if is_disk_full(error):
            raise _disk_full(path, size_hint + WRITE_MARGIN if size_hint else None,
                             free_space(path.parent)) from None
        raise
    finally:
        os.close(fd)


@contextmanager
def interrupts_deferred():
    """Hold Ctrl-C (SIGINT) until the block has finished, then deliver it: for a write that a C library drives through
    Python callbacks (h5py's file-object driver), where a KeyboardInterrupt raised inside a callback is lost or turned
    into an unrelated error (seen: the training went on; an AttributeError). The block's own exceptions pass as they
    are. Outside the main thread (no signal handlers there) the block runs as it is."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt here
            elif previous == signal.SIG_DFL:
                os.kill(os.getpid(), signal.SIGINT)


class RecordingFile:
    """A binary file opened for a writer that reports errors in its own words (h5py's file-object driver turns an
    OSError raised by ``write`` into "File close failed"): ``error`` keeps the last OSError that ``write`` or
    ``flush`` raised, so that the caller can re-raise the real one (ENOSPC). Other attributes are the file's."""

    def __init__(self, path, mode: str = "wb"):
        self._handle = open(path, mode)
        self.error: OSError | None = None

    def write(self, data):
        try:
            return self._handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self):
        try:
            return self._handle.flush()
        except OSError as error:
            self.error = error
            raise

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


# ---------------------------------------------------------------------------------------------- the output policy
def _probe_writable(folder: Path) -> None:
    """Create and remove a file in ``folder``: the only sure test that a later write will be allowed."""
    probe = folder / f".ebm-write-probe.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as error:
        if is_disk_full(error):
            raise _disk_full(probe, None, free_space(folder)) from None
        raise OutputError(f"cannot write into {folder}: {error.strerror or error}") from None
    os.close(fd)
    os.unlink(probe)


def check_output(path, *, overwrite: bool = False, resume: bool | None = None, kind: str = "file",
                 log=None) -> Path:
    """Apply the output policy (module docstring, rule 1) to ``path`` before any work and return it as a Path.

    kind: "file" or "folder" (a folder may exist: the command that owns it resumes or refreshes its contents).
    resume: None for a command that cannot resume; True/False for one that can (``--resume``). Stale temporary files
    of dead processes in the parent folder are removed, and reported through ``log`` when given.
    """
    path = Path(path)
    if kind not in ("file", "folder"):
        raise ValueError(f"kind must be 'file' or 'folder', got {kind!r}")
    if resume and overwrite:
        raise OutputError("--resume and --overwrite exclude each other: --resume continues the run saved in "
                          f"{path}, --overwrite starts over and replaces it")
    parent = path.parent
    if kind == "folder" and not path.exists() and parent != path:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"cannot create the output folder {path}: {error.strerror or error}") from None
    if not parent.exists():
        raise OutputError(f"cannot write {path}: folder {parent} does not exist (create it first)")
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: {parent} is not a folder")
    if kind == "file":
        if path.is_dir():
            raise OutputError(f"cannot write {path}: it is a folder; give a file name")
        if path.exists() and not (overwrite or resume):
            hint = "--resume to continue its run or --overwrite to start over" if resume is not None else \
                "--overwrite to replace it"
            raise OutputError(f"{path} exists: pass {hint} (or choose another output)")
        if resume and not path.exists():
            raise OutputError(f"--resume: no such file {path} (nothing to resume)")
    elif path.exists() and not path.is_dir():
        raise OutputError(f"cannot use {path} as the output folder: it is a file")
    _probe_writable(path if kind == "folder" and path.is_dir() else parent)
    for stale in remove_stale_temps(parent):
        if log is not None:
            log(f"note: removed {stale}, a temporary file left by a process that no longer runs")
    return path


# ---------------------------------------------------------------------------------------------- one writer at a time
_HELD: dict = {}  # lock path -> [fd, depth] of the locks this process holds


def lock_path(path) -> Path:
    """The advisory lock file of an output: ``.NAME.lock`` beside it."""
    path = Path(path)
    return path.parent / f".{path.name}.lock"


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process"
    since = time.strftime("%H:%M:%S", time.localtime(info.get("since", 0)))
    return f"process {info.get('pid')} (`{info.get('command', '?')}`, since {since})"


@contextmanager
def exclusive(path):
    """Hold the advisory lock of output ``path`` (a file or a folder) for the block; OutputError at once if another
    process holds it. Re-entrant within a process."""
    import fcntl

    lock = lock_path(path)
    key = str(lock.resolve()) if lock.parent.exists() else str(lock)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    if not lock.parent.is_dir():
        raise OutputError(f"cannot write {path}: folder {lock.parent} does not exist")
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise OutputError(f"cannot lock {path} for writing ({lock}): {error.strerror or error}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise OutputError(f"{path} is being written by {holder}: two writers would lose one's result; wait "
                              f"for it to finish or choose another output") from None
        try:  # the lock file may have been removed (and re-created) by its previous holder meanwhile: lock anew
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    info = {"pid": os.getpid(), "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])[:300],
            "since": time.time()}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(info).encode())
    _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        del _HELD[key]
        try:
            os.unlink(lock)  # while still holding it: a waiting opener re-checks the inode (above)
        except OSError:
            pass
        os.close(fd)


@contextmanager
def claim(path, *, overwrite: bool = False, resume: bool | None = None, kind: str = "file", log=None):
    """``check_output`` then ``exclusive``: the whole policy for one output, for the duration of the block. The
    existence check is repeated once the lock is held (another writer may have finished meanwhile)."""
    path = check_output(path, overwrite=overwrite, resume=resume, kind=kind, log=log)
    with exclusive(path):
        check_output(path, overwrite=overwrite, resume=resume, kind=kind)
        yield path


# ---------------------------------------------------------------------------------------------- the command line's face
# How a command treats an output it names:
#   "replace"  a file: refused if it exists, unless --overwrite
#   "resume"   a file holding a run's checkpoint: refused if it exists, unless --resume (continue) or --overwrite
#   "state"    a file the command keeps its own resumable progress in: may exist (it is continued)
#   "folder"   a folder the command owns: created if missing; its contents are resumed or refreshed
OUTPUT_POLICIES = ("replace", "resume", "state", "folder")


def add_output_argument(parser, *flags, policy: str = "replace", **kwargs):
    """``parser.add_argument(*flags, **kwargs)`` for an output, declared with its ``policy`` (OUTPUT_POLICIES) so that
    ``claim_outputs`` applies the rule before the command runs; adds ``--overwrite`` (and ``--resume`` for "resume")
    to the parser once."""
    if policy not in OUTPUT_POLICIES:
        raise ValueError(f"unknown output policy {policy!r}; choose one of {', '.join(OUTPUT_POLICIES)}")
    action = parser.add_argument(*flags, **kwargs)
    parser.set_defaults(_outputs=[*(parser.get_default("_outputs") or []), (action.dest, policy)])
    if policy in ("replace", "resume") and parser.get_default("overwrite") is None:
        parser.add_argument("--overwrite", action="store_true",
                            help="replace existing output files (without it, an existing output is refused)")
    if policy == "resume" and parser.get_default("resume") is None:
        parser.add_argument("--resume", action="store_true",
                            help="continue the interrupted run saved in the output file")
    return action


@contextmanager
def claim_outputs(args, log=None):
    """Apply the output rule to every output the parsed command line ``args`` declares (``add_output_argument``)
    and hold their locks while the block runs: a refusal comes before any work."""
    from contextlib import ExitStack

    overwrite, resume = bool(getattr(args, "overwrite", False)), bool(getattr(args, "resume", False))
    with ExitStack() as stack:
        for dest, policy in getattr(args, "_outputs", None) or ():
            value = getattr(args, dest, None)
            if value is None:
                continue
            if policy == "replace":
                stack.enter_context(claim(value, overwrite=overwrite, log=log))
            elif policy == "resume":
                stack.enter_context(claim(value, overwrite=overwrite, resume=resume, log=log))
            elif policy == "state":
                stack.enter_context(claim(value, overwrite=True, log=log))
            else:
                stack.enter_context(claim(value, kind="folder", log=log))
        yield

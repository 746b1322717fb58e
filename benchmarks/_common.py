"""What every benchmark script shares: timing, one process per group of measurements, writing the JSON result."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

# The timing helpers live in the library (hardware.timing, shared with `ebm hardware compare`). benchmarks/hardware.py
# has the package's name, so import the package with this folder off the path for a moment.
_HERE = Path(__file__).resolve().parent
_SAVED_PATH = list(sys.path)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
try:
    from hardware.timing import wall_times  # noqa: F401,E402
finally:
    sys.path[:] = _SAVED_PATH


def run_groups(script: str, groups, arguments: list) -> dict:
    """Run ``script --group NAME *arguments`` in a fresh process per group and collect the JSON each prints last.

    One process per group: torch's OpenMP threads and OpenBLAS's threads keep spinning for a while after a call, so
    timing one library right after another in the same process slows the second (measured: the Numba relaxation up
    to 1.9x slower right after torch calls)."""
    results = {}
    for group in groups:
        # stdout carries the group's JSON; its stderr (progress, logs, a traceback) goes straight to ours, so a long
        # group shows how far it is
        done = subprocess.run([sys.executable, script, "--group", group, *arguments], stdout=subprocess.PIPE,
                              text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"benchmark group {group!r} failed (exit status {done.returncode}; its error is above)")
        results[group] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


RESULTS = _HERE / "results"
SHARED_DATA = _HERE.parents[1] / "shared" / "data"  # the real data sets beside the repository (../shared/data)


def output_path(name: str, quick: bool, out=None) -> Path:
    """Where a benchmark writes its JSON: ``out``, else benchmarks/results/NAME.json (a full run) or
    benchmarks/results/quick/NAME.json (--quick). A quick run never writes over the recorded full results:
    SystemExit naming them, before any work."""
    full = RESULTS / f"{name}.json"
    path = Path(out) if out else (RESULTS / "quick" / f"{name}.json" if quick else full)
    if quick and path.resolve() == full.resolve():
        raise SystemExit(f"--quick never writes over the recorded full results ({full}); give another --out")
    return path


def write_results(results: dict, out) -> None:
    """Write the JSON atomically to ``out`` and print it as the last line."""
    from ebm_sim.storage import write_json

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, results)
    print(json.dumps(results))


def seconds_of(function) -> float:
    """Wall-clock seconds of one call of ``function()``."""
    start = time.perf_counter()
    function()
    return time.perf_counter() - start

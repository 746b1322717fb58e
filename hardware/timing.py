"""Timing and energy metering shared by ``ebm hardware compare``, benchmarks/hardware.py and benchmarks/_common.py.

Protocol (the one the benchmarks use): latency per sample at batch 1 is the mean over single-sample calls on
*different* images after one warm-up call; throughput is the median of repeated calls on one large batch. Each
library is timed in its own process (``run_isolated``): torch's OpenMP threads and OpenBLAS's threads keep spinning
after a call and slow whatever runs next in the same process.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

RAPL_ROOT = Path("/sys/class/powercap")


def wall_times(fn, repeats: int) -> list:
    """Seconds of ``repeats`` calls of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def per_sample_latency(fn, images, count: int) -> float:
    """Mean seconds of fn(images[i:i+1]) over ``count`` different images (after a warm-up call); images (N, ...)."""
    count = min(count, len(images))
    if count < 1:
        raise ValueError("per_sample_latency needs at least one image")
    fn(images[:1])
    start = time.perf_counter()
    for i in range(count):
        fn(images[i:i + 1])
    return (time.perf_counter() - start) / count


def _rapl_counters() -> list:
    """Package-level RAPL energy counters (intel-rapl:N/energy_uj) that this process can read."""
    readable = []
    for counter in sorted(RAPL_ROOT.glob("intel-rapl:*/energy_uj")):
        if counter.parent.name.count(":") != 1:  # sub-domains (core, dram) are inside the package
            continue
        try:
            int(counter.read_text())
        except (OSError, ValueError):
            continue
        readable.append(counter)
    return readable


class EnergyMeter:
    """CPU package energy from RAPL over a block of code, where the kernel exposes it to this user.

    with EnergyMeter() as meter: work(); meter.joules -> float, or None (``meter.reason`` says why)."""

    def __init__(self):
        self.counters = _rapl_counters()
        self.joules = None
        self.reason = None if self.counters else f"no readable RAPL energy counter under {RAPL_ROOT}"

    def _read(self) -> list:
        return [int(c.read_text()) for c in self.counters]

    def __enter__(self):
        self._start = self._read() if self.counters else None
        return self

    def __exit__(self, *exc):
        if self.counters:
            end = self._read()
            # a counter that wrapped around is left out (max_energy_range_uj would be needed to correct it)
            delta = [e - s for s, e in zip(self._start, end) if e >= s]
            self.joules = sum(delta) * 1e-6 if delta else None
            if self.joules is None:
                self.reason = "the RAPL counter wrapped around during the measurement"
        return False


def run_isolated(module: str, payload: dict, timeout: float | None = None) -> dict:
    """Run ``python -m module`` in a fresh process with ``payload`` as JSON on stdin; return the JSON object it
    prints as its last stdout line. A failing child raises RuntimeError with the end of its stderr."""
    done = subprocess.run([sys.executable, "-m", module], input=json.dumps(payload), capture_output=True, text=True,
                          timeout=timeout, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{module} failed (exit status {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])

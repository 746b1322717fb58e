"""benchmarks/hardware.py runs end to end in quick mode and writes what the issue asks for (no timing assertions)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_hardware_benchmark_quick(tmp_path):
    out = tmp_path / "hardware.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hardware.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text()) and printed["quick"] is True
    assert printed["lava_float_agreement"] >= 0.99
    assert printed["lava_fixed_acc_drop"] <= 2.0  # points, on 120 digits images
    assert printed["lava_ms_per_step"] > 0
    names = [t["name"] for t in printed["targets"]]
    assert names[:2] == ["numba_cpu", "torch_cpu"] and "lava_fixed" in names and "loihi_estimate" in names
    for target in printed["targets"]:
        assert {"name", "latency_ms_batch1", "samples_per_s", "energy_uj", "energy_kind"} <= set(target)
        if target["measured"] or target.get("estimated"):
            assert target["latency_ms_batch1"] > 0 and target["samples_per_s"] > 0
        else:
            assert target["latency_ms_batch1"] is None and target["reason"]
    estimate = next(t for t in printed["targets"] if t["name"] == "loihi_estimate")
    assert estimate["energy_kind"] == "estimated" and "ESTIMATE" in estimate["energy_note"]
    assert printed["cases"]["digits"]["failed"] == []

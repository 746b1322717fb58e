"""``ebm hardware export | run | estimate | compare | cost-table``: outputs, files written, and user errors (exit 2)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ebm_cli.main import main
from ebm_sim import storage
from ebm_sim.network import Network

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "benchmarks" / "results" / "networks" / "digits_64-256-10.h5")


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("ebm: error: "), err
    return err


def test_export_run_and_estimate(tmp_path, capsys):
    program = tmp_path / "digits.lava.h5"
    assert main(["hardware", "export", DIGITS, "-o", str(program)]) == 0
    out = capsys.readouterr().out
    assert "fixed Lava program of 64-256-10" in out and "weight exponents" in out
    report = tmp_path / "run.json"
    assert main(["hardware", "run", str(program), "--dataset", "digits", "--limit", "30", "--no-progress",
                 "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "Lava fixed (fixed_pt) run of 64-256-10 on 30 digits test samples" in out
    r = json.loads(report.read_text())
    assert r["simulator"] == {"agreement": 1.0, "max_output_difference": 0.0, "same_steps": 1.0}
    assert main(["hardware", "run", DIGITS, "--kind", "float", "--dataset", "digits", "--limit", "20",
                 "--no-progress"]) == 0
    assert "vs Numba fixed_point: same prediction 100.00%" in capsys.readouterr().out
    estimate = tmp_path / "estimate.json"
    assert main(["hardware", "estimate", str(program), "--dataset", "digits", "--limit", "50",
                 "--json", str(estimate)]) == 0
    out = capsys.readouterr().out
    assert "ESTIMATE, not a measurement" in out and "Loihi (1st generation)" in out
    e = json.loads(estimate.read_text())
    assert e["kind"] == "estimated" and e["energy_uj"] > 0 and e["samples"] == 50


def test_cost_table_is_printed_and_replaceable(tmp_path, capsys):
    table = tmp_path / "table.json"
    assert main(["hardware", "cost-table", "-o", str(table)]) == 0
    data = json.loads(table.read_text())
    assert data["synaptic_op_pj"] == 23.6
    data.update(chip="My chip", neuron_update_pj=1.0)
    table.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["hardware", "estimate", DIGITS, "--dataset", "digits", "--limit", "20",
                 "--cost-table", str(table)]) == 0
    assert "My chip" in capsys.readouterr().out


def test_user_errors_exit_with_status_2(tmp_path, capsys):
    assert main(["hardware", "run", str(tmp_path / "missing.h5"), "--dataset", "digits"]) == 2
    assert "no such file" in _error(capsys)
    program = tmp_path / "p.h5"
    assert main(["hardware", "export", DIGITS, "-o", str(program)]) == 0
    capsys.readouterr()
    assert main(["hardware", "run", str(program), "--dataset", "digits", "--dt", "0.5"]) == 2
    assert "is a Lava export" in _error(capsys)
    readout = tmp_path / "readout.h5"
    storage.save_network(readout, Network.init((64, 8, 10), seed=0, readout=True))
    assert main(["hardware", "export", str(readout), "-o", str(tmp_path / "r.h5")]) == 2
    assert "softmax readout" in _error(capsys)
    assert main(["hardware", "export", DIGITS, "--kind", "float", "--frac-bits", "12", "-o", str(program)]) == 2
    assert "exists: pass --overwrite" in _error(capsys)  # the output rule comes first
    assert main(["hardware", "export", DIGITS, "--kind", "float", "--frac-bits", "12", "-o", str(program),
                 "--overwrite"]) == 2
    assert "apply to --kind fixed only" in _error(capsys)
    assert main(["hardware", "run", str(program), "--dataset", "fashion-mnist", "--data-dir", str(tmp_path)]) == 2
    _error(capsys)
    bad_table = tmp_path / "bad.json"
    bad_table.write_text("[]")
    assert main(["hardware", "estimate", DIGITS, "--dataset", "digits", "--cost-table", str(bad_table)]) == 2
    assert "needs the keys" in _error(capsys)
    assert main(["hardware", "compare", DIGITS, "--dataset", "digits", "--targets", "numba_cpu,abacus"]) == 2
    assert "unknown target(s) abacus" in capsys.readouterr().err
    assert main(["hardware", "compare", DIGITS, "--dataset", "digits", "--json", str(tmp_path / "no" / "x.json")]) == 2
    assert "does not exist" in _error(capsys)
    assert main(["hardware", "compare", DIGITS, "--dataset", "digits", "--student", str(tmp_path / "s.h5")]) == 2
    assert "no such file" in _error(capsys)


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("student")
    fixed_points, path = folder / "fp.h5", folder / "student.h5"
    assert main(["relax", DIGITS, "--dataset", "digits", "--split", "train", "--limit", "400", "--max-steps", "30",
                 "--no-progress", "-o", str(fixed_points)]) == 0
    assert main(["distill", DIGITS, str(fixed_points), "--epochs", "3", "--no-progress", "-o", str(path)]) == 0
    return str(path)


def test_compare_writes_a_table_json_and_chart(tmp_path, capsys, student):
    result, chart = tmp_path / "compare.json", tmp_path / "compare.png"
    targets = "numba_cpu,torch_cuda,student_onnxruntime_cpu,lava_fixed,loihi_estimate"
    assert main(["hardware", "compare", DIGITS, "--dataset", "digits", "--limit", "40", "--student", student,
                 "--targets", targets, "--latency-samples", "10", "--repeats", "2", "--batch", "64",
                 "--json", str(result), "--plot", str(chart), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "EBM, Numba CPU" in out and "Loihi (cost model) *" in out and "ESTIMATE, not a measurement" in out
    rows = {row["name"]: row for row in json.loads(result.read_text())["targets"]}
    assert list(rows) == targets.split(",")
    for name in ("numba_cpu", "student_onnxruntime_cpu", "lava_fixed"):
        row = rows[name]
        assert row["measured"] and row["latency_ms_batch1"] > 0 and row["samples_per_s"] > 0
        assert row["n_samples"] == 40 and row["energy_kind"] in ("measured", "unknown")
    assert rows["numba_cpu"]["agreement"] == 1.0 and rows["numba_cpu"]["batch"] == 64
    assert rows["lava_fixed"]["batch"] == 1 and rows["lava_fixed"]["agreement"] >= 0.95
    assert rows["lava_fixed"]["steps_mean"] == pytest.approx(rows["loihi_estimate"]["steps_mean"])
    estimate = rows["loihi_estimate"]
    assert estimate["energy_kind"] == "estimated" and estimate["energy_uj"] > 0
    assert "ESTIMATE" in estimate["energy_note"]
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        assert rows["torch_cuda"] == {"name": "torch_cuda", "label": "EBM, torch CUDA", "measured": False,
                                      "reason": "no CUDA device here"}
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp*"))
    assert np.isfinite(rows["student_onnxruntime_cpu"]["accuracy"])


def test_targets_of_a_network_that_does_not_quantize_are_listed_as_not_measured(tmp_path):
    from hardware.targets import CompareSpec, measure

    net = Network.init((64, 16, 10), seed=0)
    w = np.full_like(net.weights[0], 1e-4)
    w[0, 0] = 1.0  # one large weight: the others round to 0 at 8 bits
    path = tmp_path / "outlier.h5"
    storage.save_network(path, Network([w, net.weights[1]], net.biases))
    spec = CompareSpec(network=str(path), dataset="digits", limit=20)
    for name in ("lava_fixed", "loihi_estimate"):
        row = measure(name, spec)
        assert not row["measured"] and "does not quantize" in row["reason"]

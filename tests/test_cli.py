"""The `ebm` command line: init -> relax -> info, resumable relax, clear errors (exit 2), and the demo."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import ebm_sim.relax as relax_module
from ebm_cli.main import main
from ebm_sim import demo, storage
from ebm_sim.batch_relax import partial_path


@pytest.fixture(scope="module")
def net_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("net") / "net.h5"
    assert main(["init", "--layers", "64,32,10", "--seed", "3", "--gain", "0.5", "-o", str(path)]) == 0
    return path


def _relax_args(net_path, out, *extra):
    return ["relax", str(net_path), "--dataset", "digits", "--limit", "100", "--batch-size", "16",
            "--no-progress", "-o", str(out), *extra]


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("ebm: error: ") or "\nebm: error: " in err, err
    assert "Traceback" not in err
    return err


def test_help_via_subprocess():
    script = Path(sys.executable).parent / "ebm"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "ebm_cli"]
    proc = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for command in ("init", "relax", "info", "demo"):
        assert command in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "ebm_cli", "relax", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "--method" in proc.stdout and "partial" in proc.stdout


def test_init_relax_info(net_path, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "fp.h5"
    assert main(_relax_args(net_path, out, "--tol", "1e-5")) == 0
    text = capsys.readouterr().out
    assert "relaxed 100 samples of digits" in text and "converged:" in text and "accuracy:" in text
    assert "chance level" in text and str(out) in text

    network = storage.load_network(net_path)
    fp = storage.load_fixed_points(out, network=network)
    assert len(fp) == 100 and fp.layer_sizes == (64, 32, 10)
    assert fp.settings["dataset"] == "digits" and fp.settings["split"] == "test" and fp.settings["limit"] == 100
    assert fp.settings["method"] == "fixed_point" and fp.settings["tol"] == 1e-5
    assert fp.network_hash == network.content_hash()
    assert fp.converged.all() and fp.residuals.max() < 1e-5
    assert not partial_path(out).exists()
    assert not list(tmp_path.glob(".*"))  # no temporary files left

    assert main(["info", str(out), str(net_path)]) == 0
    text = capsys.readouterr().out
    assert "ebm-fixed-points" in text and "ebm-network" in text and "hash:     ok" in text
    assert "converged: 100/100" in text


def test_relax_other_methods_and_dtype(net_path, tmp_path, capsys):
    out = tmp_path / "fp64.h5"
    assert main(_relax_args(net_path, out, "--method", "euler", "--dt", "0.25", "--dtype", "float64",
                            "--limit", "20", "--split", "train")) == 0
    fp = storage.load_fixed_points(out)
    assert fp.states[0].dtype == np.float64 and len(fp) == 20
    assert fp.settings["dt"] == 0.25 and fp.settings["dtype"] == "float64" and fp.settings["split"] == "train"
    # the stored hash is the network file's (the float64 copy differs only in precision; see settings["dtype"])
    assert fp.network_hash == storage.load_network(net_path).content_hash()


class _Interrupt:
    """Wraps relax: counts calls and raises KeyboardInterrupt on call number ``at`` (None: never)."""

    def __init__(self, at=None):
        self.calls, self.at, self.real = 0, at, relax_module.relax

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.at is not None and self.calls == self.at:
            raise KeyboardInterrupt
        return self.real(*args, **kwargs)


def test_resume_after_interruption(net_path, tmp_path, monkeypatch, capsys):
    reference = tmp_path / "ref.h5"
    assert main(_relax_args(net_path, reference)) == 0

    out = tmp_path / "fp.h5"
    wrapper = _Interrupt(at=4)  # batches 1-3 finish (checkpoint after 2), Ctrl-C during the 4th
    monkeypatch.setattr(relax_module, "relax", wrapper)
    assert main(_relax_args(net_path, out, "--checkpoint-every", "2")) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    assert not out.exists()  # nothing under the final name
    with np.load(partial_path(out)) as z:
        assert int(z["done"]) == 48 and z["s1"].shape == (48, 32)

    # a different run (other tolerance) does not pick up this partial file
    other = _Interrupt(at=1)
    monkeypatch.setattr(relax_module, "relax", other)
    assert main(_relax_args(net_path, out, "--tol", "1e-3")) == 130
    assert "different run" in capsys.readouterr().err
    with np.load(partial_path(out)) as z:  # interrupted before finishing a batch: nothing saved
        assert int(z["done"]) == 48

    resumed = _Interrupt()
    monkeypatch.setattr(relax_module, "relax", resumed)
    assert main(_relax_args(net_path, out, "--checkpoint-every", "2")) == 0
    captured = capsys.readouterr()
    assert "resuming" in captured.err and "resumed after 48 samples" in captured.out
    assert resumed.calls == 4  # 100 samples in batches of 16: 7 batches, 3 were done
    assert not partial_path(out).exists()
    a, b = storage.load_fixed_points(out), storage.load_fixed_points(reference)
    for s, t in zip(a.states, b.states):
        np.testing.assert_array_equal(s, t)
    for name in ("inputs", "labels", "residuals", "steps", "converged"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.settings == b.settings
    assert not list(tmp_path.glob(".*"))


def test_divergence_stops_with_status_1(net_path, tmp_path, monkeypatch, capsys):
    real = relax_module.relax
    calls = []

    def diverging(*args, **kwargs):
        calls.append(1)
        result = real(*args, **kwargs)
        if len(calls) == 2:
            result.diverged[3] = True
        return result

    monkeypatch.setattr(relax_module, "relax", diverging)
    out = tmp_path / "fp.h5"
    assert main(_relax_args(net_path, out)) == 1
    err = _error(capsys)
    assert "diverged" in err and "[19]" in err and "--dt" in err
    assert not out.exists()
    with np.load(partial_path(out)) as z:
        assert int(z["done"]) == 16


def test_user_errors_exit_2(net_path, tmp_path, capsys):
    capsys.readouterr()
    out = str(tmp_path / "fp.h5")

    mnist_net = tmp_path / "mnist_net.h5"
    assert main(["init", "--layers", "784,10", "-o", str(mnist_net)]) == 0
    capsys.readouterr()
    assert main(_relax_args(mnist_net, out)) == 2
    err = _error(capsys)
    assert "takes 784 inputs" in err and "64 features" in err

    assert main(_relax_args(tmp_path / "missing.h5", out)) == 2
    assert "no such file" in _error(capsys)

    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"this is not an HDF5 file" * 10)
    assert main(_relax_args(garbage, out)) == 2
    assert "not an HDF5 file" in _error(capsys)
    assert main(["info", str(garbage)]) == 2
    assert "not an HDF5 file" in _error(capsys)

    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(net_path.read_bytes()[:1000])
    assert main(["info", str(truncated)]) == 2
    assert "corrupt or truncated" in _error(capsys)

    assert main(["relax", str(net_path), "--dataset", "imagenet", "-o", out]) == 2
    assert "unknown dataset 'imagenet'" in _error(capsys)

    assert main(["relax", str(net_path), "--dataset", "mnist", "--data-dir", str(tmp_path / "nowhere"),
                 "-o", out]) == 2
    assert "not found" in _error(capsys)

    assert main(_relax_args(net_path, out, "--tol", "-1")) == 2
    assert "tol must be" in _error(capsys)
    assert main(_relax_args(net_path, tmp_path / "no_dir" / "fp.h5")) == 2
    assert "does not exist" in _error(capsys)
    assert main(["relax", str(net_path), "--dataset", "digits", "-o", str(net_path)]) == 2
    assert "exists: pass --overwrite" in _error(capsys)
    assert main(["relax", str(net_path), "--dataset", "digits", "-o", str(net_path), "--overwrite"]) == 2
    assert "network file itself" in _error(capsys)

    assert main(["init", "--layers", "64,x", "-o", out]) == 2  # argparse usage error
    assert main(["relax", str(net_path), "--dataset", "digits", "--method", "leapfrog", "-o", out]) == 2
    assert main([]) == 2
    assert not Path(out).exists()
    capsys.readouterr()

    # a tampered file: info reports the hash mismatch (status 1), relax refuses it (status 2)
    tampered = tmp_path / "tampered.h5"
    tampered.write_bytes(net_path.read_bytes())
    with h5py.File(tampered, "r+") as f:
        f["weights/W0"][0, 0] += 1.0
    assert main(["info", str(tampered)]) == 1
    assert "mismatch" in capsys.readouterr().out
    assert main(_relax_args(tampered, out)) == 2
    assert "content hash mismatch" in _error(capsys)


def test_demo_writes_three_artifacts(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    assert main(["demo", "--out-dir", str(out_dir)]) == 0
    text = capsys.readouterr().out
    for method in ("fixed_point", "euler", "alternating", "rk45", "solve_ivp"):
        assert f"  {method} " in text
    assert "decreased monotonically" in text and "UNTRAINED" in text
    assert text.count("hash:     ok") == 3
    network = storage.load_network(out_dir / "network.h5")
    fp = storage.load_fixed_points(out_dir / "fixed_points.h5", network=network)
    traj = storage.load_trajectory(out_dir / "trajectory.h5", network=network)
    assert len(fp) == 360 and fp.converged.all()
    assert traj.states[0].shape[1:] == (8, 256)
    assert not partial_path(out_dir / "fixed_points.h5").exists()


def test_demo_results(tmp_path):
    res = demo.run_demo(tmp_path, ivp_samples=2, trajectory_samples=3)
    rows = {r["method"]: r for r in res["methods"]}
    assert set(rows) == {"fixed_point", "euler", "alternating", "rk45", "solve_ivp"}
    assert res["network"]["hessian_min_eig"] > 0  # unique fixed point: every method must find it
    for r in rows.values():
        assert r["converged_fraction"] == 1.0 and r["diverged"] == 0
        assert r["max_diff"] < 1e-4
    e = res["energy"]
    assert e["decreased"] and all(last < first for first, last in zip(e["first"], e["last"]))
    assert 0.0 <= res["relax"]["accuracy"] <= 1.0
    assert res["file_vs_memory_max_diff"] < 1e-5
    assert partial_path(res["paths"]["fixed_points"]).name == "fixed_points.h5.partial.npz"


def test_relax_a_network_with_a_softmax_readout(tmp_path):
    """A cross-entropy network relaxes only its hidden layers; predictions come from the readout's logits."""
    from ebm_sim import storage
    from ebm_sim.network import Network
    net_path, out = tmp_path / "ce.h5", tmp_path / "fp.h5"
    network = Network.init((64, 32, 16, 10), seed=0, readout=True)
    storage.save_network(net_path, network)
    assert main(["relax", str(net_path), "--dataset", "digits", "--limit", "50", "--no-progress",
                 "-o", str(out)]) == 0
    fixed_points = storage.load_fixed_points(out, network)
    assert [s.shape[1] for s in fixed_points.states] == [32, 16]

"""Layered (convolutional) networks through the artifact path: `ebm relax` writes their fixed points with their
shapes (ebm-fixed-points version 2), defaults to the network's stored deployment, resumes; relaxations record
trajectories on every backend, stored as ebm-trajectory version 2."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

import ebm_sim.relax as relax_module
from ebm_cli.main import main
from ebm_sim import storage
from ebm_sim.batch_relax import partial_path, relax_settings_of
from ebm_sim.deployment import Deployment
from ebm_sim.model import LayeredNetwork
from ebm_sim.model.dynamics import relax as relax_layered
from ebm_sim.model.energy import parameters
from ebm_sim.relax_types import MAX_TRAJECTORY_BYTES
from ebm_sim.storage import ArtifactError

ARCH = "1x8x8, conv 4 k3 p1 maxpool, conv 6 k3 s2, readout 10"


def _network(dtype=np.float32) -> LayeredNetwork:
    return LayeredNetwork.init(ARCH, seed=1, dtype=dtype, gain=2.0)


def _digits(limit=40):
    from ebm_sim import datasets
    ds = datasets.load_dataset("digits", limit_test=limit)
    return ds.x_test.reshape((-1, 1, 8, 8)), ds.y_test


@pytest.fixture()
def conv_file(tmp_path):
    path = tmp_path / "conv.h5"
    storage.save_network(path, _network())
    return path


def _relax_args(network_path, out, *extra):
    return ["relax", str(network_path), "--dataset", "digits", "--limit", "40", "--batch-size", "16",
            "--no-progress", "-o", str(out), *extra]


def test_conv_fixed_points_keep_their_shapes_and_equal_the_relaxation(conv_file, tmp_path, capsys):
    out = tmp_path / "fp.h5"
    assert main(_relax_args(conv_file, out)) == 0
    assert "settings: the defaults for an untrained network" in capsys.readouterr().out
    network = storage.load_network(conv_file)
    fp = storage.load_fixed_points(out, network=network)
    assert fp.inputs.shape == (40, 1, 8, 8) and [s.shape for s in fp.states] == [(40, 4, 4, 4), (40, 6, 1, 1)]
    assert fp.layer_shapes == ((1, 8, 8), (4, 4, 4), (6, 1, 1)) and fp.layer_sizes == (64, 64, 6)
    with h5py.File(out, "r") as f:
        assert f.attrs["version"] == 2
    x, y = _digits()
    np.testing.assert_array_equal(fp.inputs, x)
    np.testing.assert_array_equal(fp.labels, y)
    expected = relax_layered(network, x[:16], "fixed_point", 1e-4, 1000, params=parameters(network, "numba"))
    for stored, state in zip(fp.states, expected.states):  # the first batch, relaxed on its own
        np.testing.assert_array_equal(stored[:16], state)
    np.testing.assert_array_equal(fp.steps[:16], expected.steps)
    info = storage.format_info(storage.artifact_info(out))
    assert "layer_shapes: 1x8x8, 4x4x4, 6x1x1" in info


def test_dense_fixed_points_stay_version_1(tmp_path):
    out = tmp_path / "dense.h5"
    net = tmp_path / "net.h5"
    assert main(["init", "--layers", "64,16,10", "-o", str(net)]) == 0
    assert main(_relax_args(net, out)) == 0
    with h5py.File(out, "r") as f:
        assert f.attrs["version"] == 1 and "layer_shapes" not in f.attrs
    assert storage.load_fixed_points(out).layer_shapes == ((64,), (16,), (10,))


def test_relax_defaults_to_the_stored_deployment(tmp_path, capsys):
    path = tmp_path / "trained.h5"
    deployment = Deployment(method="euler", dt=0.25, tol=0.0, max_steps=7)
    storage.save_network(path, _network(), extra_attrs={"deployment": deployment.as_dict()})
    assert relax_settings_of(path) == ({"method": "euler", "tol": 0.0, "max_steps": 7, "dt": 0.25},
                                       "the network's deployment")
    out = tmp_path / "fp.h5"
    assert main(_relax_args(path, out)) == 0
    assert "settings: the network's deployment" in capsys.readouterr().out
    fp = storage.load_fixed_points(out)
    assert fp.settings["method"] == "euler" and fp.settings["dt"] == 0.25 and np.all(fp.steps == 7)
    # a given method drops the stored dt (fixed_point steps with 1); the other settings stay the deployment's
    settings, source = relax_settings_of(path, method="fixed_point")
    assert settings == {"method": "fixed_point", "tol": 0.0, "max_steps": 7, "dt": None}
    assert source == "method as given, the rest from the network's deployment"
    assert relax_settings_of(path, method="euler", max_steps=3)[0] == {"method": "euler", "tol": 0.0,
                                                                        "max_steps": 3, "dt": 0.25}


def test_relax_falls_back_to_the_training_config(tmp_path):
    path = tmp_path / "old.h5"  # written before deployments were stored: the free phase of its training config
    storage.save_network(path, _network(), extra_attrs={"config": {"method": "alternating", "free_steps": 12,
                                                                   "tol": 0.0}})
    assert relax_settings_of(path)[0] == {"method": "alternating", "tol": 0.0, "max_steps": 12, "dt": None}


class _Interrupt:
    def __init__(self, at=None):
        self.at, self.calls, self.real = at, 0, relax_layered

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.at is not None and self.calls == self.at:
            raise KeyboardInterrupt
        return self.real(*args, **kwargs)


def test_conv_relax_resumes_after_an_interruption(conv_file, tmp_path, monkeypatch):
    import ebm_sim.model.dynamics as dynamics

    reference = tmp_path / "ref.h5"
    assert main(_relax_args(conv_file, reference)) == 0
    out = tmp_path / "fp.h5"
    monkeypatch.setattr(dynamics, "relax", _Interrupt(at=3))  # batches 1-2 finish and are saved, Ctrl-C in the 3rd
    assert main(_relax_args(conv_file, out, "--checkpoint-every", "1")) == 130
    with np.load(partial_path(out)) as z:
        assert int(z["done"]) == 32 and z["s1"].shape == (32, 4, 4, 4)
    resumed = _Interrupt()
    monkeypatch.setattr(dynamics, "relax", resumed)
    assert main(_relax_args(conv_file, out)) == 0
    assert resumed.calls == 1 and not partial_path(out).exists()
    a, b = storage.load_fixed_points(out), storage.load_fixed_points(reference)
    for s, t in zip(a.states + [a.inputs, a.steps], b.states + [b.inputs, b.steps]):
        np.testing.assert_array_equal(s, t)


def test_conv_relax_refuses_data_of_another_shape(conv_file, tmp_path, capsys):
    path = tmp_path / "wide.h5"
    storage.save_network(path, LayeredNetwork.init("3x8x8, conv 4 k3 p1 maxpool, readout 10", seed=0))
    assert main(_relax_args(path, tmp_path / "fp.h5")) == 2
    assert "takes 3x8x8 inputs but digits has 1x8x8 images" in capsys.readouterr().err
    assert not (tmp_path / "fp.h5").exists()
    assert main(_relax_args(conv_file, tmp_path / "fp.h5", "--method", "rk45")) == 2
    assert "rk45" in capsys.readouterr().err


def test_dense_relax_is_not_routed_through_the_layered_dynamics(tmp_path, monkeypatch):
    calls = []
    real = relax_module.relax
    monkeypatch.setattr(relax_module, "relax", lambda *a, **k: calls.append(1) or real(*a, **k))
    net = tmp_path / "net.h5"
    assert main(["init", "--layers", "64,16,10", "-o", str(net)]) == 0
    assert main(_relax_args(net, tmp_path / "fp.h5")) == 0
    assert len(calls) == 3  # 40 samples in batches of 16


# ---------------------------------------------------------------------------------------------- trajectories
@pytest.mark.parametrize("method", ["euler", "fixed_point", "alternating"])
def test_recorded_trajectory_ends_at_the_result_on_every_backend(method):
    network = _network(np.float64)
    x, _ = _digits(6)
    x = x.astype(np.float64)
    runs = {"numpy": relax_layered(network, x, method, 1e-6, 60, record=True),
            "numba": relax_layered(network, x, method, 1e-6, 60, record=True, params=parameters(network, "numba")),
            "torch": relax_layered(network, torch.from_numpy(x), method, 1e-6, 60, record=True,
                                   params=parameters(network, "torch", dtype=torch.float64))}
    reference = runs["numpy"]
    frames = int(np.max(reference.steps)) + 1
    assert [t.shape for t in reference.trajectory] == [(frames, 6, 4, 4, 4), (frames, 6, 6, 1, 1)]
    assert reference.energy.shape == (frames, 6)
    for k, state in enumerate(reference.states):
        np.testing.assert_array_equal(reference.trajectory[k][-1], state)
        assert not np.any(reference.trajectory[k][0])  # the zero start
    for b, steps in enumerate(reference.steps):  # a sample that stopped keeps its state
        for t in reference.trajectory:
            assert np.all(t[steps:, b] == t[-1, b])
    for name in ("numba", "torch"):
        other = runs[name]
        for t, u in zip(reference.trajectory, other.trajectory):
            np.testing.assert_allclose(np.asarray(u), t, atol=1e-12)
        np.testing.assert_allclose(np.asarray(other.energy), reference.energy, atol=1e-10)
    unrecorded = relax_layered(network, x, method, 1e-6, 60)
    for s, t in zip(unrecorded.states, reference.states):
        np.testing.assert_array_equal(s, t)


def test_energy_does_not_increase_along_a_recorded_euler_run():
    network = LayeredNetwork.init("1x8x8, conv 4 k3 p1 avgpool, dense 12, readout 10", seed=2, dtype=np.float64)
    x, _ = _digits(8)
    result = relax_layered(network, x.astype(np.float64), "euler", 0.0, 40, dt=0.2, record=True)
    assert np.all(np.diff(result.energy, axis=0) <= 1e-12)


def test_recording_is_refused_before_any_step():
    network = _network()
    x, _ = _digits(4)
    with pytest.raises(ValueError, match="'rk45' adapts its steps: record with"):
        relax_layered(network, x, "rk45", 1e-4, 10, record=True)
    steps = MAX_TRAJECTORY_BYTES // (4 * 70 * 4) + 1
    with pytest.raises(ValueError, match="recording .* GiB .* lower max_steps or the batch size"):
        relax_layered(network, x, "euler", 1e-4, int(steps), record=True)


def test_layered_trajectory_round_trip(tmp_path):
    network = _network()
    x, _ = _digits(3)
    result = relax_layered(network, x, "euler", 0.0, 5, record=True)
    path = tmp_path / "traj.h5"
    storage.save_trajectory(path, result.trajectory, result.energy, {"method": "euler"}, network.content_hash())
    stored = storage.load_trajectory(path, network)
    for s, t in zip(stored.states, result.trajectory):
        np.testing.assert_array_equal(s, t)
    with h5py.File(path, "r") as f:
        assert f.attrs["version"] == 2 and list(f.attrs["state_sizes"]) == [64, 6]
    info = storage.format_info(storage.artifact_info(path))
    assert "state_shapes: 4x4x4, 6x1x1" in info


def test_stored_shapes_that_disagree_with_the_arrays_are_refused(tmp_path):
    network = _network()
    x, _ = _digits(3)
    result = relax_layered(network, x, "euler", 0.0, 3, record=True)
    path = tmp_path / "traj.h5"
    storage.save_trajectory(path, result.trajectory, result.energy, {}, network.content_hash())
    with h5py.File(path, "r+") as f:  # an edit that rehashes cleanly would still disagree with the arrays
        f.attrs["state_shapes"] = "[[4, 16], [6, 1, 1]]"
        f.attrs["content_hash"] = storage._content_hash(
            {n: f[n][()] for n in ("states/s1", "states/s2", "energy")},
            {k: storage._py(f.attrs[k]) for k in f.attrs if k not in ("created", "toolkit_version", "content_hash")})
    with pytest.raises(ArtifactError, match="per-sample shapes"):
        storage.load_trajectory(path)

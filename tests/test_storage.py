"""HDF5 artifacts: bit-exact round trips, refusal of bad files with clear messages, atomic writes."""
import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from ebm_sim import storage
from ebm_sim.network import Network
from ebm_sim.outputs import OutputError
from ebm_sim.storage import (FORMAT_VERSION, ArtifactError, artifact_info, format_info, load_checkpoint,
                             load_fixed_points, load_network, load_trajectory, save_fixed_points, save_network,
                             save_trajectory)

DTYPES = [np.float32, np.float64]
SETTINGS = {"method": "euler", "tol": 1e-6, "max_steps": 500, "beta": 0.5, "dt": 0.2, "dtype": np.float32,
            "nested": {"seed": np.int64(3)}, "sizes": (1, 2)}


def _net(dtype=np.float32, sizes=(6, 5, 3), seed=0):
    return Network.init(sizes, seed=seed, dtype=dtype)


def _fixed_points(net, n=7, seed=1):
    rng = np.random.default_rng(seed)
    dtype = net.dtype
    return dict(inputs=rng.random((n, net.layer_sizes[0])).astype(dtype),
                labels=rng.integers(0, 3, n),
                states=[rng.random((n, k)).astype(dtype) for k in net.layer_sizes[1:]],
                residuals=rng.random(n).astype(dtype) * 1e-7,
                steps=rng.integers(1, 100, n).astype(np.int32),
                converged=rng.random(n) < 0.8,
                settings=SETTINGS, network_hash=net.content_hash())


def _trajectory(net, t=4, b=3, seed=2):
    rng = np.random.default_rng(seed)
    return dict(trajectory=[rng.random((t, b, k)).astype(net.dtype) for k in net.layer_sizes[1:]],
                energy=rng.standard_normal((t, b)).astype(net.dtype),
                settings=SETTINGS, network_hash=net.content_hash())


def _same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _leftovers(directory):
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", DTYPES)
def test_network_round_trip_bit_exact(tmp_path, dtype):
    net = _net(dtype)
    path = tmp_path / "net.h5"
    file_hash = save_network(path, net, extra_attrs={"seed": 0, "dataset": "mnist"})
    loaded = load_network(path)
    assert loaded.dtype == np.dtype(dtype)
    assert loaded.layer_sizes == net.layer_sizes and loaded.activation == net.activation
    assert all(_same(a, b) for a, b in zip(loaded.weights + loaded.biases, net.weights + net.biases))
    assert loaded.content_hash() == net.content_hash()
    # re-saving the loaded network gives the same file content hash (creation time is not hashed)
    assert save_network(tmp_path / "again.h5", loaded, extra_attrs={"seed": 0, "dataset": "mnist"}) == file_hash
    assert artifact_info(path)["content_hash"] == file_hash
    assert _leftovers(tmp_path) == []


def test_network_attrs_follow_schema(tmp_path):
    net = _net(sizes=(4, 3, 2, 2))
    save_network(tmp_path / "net.h5", net)
    with h5py.File(tmp_path / "net.h5", "r") as f:
        assert f.attrs["format"] == "ebm-network" and f.attrs["version"] == FORMAT_VERSION
        assert list(f.attrs["layer_sizes"]) == [4, 3, 2, 2]
        assert f.attrs["network_hash"] == net.content_hash()
        assert sorted(f["weights"]) == ["W0", "W1", "W2"] and sorted(f["biases"]) == ["b1", "b2", "b3"]
        for key in ("created", "toolkit_version", "content_hash", "activation", "dtype"):
            assert key in f.attrs


def test_history_round_trip(tmp_path):
    net = _net()
    net.history = {"loss": [0.5, 0.25, 0.125], "acc": np.array([0.1, 0.9], dtype=np.float32),
                   "epoch": [1, 2, 3], "norms": [np.array([1.0, 2.0]), np.array([3.0, 4.0])], "empty": []}
    save_network(tmp_path / "net.h5", net)
    history = load_network(tmp_path / "net.h5").history
    assert history["loss"] == [0.5, 0.25, 0.125] and isinstance(history["loss"], list)
    assert _same(history["acc"], net.history["acc"])
    assert history["epoch"] == [1, 2, 3]
    assert isinstance(history["norms"], list)
    assert all(_same(a, b) for a, b in zip(history["norms"], net.history["norms"]))
    assert history["empty"] == []
    assert artifact_info(tmp_path / "net.h5")["summary"]["history_keys"] == ["acc", "empty", "epoch", "loss", "norms"]
    net.history = {}
    save_network(tmp_path / "net.h5", net)
    assert load_network(tmp_path / "net.h5").history == {}


def test_checkpoint_round_trip_and_atomic_overwrite(tmp_path):
    path = tmp_path / "net.h5"
    net = _net()
    save_network(path, net)
    assert load_checkpoint(path) is None
    momentum = [np.ones_like(w) * 0.5 for w in net.weights]
    checkpoint = {"epoch": 3, "lr": 0.01, "done": False, "rng": json.dumps({"state": 2 ** 100}), "note": "",
                  "optimizer": {f"W{k}": m for k, m in enumerate(momentum)}, "mask": np.array([True, False])}
    net2 = _net(seed=5)
    save_network(path, net2, checkpoint=checkpoint)  # overwrite the existing file with a newer network
    assert load_network(path).content_hash() == net2.content_hash()
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 3 and loaded["lr"] == 0.01 and loaded["done"] == False  # noqa: E712
    assert json.loads(loaded["rng"])["state"] == 2 ** 100 and loaded["note"] == ""
    assert all(_same(loaded["optimizer"][f"W{k}"], m) for k, m in enumerate(momentum))
    assert _same(loaded["mask"], checkpoint["mask"])
    assert artifact_info(path)["summary"]["checkpoint_keys"] == [
        "done", "epoch", "lr", "mask", "note", "optimizer/W0", "optimizer/W1", "rng"]
    save_network(path, net2)  # a save without checkpoint drops it
    assert load_checkpoint(path) is None
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("dtype", DTYPES)
def test_fixed_points_round_trip_bit_exact(tmp_path, dtype):
    net = _net(dtype)
    fp = _fixed_points(net)
    path = tmp_path / "fp.h5"
    file_hash = save_fixed_points(path, **fp)
    ds = load_fixed_points(path, network=net)
    for name in ("inputs", "labels", "residuals", "steps", "converged"):
        assert _same(getattr(ds, name), fp[name]), name
    assert len(ds.states) == 2 and all(_same(a, b) for a, b in zip(ds.states, fp["states"]))
    assert ds.settings == json.loads(json.dumps({**SETTINGS, "dtype": "float32", "nested": {"seed": 3},
                                                 "sizes": [1, 2]}))
    assert ds.network_hash == net.content_hash() and len(ds) == 7 and ds.layer_sizes == net.layer_sizes
    again = save_fixed_points(tmp_path / "again.h5", ds.inputs, ds.labels, ds.states, ds.residuals, ds.steps,
                              ds.converged, ds.settings, ds.network_hash)
    assert again == file_hash


@pytest.mark.parametrize("dtype", DTYPES)
def test_trajectory_round_trip_bit_exact(tmp_path, dtype):
    net = _net(dtype)
    tr = _trajectory(net)
    tr["energy"][1, 0] = np.nan  # a diverging run may be recorded
    path = tmp_path / "traj.h5"
    file_hash = save_trajectory(path, **tr)
    loaded = load_trajectory(path, network=net)
    assert all(_same(a, b) for a, b in zip(loaded.states, tr["trajectory"])) and len(loaded.states) == 2
    assert _same(loaded.energy, tr["energy"])
    assert loaded.settings["method"] == "euler" and loaded.network_hash == net.content_hash()
    assert save_trajectory(tmp_path / "b.h5", loaded.states, loaded.energy, loaded.settings,
                           loaded.network_hash) == file_hash


@hsettings(max_examples=15, deadline=None)
@given(n=st.integers(0, 5), widths=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2 ** 16))
def test_fixed_points_round_trip_property(tmp_path_factory, n, widths, dtype, seed):
    rng = np.random.default_rng(seed)
    states = [rng.standard_normal((n, w)).astype(dtype) for w in widths]
    inputs = rng.standard_normal((n, 3)).astype(dtype)
    path = tmp_path_factory.mktemp("fp") / "fp.h5"
    save_fixed_points(path, inputs, np.arange(n), states, np.zeros(n, dtype), np.ones(n, np.int64),
                      np.ones(n, bool), {"seed": seed}, "0" * 64)
    ds = load_fixed_points(path)
    assert _same(ds.inputs, inputs) and all(_same(a, b) for a, b in zip(ds.states, states))
    assert ds.settings == {"seed": seed}


# ---------------------------------------------------------------------------------------------- refusals
@pytest.fixture
def net_file(tmp_path):
    # big enough that the middle of the file is raw weight data
    path = tmp_path / "net.h5"
    save_network(path, _net(sizes=(64, 64, 10)))
    return path


def test_missing_file(tmp_path):
    path = tmp_path / "nope.h5"
    with pytest.raises(ArtifactError, match="no such file") as e:
        load_network(path)
    assert str(path) in str(e.value)


def test_not_hdf5(tmp_path):
    path = tmp_path / "notes.h5"
    path.write_text("these are not the weights you are looking for\n" * 20)
    with pytest.raises(ArtifactError, match="not an HDF5 file") as e:
        load_network(path)
    assert str(path) in str(e.value)


def test_truncated_file(net_file):
    data = net_file.read_bytes()
    net_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="corrupt or truncated") as e:
        load_network(net_file)
    assert str(net_file) in str(e.value)


def test_corrupt_file(net_file):
    data = bytearray(net_file.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = b"\xff" * 64
    net_file.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="corrupt"):
        load_network(net_file)
    with pytest.raises(ArtifactError, match="corrupt"):
        load_checkpoint(net_file)


def test_tampered_dataset_hash_mismatch(net_file):
    with h5py.File(net_file, "r+") as f:
        f["weights/W0"][0, 0] += 1.0
    with pytest.raises(ArtifactError, match="content hash mismatch.*modified or is corrupt"):
        load_network(net_file)
    assert artifact_info(net_file)["hash_status"] == "mismatch"


def test_tampered_attribute_hash_mismatch(net_file):
    with h5py.File(net_file, "r+") as f:
        f.attrs["activation"] = "hard_sigmoid_half"
    with pytest.raises(ArtifactError, match="content hash mismatch"):
        load_network(net_file)


def test_wrong_format(tmp_path):
    net = _net()
    path = tmp_path / "fp.h5"
    save_fixed_points(path, **_fixed_points(net))
    with pytest.raises(ArtifactError, match="holds a fixed-point dataset .* but a network .* was expected"):
        load_network(path)
    save_network(tmp_path / "net.h5", net)
    with pytest.raises(ArtifactError, match="'ebm-network'.*'ebm-trajectory'"):
        load_trajectory(tmp_path / "net.h5")


def test_not_an_artifact(tmp_path):
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(ArtifactError, match="not an ebm-toolkit artifact"):
        load_network(path)
    with pytest.raises(ArtifactError, match="not an ebm-toolkit artifact"):
        artifact_info(path)


def test_unsupported_version(net_file):
    newest = max(storage.VERSIONS["ebm-network"])  # 2, layered networks: tests/test_layered_storage.py
    with h5py.File(net_file, "r+") as f:
        f.attrs["version"] = newest + 1
    with pytest.raises(ArtifactError, match=f"unsupported ebm-network version {newest + 1}.* reads ebm-network "
                                            f"versions 1, 2"):
        load_network(net_file)


def test_fixed_points_of_another_network(tmp_path):
    net, other = _net(), _net(seed=9)
    path = tmp_path / "fp.h5"
    save_fixed_points(path, **_fixed_points(net))
    with pytest.raises(ArtifactError, match="computed by another network") as e:
        load_fixed_points(path, network=other)
    assert net.content_hash()[:12] in str(e.value) and other.content_hash()[:12] in str(e.value)
    load_fixed_points(path, network=net)  # the right one is accepted
    save_trajectory(tmp_path / "t.h5", **_trajectory(net))
    with pytest.raises(ArtifactError, match="computed by another network"):
        load_trajectory(tmp_path / "t.h5", network=other)


# ---------------------------------------------------------------------------------------------- atomic writes
def _fail_on_second_dataset(monkeypatch, exc=RuntimeError("disk full")):
    original = h5py.Group.create_dataset
    calls = []

    def create_dataset(self, *args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise exc
        return original(self, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", create_dataset)
    return calls


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch, exc):
    calls = _fail_on_second_dataset(monkeypatch, exc)
    with pytest.raises(type(exc)):
        save_network(tmp_path / "net.h5", _net())
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_old_file(tmp_path, monkeypatch):
    net = _net()
    path = tmp_path / "fp.h5"
    save_fixed_points(path, **_fixed_points(net))
    before = path.read_bytes()
    _fail_on_second_dataset(monkeypatch)
    with pytest.raises(RuntimeError, match="disk full"):
        save_fixed_points(path, **_fixed_points(net, seed=3))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["fp.h5"]
    monkeypatch.undo()
    load_fixed_points(path, network=net)


def test_write_into_missing_directory(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        save_network(tmp_path / "missing" / "net.h5", _net())


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("change, phrase", [
    (dict(labels=np.arange(6)), "inconsistent leading dimensions"),
    (dict(states=[np.zeros((7, 5), np.float32), np.zeros((6, 3), np.float32)]), "inconsistent leading"),
    (dict(states=[np.zeros(7, np.float32)]), r"states\[0\] \(layer 1\) must be 2-D"),
    (dict(states=np.zeros((7, 5), np.float32)), "non-empty list of per-layer arrays"),
    (dict(states=[]), "non-empty list"),
    (dict(inputs=np.zeros((7, 2, 3), np.float32)), "inputs must be 2-D"),
    (dict(labels=np.zeros(7)), "labels must have an integer dtype"),
    (dict(converged=np.ones(7, np.int64)), "converged must have a bool dtype"),
    (dict(network_hash="abc"), "network_hash must be a SHA-256"),
    (dict(settings={"f": lambda x: x}), "settings must be JSON-serializable"),
    (dict(settings=[1, 2]), "settings must be a dict"),
])
def test_fixed_points_bad_input(tmp_path, change, phrase):
    fp = {**_fixed_points(_net()), **change}
    with pytest.raises(ValueError, match=phrase):
        save_fixed_points(tmp_path / "fp.h5", **fp)
    assert list(tmp_path.iterdir()) == []


def test_fixed_points_nan_states_refused(tmp_path):
    fp = _fixed_points(_net())
    fp["states"][1][2, 0] = np.nan
    with pytest.raises(ValueError, match="states/s2 holds NaN"):
        save_fixed_points(tmp_path / "fp.h5", **fp)


@pytest.mark.parametrize("change, phrase", [
    (dict(energy=np.zeros((4, 2))), "inconsistent leading dimensions"),
    (dict(energy=np.zeros(4)), "energy must be 2-D"),
    (dict(trajectory=[np.zeros((4, 3))]), r"trajectory\[0\] \(layer 1\) must be 3-D"),
])
def test_trajectory_bad_input(tmp_path, change, phrase):
    tr = {**_trajectory(_net()), **change}
    with pytest.raises(ValueError, match=phrase):
        save_trajectory(tmp_path / "t.h5", **tr)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("history, phrase", [
    ({"norms": [np.zeros(2), np.zeros(3)]}, "ragged"),
    ({"loss": 0.5}, "must be a list of numbers"),
    ({"a/b": [1.0]}, "without '/'"),
    ({"names": ["x", "y"]}, "must be a list of numbers"),
])
def test_bad_history(tmp_path, history, phrase):
    net = _net()
    net.history = history
    with pytest.raises(ValueError, match=phrase):
        save_network(tmp_path / "net.h5", net)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("checkpoint, phrase", [
    ({"obj": object()}, "unsupported value"),
    ({"opt": {"none": None}}, "'opt/none': unsupported value"),
    ({"": 1}, "non-empty str"),
    ([1, 2], "must be a dict"),
])
def test_bad_checkpoint(tmp_path, checkpoint, phrase):
    with pytest.raises(ValueError, match=phrase):
        save_network(tmp_path / "net.h5", _net(), checkpoint=checkpoint)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- info
def test_artifact_info_each_kind(tmp_path):
    net = _net()
    save_network(tmp_path / "net.h5", net, extra_attrs={"epochs": 2})
    save_fixed_points(tmp_path / "fp.h5", **_fixed_points(net))
    save_trajectory(tmp_path / "t.h5", **_trajectory(net))

    info = artifact_info(tmp_path / "net.h5")
    assert info["format"] == "ebm-network" and info["version"] == FORMAT_VERSION and info["hash_status"] == "ok"
    assert info["summary"]["layer_sizes"] == [6, 5, 3] and info["summary"]["network_hash"] == net.content_hash()
    assert info["summary"]["extra"] == {"epochs": 2} and info["summary"]["checkpoint_keys"] is None
    assert info["datasets"]["weights/W0"] == {"shape": (5, 6), "dtype": "float32"}
    assert info["created"] and info["toolkit_version"]

    info = artifact_info(tmp_path / "fp.h5")
    assert info["format"] == "ebm-fixed-points" and info["hash_status"] == "ok"
    assert info["summary"]["num_samples"] == 7 and info["summary"]["layer_sizes"] == [6, 5, 3]
    assert info["summary"]["settings"]["method"] == "euler" and "/7" in info["summary"]["converged"]
    assert info["datasets"]["states/s1"] == {"shape": (7, 5), "dtype": "float32"}

    info = artifact_info(tmp_path / "t.h5")
    assert info["format"] == "ebm-trajectory" and info["hash_status"] == "ok"
    summary = info["summary"]
    assert (summary["num_steps"], summary["batch_size"], summary["state_sizes"]) == (4, 3, [5, 3])

    text = format_info(info)
    assert "ebm-trajectory (version 1)" in text and "hash:     ok" in text and "states/s2" in text
    assert "ebm-network" in format_info(artifact_info(tmp_path / "net.h5"))


def test_atomic_helper_temp_name(tmp_path, monkeypatch):
    seen = []
    original = h5py.File

    def spy(name, *args, **kwargs):  # h5py writes through a file object (see storage._write_artifact)
        seen.append(os.path.basename(str(getattr(name, "name", name))))
        return original(name, *args, **kwargs)

    monkeypatch.setattr(storage.h5py, "File", spy)
    save_network(tmp_path / "net.h5", _net())
    assert seen[0].startswith(".net.h5.") and seen[0].endswith(".tmp")


def test_plain_files_are_written_atomically(tmp_path):
    """write_json / write_text / save_figure: numpy values become JSON numbers, nothing temporary is left, and a
    missing folder is refused by name."""
    from matplotlib.figure import Figure

    path = storage.write_json(tmp_path / "r.json", {"a": np.float32(0.5), "b": np.arange(3), "c": Path("x")})
    assert json.loads(path.read_text()) == {"a": 0.5, "b": [0, 1, 2], "c": "x"}
    fig = Figure()
    fig.subplots().plot([0, 1])
    png = storage.save_figure(fig, tmp_path / "f.png", dpi=50)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.png", "r.json"]
    with pytest.raises(OutputError, match="does not exist"):
        storage.write_text(tmp_path / "missing" / "t.txt", "x")


def test_other_packages_register_their_formats(tmp_path):
    """storage names only its own formats; another package registers its own (noun, versions, summary) and writes
    it through write_artifact; an unregistered format is refused by name."""
    source = Path(storage.__file__).read_text()
    assert "ebm-feedforward" not in source and "ebm-lava-program" not in source
    path = tmp_path / "thing.h5"
    with pytest.raises(ValueError, match="unknown format 'ebm-test-thing'"):
        storage.write_artifact(path, "ebm-test-thing", {"a": np.arange(3)}, {"colour": "blue"})
    storage.register_format("ebm-test-thing", "a test thing", (1,), lambda attrs: {"colour": attrs.get("colour")})
    try:
        storage.write_artifact(path, "ebm-test-thing", {"a": np.arange(3)}, {"colour": "blue"})
        info = storage.artifact_info(path)
        assert info["format"] == "ebm-test-thing" and info["summary"] == {"colour": "blue"}
        with pytest.raises(storage.ArtifactError, match="holds a test thing"):
            storage.load_network(path)
    finally:
        for registry in (storage.FORMATS, storage.VERSIONS, storage.SUMMARIES):
            registry.pop("ebm-test-thing", None)
    with pytest.raises(storage.ArtifactError, match="unknown format 'ebm-test-thing'.*once that package is imported"):
        storage.artifact_info(path)

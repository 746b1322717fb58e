"""Network format version 2 (layers and interactions): bit-exact round trips of conv and dense LayeredNetworks, the
version-1 files of benchmarks/results/networks read as LayeredNetworks with the same fixed points, refusals."""
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from ebm_cli.main import main
from ebm_sim import storage
from ebm_sim.model import dynamics
from ebm_sim.model.network import LayeredNetwork
from ebm_sim.network import Network
from ebm_sim.relax import relax
from ebm_sim.storage import (LAYERED_NETWORK_VERSION, ArtifactError, artifact_info, format_info, load_checkpoint,
                             load_layered_network, load_network, read_artifact, save_fixed_points, save_network,
                             write_artifact)

CONV = "2x6x6, conv 3 k3 p1 maxpool, conv 4 k3 s2 p1 avgpool, readout 5"
NETWORKS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "networks"
VERSION_1_FILES = ["digits_64-256-10.h5", "fashion_784-512-10.h5", "fashion_deep_784-512-512-10.h5"]


def _same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _assert_same_network(loaded, network):
    """Same architecture, hash, classes, hyperparameters, history and bit-identical parameters."""
    assert isinstance(loaded, LayeredNetwork)
    assert loaded.describe() == network.describe()
    assert loaded.content_hash() == network.content_hash()
    assert [type(i) for i in loaded.interactions] == [type(i) for i in network.interactions]
    assert type(loaded.cost) is type(network.cost)
    assert len(loaded.parameter_arrays()) == len(network.parameter_arrays())
    assert all(_same(a, b) for a, b in zip(loaded.parameter_arrays(), network.parameter_arrays()))
    assert loaded.history.keys() == network.history.keys()


@pytest.fixture
def conv_file(tmp_path):
    path = tmp_path / "conv.h5"
    save_network(path, LayeredNetwork.init(CONV, seed=0))
    return path


def _forge(path, edit, version=LAYERED_NETWORK_VERSION):
    """Rewrite ``path`` after ``edit(datasets, config)``, with a recomputed content hash (as an editor could)."""
    datasets, attrs = read_artifact(path, "ebm-network")
    config = {k: v for k, v in attrs.items() if k not in storage.HEADER_ATTRS}
    edit(datasets, config)
    write_artifact(path, "ebm-network", datasets, config, version=version)


def _edit_architecture(change):
    def edit(datasets, config):
        description = json.loads(config["architecture"])
        change(description)
        config["architecture"] = json.dumps(description, sort_keys=True)
    return edit


# ---------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_conv_network_round_trip_bit_exact(tmp_path, dtype):
    network = LayeredNetwork.init(CONV, seed=0, dtype=dtype)
    network.history = {"loss": [0.5, 0.25], "norms": np.arange(6, dtype=np.float32).reshape(2, 3)}
    path = tmp_path / "conv.h5"
    file_hash = save_network(path, network, extra_attrs={"spec": CONV}, checkpoint={"epoch": np.int64(3)})
    with h5py.File(path, "r") as f:
        assert f.attrs["version"] == LAYERED_NETWORK_VERSION and "weights" not in f
        assert f["interactions/0/weight"].shape == (3, 2, 3, 3) and f["cost/weight"].shape == (5, 4)
    loaded = load_network(path)
    _assert_same_network(loaded, network)
    assert [i.hyperparameters() for i in loaded.interactions] == [i.hyperparameters() for i in network.interactions]
    assert loaded.cost.num_classes == 5 and loaded.dtype == np.dtype(dtype)
    assert loaded.history["loss"] == [0.5, 0.25] and _same(loaded.history["norms"], network.history["norms"])
    assert load_checkpoint(path) == {"epoch": 3}
    _assert_same_network(load_layered_network(path), network)
    assert artifact_info(path)["content_hash"] == file_hash
    assert save_network(tmp_path / "again.h5", loaded, extra_attrs={"spec": CONV},
                        checkpoint={"epoch": np.int64(3)}) == file_hash  # the same content, the same file hash


def test_dense_layered_network_round_trip(tmp_path):
    network = LayeredNetwork.init("784,16,10", seed=0)
    save_network(tmp_path / "dense.h5", network)
    loaded = load_network(tmp_path / "dense.h5")
    _assert_same_network(loaded, network)
    assert [i.kind for i in loaded.interactions] == ["dense", "bias", "dense", "bias"]


def test_dense_network_is_still_version_1(tmp_path):
    network = Network.init((6, 5, 3), seed=0)
    save_network(tmp_path / "net.h5", network)
    assert artifact_info(tmp_path / "net.h5")["version"] == 1
    assert isinstance(load_network(tmp_path / "net.h5"), Network)
    layered = load_layered_network(tmp_path / "net.h5")
    _assert_same_network(layered, LayeredNetwork.from_dense(network))


# ---------------------------------------------------------------------------------------------- version-1 files
@pytest.mark.parametrize("name", VERSION_1_FILES)
def test_version_1_file_loads_as_layered_with_the_same_fixed_points(name):
    path = NETWORKS / name
    dense = load_network(path)
    layered = load_layered_network(path)
    assert isinstance(dense, Network) and isinstance(layered, LayeredNetwork)
    assert layered.layer_shapes == tuple((n,) for n in dense.layer_sizes)
    assert layered.history.keys() == dense.history.keys()
    x = np.random.default_rng(0).random((4, dense.layer_sizes[0])).astype(dense.dtype)
    expected = relax(dense, x, method="fixed_point", tol=1e-5, max_steps=200, backend="numpy")
    got = dynamics.relax(layered, x, "fixed_point", tol=1e-5, max_steps=200)
    assert len(got.states) == len(expected.states)
    for s_layered, s_dense in zip(got.states, expected.states):
        np.testing.assert_allclose(s_layered, s_dense, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got.steps), np.asarray(expected.steps))


# ---------------------------------------------------------------------------------------------- info
def test_info_describes_a_version_2_network(conv_file, capsys):
    info = artifact_info(conv_file)
    assert info["version"] == LAYERED_NETWORK_VERSION and info["hash_status"] == "ok"
    summary = info["summary"]
    assert summary["layer_shapes"] == ["2x6x6", "3x3x3", "4x1x1"]
    assert summary["interactions"] == ["conv2d 0->1 (kernel=3 padding=1 pool=max stride=1)", "bias 1",
                                       "conv2d 1->2 (kernel=3 padding=1 pool=avg stride=2)", "bias 2"]
    assert summary["cost"] == "softmax_readout, 5 classes"
    assert summary["network_hash"] == LayeredNetwork.init(CONV, seed=0).content_hash()
    assert "layer_shapes: 2x6x6, 3x3x3, 4x1x1" in format_info(info)
    assert main(["info", str(conv_file)]) == 0
    out = capsys.readouterr().out
    assert "ebm-network (version 2)" in out and "interactions: conv2d 0->1" in out and "interactions/0/weight" in out


# ---------------------------------------------------------------------------------------------- refusals
def test_tampered_parameter_is_refused(conv_file):
    with h5py.File(conv_file, "r+") as f:
        f["interactions/2/weight"][0, 0, 0, 0] += 1.0
    with pytest.raises(ArtifactError, match="content hash mismatch.*modified or is corrupt"):
        load_network(conv_file)
    assert artifact_info(conv_file)["hash_status"] == "mismatch"


def test_tampered_architecture_is_refused(conv_file):
    with h5py.File(conv_file, "r+") as f:
        f.attrs["architecture"] = f.attrs["architecture"].replace('"max"', '"avg"')
    with pytest.raises(ArtifactError, match="content hash mismatch"):
        load_layered_network(conv_file)


def test_rehashed_architecture_edit_fails_the_network_hash(conv_file):
    _forge(conv_file, _edit_architecture(lambda d: d["interactions"][0].update(pool="avg")))  # shapes still fit
    with pytest.raises(ArtifactError, match="network hash mismatch"):
        load_network(conv_file)


@pytest.mark.parametrize("where, message", [
    (lambda d: d["interactions"][2].update(kind="lstm"),
     "interaction 2 has unknown kind 'lstm'; this toolkit knows bias, conv2d, dense"),
    (lambda d: d["cost"].update(kind="hinge"), "the cost has unknown kind 'hinge'"),
])
def test_unknown_kind_is_refused(conv_file, where, message):
    _forge(conv_file, _edit_architecture(where))
    with pytest.raises(ArtifactError, match=message):
        load_network(conv_file)


@pytest.mark.parametrize("name, message", [
    ("interactions/2/weight", "lacks dataset\\(s\\) interactions/2/weight"),
    ("cost/bias", (r"does not fit its architecture.*softmax_readout cost needs parameters \['bias', 'weight'\], "
                   r"got \['weight'\]")),
])
def test_missing_dataset_is_refused(conv_file, name, message):
    _forge(conv_file, lambda datasets, config: datasets.pop(name))
    with pytest.raises(ArtifactError, match=message):
        load_network(conv_file)


def test_bad_parameter_shape_is_refused(conv_file):
    _forge(conv_file, lambda datasets, config: datasets.update({"interactions/0/weight": np.zeros((3, 2, 5, 5),
                                                                                                  np.float32)}))
    with pytest.raises(ArtifactError, match="does not fit its architecture.*'weight' has shape \\(3, 2, 5, 5\\)"):
        load_network(conv_file)


@pytest.mark.parametrize("edit, message", [
    (lambda datasets, config: config.pop("architecture"), "no readable 'architecture' attribute"),
    (lambda datasets, config: config.update(architecture="{not json"), "no readable 'architecture' attribute"),
    (_edit_architecture(lambda d: d.pop("cost")), "architecture attribute lacks cost"),
    (_edit_architecture(lambda d: d.update(layers=[[2, 6, 6], "3x3x3"])), "has layers .* not a list of shapes"),
    (_edit_architecture(lambda d: d["interactions"][1].pop("post")), "has interaction 1 .* int pre and post"),
    (_edit_architecture(lambda d: d.update(layers=[[2, 6, 6], [3, 3, 3], [4, 2, 2]])),
     "does not fit its architecture.*maps a \\(3, 3, 3\\) layer to \\(4, 1, 1\\)"),
])
def test_bad_architecture_is_refused(conv_file, edit, message):
    _forge(conv_file, edit)
    with pytest.raises(ArtifactError, match=message):
        load_network(conv_file)


def test_an_unknown_version_of_another_format_is_unsupported(tmp_path):
    network = Network.init((6, 5, 3), seed=0)
    rng = np.random.default_rng(0)
    save_fixed_points(tmp_path / "fp.h5", rng.random((2, 6)), np.zeros(2, int), [rng.random((2, 5)),
                      rng.random((2, 3))], np.zeros(2), np.ones(2, int), np.ones(2, bool), {}, network.content_hash())
    with h5py.File(tmp_path / "fp.h5", "r+") as f:
        f.attrs["version"] = 3
    with pytest.raises(ArtifactError, match="unsupported ebm-fixed-points version 3; .* reads ebm-fixed-points "
                                            "versions 1, 2$"):
        storage.load_fixed_points(tmp_path / "fp.h5")
    with pytest.raises(ValueError, match="ebm-fixed-points has versions 1, 2, not 3"):
        write_artifact(tmp_path / "x.h5", "ebm-fixed-points", {}, {}, version=3)


def test_a_loaded_network_reinitializes_its_biases_as_init_does(tmp_path):
    network = LayeredNetwork.init("3x8x8, conv 4 k3 p1 maxpool, dense 12, readout 3", seed=0)
    save_network(tmp_path / "net.h5", network)
    loaded = load_network(tmp_path / "net.h5")
    assert [getattr(i, "fan_in_units", None) for i in loaded.interactions] == \
        [getattr(i, "fan_in_units", None) for i in network.interactions] == [None, 27, None, 64]

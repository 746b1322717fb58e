"""The architecture grammar (ebm_sim.model.spec) and building networks from it."""
import numpy as np
import pytest

from ebm_sim.model import LayeredNetwork, SpecError, parse
from ebm_sim.model.spec import Architecture, Block, load

LABORIEUX_CIFAR10 = ("3x32x32, conv 128 k3 p1 maxpool, conv 256 k3 p1 maxpool, conv 512 k3 p1 maxpool, "
                     "conv 512 k3 p0 maxpool, readout 10")


def test_dense_layer_sizes_are_a_spec():
    arch = parse("784,512,10")
    assert arch == Architecture((784,), (Block("dense", 512), Block("dense", 10)))
    assert arch.readout is None and parse(arch.text()) == arch


def test_laborieux_architecture_shapes_and_synapses():
    net = LayeredNetwork.init(LABORIEUX_CIFAR10, seed=0)
    assert net.layer_shapes == ((3, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 1, 1))
    assert net.num_classes == 10 and net.cost.kind == "softmax_readout"
    conv_macs = 128 * 32 * 32 * 27 + 256 * 16 * 16 * 128 * 9 + 512 * 8 * 8 * 256 * 9 + 512 * 2 * 2 * 512 * 9
    assert net.synapses() == conv_macs + 512 * 10
    assert parse(parse(LABORIEUX_CIFAR10).text()) == parse(LABORIEUX_CIFAR10)


def test_options_in_any_order_and_newlines():
    arch = parse("1x28x28\n conv 8 maxpool p2 k5 s1\n conv 4 s2 k3 avgpool, 10")
    assert arch.blocks[0] == Block("conv", 8, kernel=5, stride=1, padding=2, pool="max")
    assert arch.blocks[1] == Block("conv", 4, kernel=3, stride=2, padding=0, pool="avg")


@pytest.mark.parametrize("text, message, token", [
    ("3x32x32, conv 64 k3 q1", "unknown conv option 'q1'", "q1"),
    ("3x32x32, conv k3", "needs its size", "k3"),
    ("3x32x32, readout 10, 5", "readout must be the last", "readout"),
    ("3x32, conv 4", "input shape must be N or CxHxW", "3x32"),
    ("3x32x32, conv 4 k0", "kernel must be >= 1", "k0"),
    ("3x32x32, conv 4 k3 k5", "kernel is given twice", "k5"),
    ("784, 512 units", "bare number is a dense layer", "units"),
    ("784, fc 10", "unknown layer 'fc'", "fc"),
    ("784, dense 10 maxpool", "'dense' takes no options", "maxpool"),
    ("abc, 10", "first item must be the input shape", "abc"),
])
def test_errors_point_at_the_bad_token(text, message, token):
    with pytest.raises(SpecError, match=message) as error:
        parse(text)
    lines = str(error.value).splitlines()
    quoted, caret = lines[-2], lines[-1]
    start = caret.index("^")
    assert quoted[start:start + len(token)] == token, str(error.value)


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("784", "at least one more layer"),
    ("3x4x4, conv 2 k5", "does not fit a 4x4 input"),
    ("3x4x4, conv 2 k3 maxpool, conv 2 k1 maxpool", "leaves nothing"),
    ("784, conv 8 k3", "needs a \\(C, H, W\\) layer"),
])
def test_architectures_that_do_not_fit(text, message):
    with pytest.raises(SpecError, match=message):
        LayeredNetwork.init(text)


def test_toml_file(tmp_path):
    path = tmp_path / "net.toml"
    path.write_text('input = "3x8x8"\nblocks = ["conv 4 k3 p1 maxpool", "readout 10"]\n'
                    'activation = "hard_sigmoid_half"\n')
    net = LayeredNetwork.init(str(path), seed=1)
    assert net.activation == "hard_sigmoid_half" and net.layer_shapes == ((3, 8, 8), (4, 4, 4))
    bad = tmp_path / "bad.toml"
    bad.write_text('input = "3x8x8"\nblocks = ["conv 4 k3 z1"]\n')
    with pytest.raises(SpecError, match=r"bad.toml: unknown conv option 'z1'"):
        load(str(bad))
    bad.write_text('input = "3x8x8"\nlayers = ["conv 4"]\n')
    with pytest.raises(SpecError, match="unknown keys"):
        load(str(bad))
    with pytest.raises(SpecError, match="does not exist"):
        load(str(tmp_path / "missing.toml"))


def test_network_validation_names_the_problem():
    net = LayeredNetwork.init("2x6x6, conv 3 k3 p1 maxpool, 4", seed=0)
    conv = net.interactions[0]
    conv.params["weight"] = np.zeros((3, 2, 5, 5), dtype=np.float32)
    with pytest.raises(ValueError, match=r"'weight' has shape \(3, 2, 5, 5\), the layers need \(3, 2, 3, 3\)"):
        LayeredNetwork(net.layer_shapes, net.interactions, net.cost)
    conv.params["weight"] = np.full((3, 2, 3, 3), np.nan, dtype=np.float32)
    with pytest.raises(ValueError, match="NaN or inf"):
        LayeredNetwork(net.layer_shapes, net.interactions, net.cost)
    conv.params["weight"] = np.zeros((3, 2, 3, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=r"layers \[2\] receive no interaction"):
        LayeredNetwork(net.layer_shapes, net.interactions[:2], net.cost)


def test_hash_changes_with_architecture_and_parameters():
    a = LayeredNetwork.init("2x6x6, conv 3 k3 p1 maxpool, 4", seed=0)
    b = LayeredNetwork.init("2x6x6, conv 3 k3 p1 avgpool, 4", seed=0)
    assert a.content_hash() != b.content_hash()
    assert a.content_hash() == a.copy().content_hash()
    c = a.copy()
    c.interactions[0].params["weight"][0, 0, 0, 0] += 1
    assert c.content_hash() != a.content_hash()
    assert a.astype(np.float64).dtype == np.float64

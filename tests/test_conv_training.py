"""Convolutional EBMs from the command line and in EP training: --arch and --preset, checkpoints of layered networks,
exact resume, and the seeded crop+flip augmentation."""
from __future__ import annotations

import numpy as np
import pytest

from ebm_cli.main import build_parser, main, preset_train_defaults
from ebm_sim import storage
from ebm_sim.model import LayeredNetwork
from ebm_sim.training import TrainConfig, augment, crop_flip, fit

pytest.importorskip("torch")

SMALL = "1x8x8, conv 8 k3 p1 maxpool, readout 10"


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "ebm: error: " in err and "Traceback" not in err, err
    return err


def test_init_arch_writes_a_version_2_network(tmp_path, capsys):
    out = tmp_path / "conv.h5"
    assert main(["init", "--arch", "3x8x8, conv 4 k3 s2 p1 avgpool, 6, readout 3", "-o", str(out)]) == 0
    network = storage.load_network(out)
    assert isinstance(network, LayeredNetwork)
    assert network.layer_shapes == ((3, 8, 8), (4, 2, 2), (6,))
    assert main(["info", str(out)]) == 0
    assert "conv2d 0->1" in capsys.readouterr().out


def test_bad_spec_is_refused_before_any_file(tmp_path, capsys):
    out = tmp_path / "bad.h5"
    assert main(["init", "--arch", "1x8x8, conv 4 k3 q1", "-o", str(out)]) == 2
    err = _error(capsys)
    assert "unknown conv option 'q1'" in err and "^^" in err
    assert not out.exists()


def test_train_arch_on_digits_learns(tmp_path):
    out = tmp_path / "net.h5"
    assert main(["train", "--dataset", "digits", "--arch", SMALL, "--optimizer", "sgd", "--lr", "0.1", "--epochs",
                 "2", "--no-progress", "-o", str(out)]) == 0
    assert storage.load_network(out).history["test_acc"][-1] > 0.6  # ten classes: chance is 0.1


def test_train_with_augmentation_resumes_exactly(tmp_path):
    common = ["train", "--dataset", "digits", "--arch", SMALL, "--optimizer", "sgd", "--lr", "0.1", "--batch-size",
              "32", "--limit-train", "300", "--limit-test", "100", "--augment", "crop_flip", "--no-progress"]
    once = tmp_path / "once.h5"
    assert main(common + ["--epochs", "3", "-o", str(once)]) == 0
    trained = storage.load_network(once)
    twice = tmp_path / "twice.h5"
    assert main(common + ["--epochs", "2", "-o", str(twice)]) == 0
    assert main(common + ["--epochs", "3", "--resume", "-o", str(twice)]) == 0
    resumed = storage.load_network(twice)
    for a, b in zip(trained.parameter_arrays(), resumed.parameter_arrays()):
        np.testing.assert_array_equal(a, b)
    assert resumed.history["test_acc"] == trained.history["test_acc"]


def test_train_refuses_an_architecture_that_does_not_fit_the_data(tmp_path, capsys):
    assert main(["train", "--preset", "cifar10-cpu", "--dataset", "digits", "-o", str(tmp_path / "x.h5")]) == 2
    assert "takes 3x32x32 inputs" in _error(capsys)


def test_preset_sets_training_defaults_that_flags_override():
    argv = ["train", "--preset", "laborieux2021-cifar10", "--free-steps", "5", "-o", "net.h5"]
    args = build_parser(preset_train_defaults(argv)).parse_args(argv)
    assert args.dataset == "cifar10" and args.free_steps == 5 and args.nudged_steps == 25
    assert args.lr == [0.25, 0.15, 0.1, 0.08, 0.05] and args.augment == "crop_flip" and args.optimizer == "sgd"
    plain = build_parser(preset_train_defaults(["train", "--layers", "64,10"]))
    assert plain.parse_args(["train", "--dataset", "digits", "--layers", "64,10", "-o", "n.h5"]).free_steps == 30


def test_per_layer_rates_follow_the_post_layer_and_the_readout():
    network = LayeredNetwork.init("1x8x8, conv 4 k3 p1 maxpool, conv 4 k3 p1 maxpool, readout 10", seed=0)
    x = np.random.default_rng(0).random((20, 1, 8, 8)).astype(np.float32)
    y = np.arange(20) % 10
    with pytest.raises(ValueError, match="2 learning rates given for a network with 3 weight"):
        fit(network, x, y, x, y, TrainConfig(epochs=1, lr=[0.1, 0.1], cost="cross_entropy", backend="torch"),
            progress=False, log=lambda _: None)


def test_crop_flip_is_seeded_and_keeps_pixels():
    x = np.arange(2 * 3 * 6 * 6, dtype=np.float32).reshape(2, 3, 6, 6)
    config = TrainConfig(augment="crop_flip", seed=4)
    first, again = augment(config, x, epoch=1, batch=2), augment(config, x, epoch=1, batch=2)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, augment(config, x, epoch=2, batch=2))
    out = crop_flip(x, np.random.default_rng(0), padding=0)  # no room to move: identity or a horizontal flip
    for b in range(2):
        assert np.array_equal(out[b], x[b]) or np.array_equal(out[b], x[b, :, :, ::-1])
    shifted = crop_flip(x, np.random.default_rng(1), padding=4)
    assert shifted.shape == x.shape and set(np.unique(shifted)) <= set(np.unique(x)) | {0.0}
    assert augment(TrainConfig(), x, 0, 0) is x


def test_dense_only_parts_refuse_a_layered_network_clearly(tmp_path, capsys):
    net = tmp_path / "conv.h5"
    assert main(["init", "--arch", SMALL, "-o", str(net)]) == 0
    with pytest.raises(storage.ArtifactError, match="holds a layered network .* the distillation handles dense "
                                                    "networks for now"):
        storage.load_dense_network(net, "the distillation")


def test_layered_ep_step_is_the_same_on_numba_and_torch():
    from ebm_sim.training import layered_ep_gradient, one_hot

    network = LayeredNetwork.init("1x8x8, conv 4 k3 p1 maxpool, conv 6 k3 s2 p1, readout 10", seed=1,
                                  dtype=np.float64)
    x = np.random.default_rng(0).random((6, 1, 8, 8))
    target = one_hot(np.arange(6), 10, np.float64)
    steps = [layered_ep_gradient(network, x, target, TrainConfig(backend=backend, free_steps=15, nudged_steps=5,
                                                                 cost="cross_entropy"))
             for backend in ("numba", "torch")]
    for a, b in zip(steps[0].gradient, steps[1].gradient):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(steps[0].free_steps, steps[1].free_steps)

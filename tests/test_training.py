"""The EP trainer: it learns, it resumes exactly, it records its history, and bad input fails before any work."""
from __future__ import annotations

import numpy as np
import pytest

from ebm_cli.main import main
from ebm_sim import storage
from ebm_sim.datasets import load_digits
from ebm_sim.network import Network
from ebm_sim.training import (HISTORY_KEYS, TrainConfig, ep_gradient, fit, parameters, schedule_scale)


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    rng = np.random.default_rng(0)
    train = rng.choice(len(data.y_train), 400, replace=False)
    return data.x_train[train], data.y_train[train], data.x_test[:200], data.y_test[:200]


def small_config(**overrides):
    settings = dict(epochs=3, batch_size=32, beta=0.5, lr=2e-3, free_steps=30, nudged_steps=10, tol=1e-4)
    settings.update(overrides)
    return TrainConfig(**settings)


def quiet(*_args):
    pass


@pytest.mark.parametrize("nudging", ["symmetric", "positive", "random"])
@pytest.mark.parametrize("optimizer,lr,floor", [("adam", 2e-3, 0.6), ("sgd", 0.1, 0.35)])
def test_every_nudging_and_optimizer_learns(digits, nudging, optimizer, lr, floor):
    x, y, xt, yt = digits
    network = Network.init((64, 64, 10), seed=1)
    fit(network, x, y, xt, yt, small_config(nudging=nudging, optimizer=optimizer, lr=lr), progress=False, log=quiet)
    history = network.history
    assert history["test_acc"][-1] > floor  # chance is 0.1; SGD learns more slowly than Adam in 3 epochs
    assert history["loss"][-1] < history["loss"][0]


def test_history_records_every_epoch(digits):
    x, y, xt, yt = digits
    network = Network.init((64, 32, 10), seed=0)
    fit(network, x, y, xt, yt, small_config(epochs=2, schedule="cosine", weight_decay=1e-4), progress=False,
        log=quiet)
    assert set(network.history) == set(HISTORY_KEYS)
    assert all(len(values) == 2 for values in network.history.values())
    assert network.history["epoch"] == [1.0, 2.0]
    assert network.history["lr_scale"] == [1.0, pytest.approx(0.5)]
    assert all(s > 0 for s in network.history["seconds"])
    assert all(1 <= s <= 30 for s in network.history["free_steps_mean"])


def test_training_is_reproducible(digits):
    x, y, xt, yt = digits
    runs = []
    for _ in range(2):
        network = Network.init((64, 32, 10), seed=3)
        fit(network, x, y, xt, yt, small_config(epochs=2, nudging="random"), progress=False, log=quiet)
        runs.append(parameters(network))
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_interrupted_and_resumed_run_ends_with_the_same_weights(digits, tmp_path, schedule, monkeypatch):
    x, y, xt, yt = digits
    config = small_config(epochs=4, schedule=schedule)
    reference = Network.init((64, 32, 10), seed=5)
    fit(reference, x, y, xt, yt, config, checkpoint_path=tmp_path / "ref.h5", progress=False, log=quiet)

    # interrupt in the middle of epoch 3: the file holds epochs 1-2
    from ebm_sim import training
    calls = {"n": 0}
    original = training.ep_gradient

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2 * 13 + 5:  # 400 samples / 32 = 13 batches per epoch
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "ep_gradient", interrupting)
    path = tmp_path / "run.h5"
    with pytest.raises(KeyboardInterrupt):
        fit(Network.init((64, 32, 10), seed=5), x, y, xt, yt, config, checkpoint_path=path, progress=False,
            log=quiet)
    assert int(storage.load_checkpoint(path)["epoch"]) == 2
    assert not list(tmp_path.glob(".*.tmp"))  # nothing half-written
    monkeypatch.setattr(training, "ep_gradient", original)

    resumed = fit(Network.init((64, 32, 10), seed=5), x, y, xt, yt, config, checkpoint_path=path, resume=True,
                  progress=False, log=quiet)
    for a, b in zip(parameters(resumed), parameters(reference)):
        np.testing.assert_array_equal(a, b)
    stored = storage.load_network(path)
    for a, b in zip(parameters(stored), parameters(reference)):
        np.testing.assert_array_equal(a, b)
    assert stored.history["test_acc"] == reference.history["test_acc"]


def test_more_epochs_extend_a_constant_schedule_run_exactly(digits, tmp_path):
    x, y, xt, yt = digits
    reference = Network.init((64, 32, 10), seed=2)
    fit(reference, x, y, xt, yt, small_config(epochs=3), progress=False, log=quiet)
    path = tmp_path / "net.h5"
    fit(Network.init((64, 32, 10), seed=2), x, y, xt, yt, small_config(epochs=2), checkpoint_path=path,
        progress=False, log=quiet)
    extended = fit(Network.init((64, 32, 10), seed=2), x, y, xt, yt, small_config(epochs=3), checkpoint_path=path,
                   resume=True, progress=False, log=quiet)
    for a, b in zip(parameters(extended), parameters(reference)):
        np.testing.assert_array_equal(a, b)


def test_resume_refuses_other_settings_or_data(digits, tmp_path):
    x, y, xt, yt = digits
    path = tmp_path / "net.h5"
    fit(Network.init((64, 32, 10), seed=0), x, y, xt, yt, small_config(epochs=1), checkpoint_path=path,
        progress=False, log=quiet)
    with pytest.raises(ValueError, match=r"configuration differs \(beta: 0.5 -> 0.25\)"):
        fit(Network.init((64, 32, 10), seed=0), x, y, xt, yt, small_config(epochs=2, beta=0.25),
            checkpoint_path=path, resume=True, progress=False, log=quiet)
    with pytest.raises(ValueError, match="other data"):
        fit(Network.init((64, 32, 10), seed=0), x[:300], y[:300], xt, yt, small_config(epochs=2),
            checkpoint_path=path, resume=True, progress=False, log=quiet)
    storage.save_network(tmp_path / "plain.h5", Network.init((64, 32, 10), seed=0))
    with pytest.raises(ValueError, match="no training checkpoint"):
        fit(Network.init((64, 32, 10), seed=0), x, y, xt, yt, small_config(), checkpoint_path=tmp_path / "plain.h5",
            resume=True, progress=False, log=quiet)


@pytest.mark.parametrize("overrides,phrase", [
    (dict(beta=0.0), "beta must be > 0"),
    (dict(beta=-0.5, nudging="symmetric"), "beta must be > 0"),
    (dict(lr=-1e-3), "learning rates must be finite and >= 0"),
    (dict(lr=[1e-3, -1.0]), "learning rates must be finite and >= 0"),
    (dict(epochs=0), "epochs must be a positive integer"),
    (dict(batch_size=2.5), "batch_size must be a positive integer"),
    (dict(momentum=1.0), "momentum must be < 1"),
    (dict(weight_decay=-1.0), "weight_decay must be >= 0"),
    (dict(nudging="sideways"), "unknown nudging 'sideways'"),
    (dict(optimizer="lbfgs"), "unknown optimizer 'lbfgs'"),
    (dict(method="solve_ivp"), "trains with method fixed_point, euler, alternating, rk45, not 'solve_ivp'"),
    (dict(tol=-1e-4), "tol must be >= 0"),
    (dict(tol=0.0, method="rk45"), "tol must be > 0"),
    (dict(free_steps=0), "free_steps must be a positive integer"),
])
def test_nonsensical_hyperparameters_are_refused(overrides, phrase):
    with pytest.raises(ValueError, match=phrase):
        small_config(**overrides)


def test_data_that_does_not_fit_is_refused_before_any_work(digits):
    x, y, xt, yt = digits
    network = Network.init((64, 32, 10), seed=0)
    before = [p.copy() for p in parameters(network)]
    with pytest.raises(ValueError, match="input layer has 64 units"):
        fit(network, x[:, :50], y, xt, yt, small_config(), progress=False, log=quiet)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\) "):
        fit(network, x, np.where(y == 3, 12, y), xt, yt, small_config(), progress=False, log=quiet, num_classes=10)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\) .*, found 0\.\.12"):  # classes: the output's
        fit(network, x, np.where(y == 3, 12, y), xt, yt, small_config(), progress=False, log=quiet)
    with pytest.raises(ValueError, match="output layer has 7 units but the dataset has 10 classes"):
        fit(Network.init((64, 32, 7), seed=0), x, y, xt, yt, small_config(), progress=False, log=quiet,
            num_classes=10)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 7\) \(the output layer's 7 units\)"):
        fit(Network.init((64, 32, 7), seed=0), x, y, xt, yt, small_config(), progress=False, log=quiet)
    with pytest.raises(ValueError, match="2 learning rates given for a network with 2 weight matrices|"
                                         "3 learning rates given"):
        fit(network, x, y, xt, yt, small_config(lr=[1e-3, 1e-3, 1e-3]), progress=False, log=quiet)
    for a, b in zip(parameters(network), before):
        np.testing.assert_array_equal(a, b)


def test_cosine_schedule_values():
    config = small_config(epochs=4, schedule="cosine")
    assert [schedule_scale(config, e) for e in range(4)] == pytest.approx([1.0, 0.853553, 0.5, 0.146447], abs=1e-6)


def test_symmetric_nudging_gradient_is_the_average_of_the_one_sided_ones(digits):
    """(g(+beta) + g(-beta)) / 2 = symmetric g when every phase runs to convergence: a consistency check."""
    x, y, _, _ = digits
    network = Network.init((64, 16, 10), seed=0, dtype=np.float64)
    target = np.eye(10)[y[:8]]
    common = dict(beta=0.1, tol=1e-12, free_steps=5000, nudged_steps=5000)
    sym = ep_gradient(network, x[:8], target, TrainConfig(nudging="symmetric", **common)).gradient
    plus = ep_gradient(network, x[:8], target, TrainConfig(nudging="positive", **common), 1.0).gradient
    minus = ep_gradient(network, x[:8], target, TrainConfig(nudging="positive", **common), -1.0).gradient
    for s, p, m in zip(sym, plus, minus):
        np.testing.assert_allclose(s, 0.5 * (p + m), atol=1e-10)


def test_cli_train_then_resume(tmp_path, capsys):
    out = tmp_path / "net.h5"
    args = ["train", "--dataset", "digits", "--limit-train", "300", "--limit-test", "100", "--layers", "64,32,10",
            "--epochs", "2", "--batch-size", "32", "--lr", "2e-3", "--no-progress", "-o", str(out)]
    assert main(args) == 0
    assert "final test accuracy" in capsys.readouterr().out
    assert main(args) == 2
    assert "exists: pass --resume" in capsys.readouterr().err
    more = args.copy()
    more[more.index("--epochs") + 1] = "3"
    assert main(more + ["--resume"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert storage.load_network(out).history["epoch"] == [1.0, 2.0, 3.0]
    assert main(["train", "--dataset", "digits", "--layers", "784,32,10", "-o", str(tmp_path / "x.h5")]) == 2
    assert "do not fit digits" in capsys.readouterr().err
    assert main(["train", "--dataset", "digits", "--layers", "64,32,10", "--lr", "-1", "-o",
                 str(tmp_path / "x.h5")]) == 2
    assert not (tmp_path / "x.h5").exists()


def test_cross_entropy_readout_learns_and_refuses_a_mismatched_network(digits):
    x, y, xt, yt = digits
    network = Network.init((64, 64, 32, 10), seed=0, readout=True)
    fit(network, x, y, xt, yt, small_config(cost="cross_entropy", epochs=5), progress=False, log=quiet)
    assert network.history["test_acc"][-1] > 0.6  # chance is 0.1
    assert network.history["loss"][-1] < network.history["loss"][0]
    with pytest.raises(ValueError, match="needs a network with a softmax readout"):
        fit(Network.init((64, 32, 10), seed=0), x, y, xt, yt, small_config(cost="cross_entropy"), progress=False,
            log=quiet)
    with pytest.raises(ValueError, match="train it with cost 'cross_entropy'"):
        fit(Network.init((64, 32, 10), seed=0, readout=True), x, y, xt, yt, small_config(), progress=False,
            log=quiet)


def test_cross_entropy_ep_gradient_matches_finite_differences():
    """Readout network 6-5-4-3 (two relaxing layers, softmax readout): symmetric EP with a small beta against central
    differences of the mean cross-entropy at the free fixed point, every parameter including the readout's."""
    from ebm_sim import energy
    from ebm_sim.relax import relax
    network = Network.init((6, 5, 4, 3), seed=1, dtype=np.float64, gain=0.8, readout=True)
    x = np.random.default_rng(0).random((4, 6))
    target = np.eye(3)[[0, 1, 2, 0]]

    def loss():
        free = relax(network, x, tol=1e-13, max_steps=100000)
        return energy.cost(network, free.states, target).mean()

    config = TrainConfig(beta=1e-3, tol=1e-13, free_steps=100000, nudged_steps=100000, cost="cross_entropy")
    estimate = ep_gradient(network, x, target, config).gradient
    for param, grad in zip(parameters(network), estimate):
        numeric = np.zeros_like(param)
        for index in np.ndindex(param.shape):
            old = param[index]
            param[index] = old + 1e-6
            up = loss()
            param[index] = old - 1e-6
            down = loss()
            param[index] = old
            numeric[index] = (up - down) / 2e-6
        assert np.abs(grad - numeric).max() <= 1e-5 * np.abs(numeric).max() + 1e-9

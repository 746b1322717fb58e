"""Convolutional students and baselines (distill/ on layered EBMs, ``ebm_sim.model.LayeredNetwork``): the student's
layers have the EBM's shapes; with the EBM's weights it computes exactly the EBM's bottom-up feedforward sweep;
distillation from fixed points (built in memory with ``dynamics.relax``) lowers the matching loss and agrees with the
EBM; standard and PGD baselines of the same architecture train; ONNX float and int8 exports are measured; files
round-trip; bad inputs raise ValueError naming the problem.

Small shapes: 3x8x8 inputs, 3 classes of synthetic images (a colour/shape pattern per class plus noise)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from distill import io as dio  # noqa: E402
from distill.baselines import baseline_model, pgd_attack, robust_accuracy, train_baseline  # noqa: E402
from distill.config import PGD_PRESETS, BaselineConfig, DistillConfig  # noqa: E402
from distill.models import LayeredFeedForward, student_for  # noqa: E402
from distill.train import check_fixed_points, compare_with_ebm, distill, evaluate, matching_loss  # noqa: E402
from ebm_sim import storage  # noqa: E402
from ebm_sim.model import dynamics, energy  # noqa: E402
from ebm_sim.model.network import LayeredNetwork  # noqa: E402

QUIET = dict(progress=False, log=lambda msg: None)
NORMALIZATION = {"mean": [0.5, 0.45, 0.4], "std": [0.25, 0.25, 0.3]}
ARCHITECTURES = {
    "maxpool": "3x8x8, conv 4 k3 p1 maxpool, conv 8 k3 s2 p1, readout 3",   # layers 4x4x4, 8x2x2
    "avgpool": "3x8x8, conv 4 k3 p1 avgpool, dense 16, readout 3",          # layers 4x4x4, 16
    "squared": "3x8x8, conv 4 k3 p1 maxpool, conv 3 k4",                    # no readout: s_L = 3x1x1 is the output
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _network(name: str, seed: int = 0) -> LayeredNetwork:
    return LayeredNetwork.init(ARCHITECTURES[name], seed=seed, activation="hard_sigmoid_half",
                               normalization=NORMALIZATION)


def _images(num: int, seed: int) -> tuple:
    """(x (num, 3, 8, 8) float32 in [0, 1], y (num,)): class 0 a bright red top half, 1 green vertical stripes,
    2 a blue centre square; background 0.3, Gaussian noise 0.2, clipped."""
    rng = np.random.default_rng(seed)
    patterns = np.zeros((3, 3, 8, 8), dtype=np.float32)
    patterns[0, 0, :4, :] = 0.6
    patterns[1, 1, :, ::2] = 0.6
    patterns[2, 2, 2:6, 2:6] = 0.6
    y = rng.integers(0, 3, num)
    x = np.clip(0.3 + patterns[y] + 0.2 * rng.standard_normal((num, 3, 8, 8)), 0, 1).astype(np.float32)
    return x, y


def _fixed_points(network, x, y):
    """The EBM's fixed points in memory (the FixedPointDataset ``ebm relax`` writes): inputs (N, 3, 8, 8), states
    [(N, *shape_k)]."""
    r = dynamics.relax(network, x, method="fixed_point", tol=1e-5, max_steps=500)
    return storage.FixedPointDataset(inputs=x, labels=y, states=list(r.states), residuals=np.asarray(r.residual),
                                     steps=np.asarray(r.steps), converged=np.asarray(r.converged),
                                     settings={"method": "fixed_point", "tol": 1e-5, "dataset": "synthetic"},
                                     network_hash=network.content_hash())


def _feedforward_sweep(network, x) -> list:
    """The EBM's first bottom-up sweep, on the simulator's numpy reference: from zero states, layer k = 1..L in order
    is set to s_k = clip(a h_k, 0, 1) with h_k its local field (``energy.local_fields``) while the layers above are
    still zero (so their feedback, the pre fields, vanish): s_k = rho(sum of post fields from below + bias)."""
    s0 = network.normalize(x)
    states = network.zero_states(x.shape[0])
    for k in range(network.num_layers):
        states[k] = np.clip(network.slope * energy.local_fields(network, s0, states, layers=[k])[k], 0.0, 1.0)
    return states


@pytest.fixture(scope="module")
def data():
    return {"train": _images(360, 0), "test": _images(150, 1)}


@pytest.fixture(scope="module")
def ebm(data):
    """A maxpool EBM whose predictions are not trivial: its weights are a standard baseline's of the same architecture
    trained on the labels (EP training is elsewhere); its fixed points (feedback on) on train and test."""
    config = BaselineConfig(epochs=8, lr=1e-2, batch_size=32, patience=None, val_fraction=0.0, seed=0)
    trained, _ = train_baseline(_network("maxpool"), *data["train"], config, **QUIET)
    network = trained.to_network()
    return {"network": network, "train": _fixed_points(network, *data["train"]),
            "test": _fixed_points(network, *data["test"])}


# ---------------------------------------------------------------------------------------------- the student
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_student_layers_have_the_ebm_shapes(name, data):
    network = _network(name)
    student = student_for(network, seed=0)
    assert isinstance(student, LayeredFeedForward) and student.slope == network.slope == 0.5
    x = torch.from_numpy(data["test"][0][:7])
    states, logits, zs = student.forward_layers(x, preactivations=True)
    assert [tuple(s.shape[1:]) for s in states] == list(network.state_shapes)
    assert [tuple(z.shape) for z in zs] == [tuple(s.shape) for s in states]
    assert tuple(logits.shape) == (7, network.num_classes) == (7, 3)
    assert all(float(s.detach().min()) >= 0 and float(s.detach().max()) <= 1 for s in states)
    flat = student(x.reshape(7, -1))  # flat images are reshaped to (B, 3, 8, 8)
    assert torch.equal(flat, logits)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_student_with_ebm_weights_is_the_ebm_feedforward_sweep(name, data):
    """What is compared: per layer, the student (torch, EBM weights) against the EBM's bottom-up sweep computed with
    the simulator's numpy reference (``_feedforward_sweep``). One synchronous relaxation step from zero is not that
    sweep (every layer sees the zero states below it: s_2 = rho(b_2)), and the fixed point is not it either
    (feedback)."""
    network = _network(name, seed=2)
    x = data["test"][0][:20]
    student = LayeredFeedForward.from_network(network, init_from_ebm=True)
    states, logits = student.forward_layers(torch.from_numpy(x))
    sweep = _feedforward_sweep(network, x)
    for k, (a, s) in enumerate(zip(states, sweep)):
        assert np.max(np.abs(a.detach().numpy() - s)) < 1e-5, f"layer {k + 1}"
    expected = energy.output(network, sweep) if network.cost.kind == "softmax_readout" else None
    if expected is not None:
        assert np.max(np.abs(logits.detach().numpy() - expected)) < 1e-5
    else:  # no readout: logits are slope * u_L, unclipped; clip(logits) is the output state
        assert np.max(np.abs(np.clip(logits.detach().numpy(), 0, 1) - sweep[-1].reshape(20, -1))) < 1e-5
    one_step = dynamics.relax(network, x, tol=0.0, max_steps=1, per_sample=False).states
    assert np.max(np.abs(one_step[1] - sweep[1])) > 1e-3
    fixed = dynamics.relax(network, x, tol=1e-6, max_steps=500).states
    assert np.max(np.abs(fixed[0] - sweep[0])) > 1e-4  # feedback from layer 2 moves layer 1


def test_student_random_init_is_seeded_and_round_trips_its_parameters():
    network = _network("avgpool")
    a, b = LayeredFeedForward.from_network(network, seed=5), LayeredFeedForward.from_network(network, seed=5)
    c = LayeredFeedForward.from_network(network, seed=6)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.params["i0_weight"], c.params["i0_weight"])
    state = a.parameter_state()
    assert set(state) == {"i0/weight", "i1/bias", "i2/weight", "i3/bias", "cost/weight", "cost/bias"}
    c.load_parameter_state(state)
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a(x), c(x))
    assert torch.equal(LayeredFeedForward.from_network(a.to_network(), init_from_ebm=True)(x), a(x))


# ---------------------------------------------------------------------------------------------- distillation
def test_distillation_lowers_the_matching_loss_and_agrees_with_the_ebm(ebm):
    network, train, test = ebm["network"], ebm["train"], ebm["test"]
    assert [tuple(s.shape[1:]) for s in train.states] == [(4, 4, 4), (8, 2, 2)]
    check_fixed_points(network, train)
    before = compare_with_ebm(student_for(network, seed=0), network, test)
    config = DistillConfig(epochs=25, lr=1e-2, batch_size=32, seed=0, patience=None)
    student, history = distill(network, train, config, **QUIET)
    after = compare_with_ebm(student, network, test)
    assert history["val_loss"][-1] < 0.5 * history["val_loss"][0]
    assert all(m1 < 0.5 * m0 for m0, m1 in zip(before["state_mse"], after["state_mse"]))
    ebm_predictions = np.argmax(energy.output(network, test.states), axis=1)
    majority = np.bincount(ebm_predictions, minlength=3).max() / len(ebm_predictions)
    assert after["ebm_accuracy"] > 0.6  # the EBM is not trivial
    assert after["agreement"] > max(majority, 1 / 3) + 0.1 and after["agreement"] > 0.8
    # the loss it was trained on, the dense path's matching loss on (B, C, H, W) pre-activations, fell on held-out data
    x = torch.from_numpy(test.inputs)
    with torch.no_grad():
        zs_after = student.forward_layers(x, preactivations=True)[2]
        zs_before = student_for(network, seed=0).forward_layers(x, preactivations=True)[2]
    for z0, z1, s in zip(zs_before, zs_after, test.states):
        assert float(matching_loss(z1, torch.from_numpy(s))) < 0.5 * float(matching_loss(z0, torch.from_numpy(s)))


def test_init_from_ebm_starts_near_the_fixed_points(ebm):
    network, test = ebm["network"], ebm["test"]
    copied = compare_with_ebm(LayeredFeedForward.from_network(network, init_from_ebm=True), network, test)
    random = compare_with_ebm(LayeredFeedForward.from_network(network, seed=0), network, test)
    assert all(c < r for c, r in zip(copied["state_mse"], random["state_mse"]))
    assert copied["agreement"] > random["agreement"]


def test_distilled_conv_student_file_round_trip_and_resume(ebm, tmp_path):
    network, train = ebm["network"], ebm["train"]
    config = DistillConfig(epochs=3, lr=1e-2, batch_size=64, seed=1, patience=None)
    fp_hash = "ab" * 32
    full, history = distill(network, train, config, checkpoint_path=tmp_path / "full.h5", fixed_points_hash=fp_hash,
                            **QUIET)
    record = dio.load_feedforward(tmp_path / "full.h5")
    assert isinstance(record.model, LayeredFeedForward) and record.kind == "distilled"
    assert record.network_hash == network.content_hash() and record.model_hash == dio.model_hash(full)
    x = torch.from_numpy(train.inputs[:16])
    assert torch.equal(record.model(x), full(x))
    assert torch.equal(dio.load_model(tmp_path / "full.h5")(x), full(x))

    def interrupt(message):
        if message.startswith("epoch 2/"):
            raise KeyboardInterrupt

    path = tmp_path / "run.h5"
    with pytest.raises(KeyboardInterrupt):
        distill(network, train, config, checkpoint_path=path, fixed_points_hash=fp_hash, progress=False,
                log=interrupt)
    assert dio.load_feedforward(path).checkpoint_state["epoch"] == 1
    resumed, resumed_history = distill(network, train, config, checkpoint_path=path, resume=True,
                                       fixed_points_hash=fp_hash, **QUIET)
    assert all(torch.equal(p, q) for p, q in zip(full.parameters(), resumed.parameters()))
    assert history["val_loss"] == resumed_history["val_loss"]


# ---------------------------------------------------------------------------------------------- baselines
def test_standard_and_pgd_baselines_of_the_conv_architecture_train(data, tmp_path):
    x, y = data["train"]
    x_test, y_test = data["test"]
    network = _network("maxpool")
    standard, history = train_baseline(network, x, y, BaselineConfig(epochs=6, lr=1e-2, batch_size=32, seed=0),
                                       checkpoint_path=tmp_path / "standard.h5", **QUIET)
    assert isinstance(standard, LayeredFeedForward) and standard.architecture == network.describe()
    assert evaluate(standard, x_test, y_test)["accuracy"] > 0.7
    config = BaselineConfig.for_dataset("cifar10", kind="pgd-at", epochs=4, lr=1e-2, batch_size=32, seed=0)
    assert (config.eps, config.pgd_steps, config.step_size, config.augment) == (8 / 255, 7, 2 / 255, "crop_flip") \
        == tuple(PGD_PRESETS["cifar"].values())
    robust, history = train_baseline(network, x, y, config, **QUIET)
    assert "val_robust_accuracy" in history and np.isfinite(history["val_loss"]).all()
    report = robust_accuracy(robust, x_test, y_test, eps=8 / 255, steps=7, step_size=2 / 255)
    assert report["clean_accuracy"] > 1 / 3 and report["robust_accuracy"] <= report["clean_accuracy"]
    adv = pgd_attack(robust, torch.from_numpy(x_test[:10]), torch.from_numpy(y_test[:10]), 8 / 255, 7, 2 / 255)
    assert tuple(adv.shape) == (10, 3, 8, 8)
    assert float((adv - torch.from_numpy(x_test[:10])).abs().max()) <= 8 / 255 + 1e-6
    assert dio.load_feedforward(tmp_path / "standard.h5").kind == "standard"


def test_baseline_augmentation_is_seeded_and_needs_images(data, tmp_path):
    """augment="crop_flip" (the CIFAR recipe, as the EBM presets train): reproducible from the seed, a different
    training from none, refused for a dense model and for an unknown name."""
    x, y = data["train"]
    network = _network("maxpool")
    runs = [train_baseline(network, x[:64], y[:64], BaselineConfig(epochs=1, batch_size=32, seed=0, augment=a),
                           **QUIET)[0] for a in ("crop_flip", "crop_flip", "none")]
    weights = [torch.cat([p.detach().flatten() for p in model.parameters()]) for model in runs]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])
    with pytest.raises(ValueError, match="crops and flips images"):
        train_baseline((192, 16, 10), x[:8].reshape(8, -1), y[:8], BaselineConfig(epochs=1, augment="crop_flip"),
                       **QUIET)
    with pytest.raises(ValueError, match="unknown augment 'mixup'"):
        BaselineConfig(augment="mixup")


# ---------------------------------------------------------------------------------------------- ONNX
@pytest.mark.parametrize("name", ["maxpool", "avgpool"])
def test_onnx_float_and_int8_exports_of_a_conv_student(name, data, tmp_path):
    from distill.onnx_export import OnnxClassifier, export_onnx, measure_export, quantize_onnx

    network = _network(name, seed=3)
    student = LayeredFeedForward.from_network(network, init_from_ebm=True)
    x, y = data["test"]
    float_path = export_onnx(student, tmp_path / "student.onnx", input_shape=student.input_shape,
                             metadata={"kind": "distilled"})
    assert OnnxClassifier(float_path).input_shape == (3, 8, 8)
    exact = measure_export(student, float_path, x, y)
    assert exact["max_abs_difference"] < 1e-5 and exact["prediction_agreement"] == 1.0
    assert exact["accuracy_onnx"] == exact["accuracy_torch"] and exact["quantization"] == "none"
    int8_path = quantize_onnx(float_path, tmp_path / "student_int8.onnx")
    quantized = measure_export(student, int8_path, x, y)
    assert quantized["quantization"] == "int8" and quantized["n"] == 150
    assert quantized["prediction_agreement"] > 0.8 and quantized["max_abs_difference"] < 0.2


# ---------------------------------------------------------------------------------------------- refusals
def test_bad_inputs_raise_value_errors_naming_the_problem(ebm, data, tmp_path):
    from ebm_sim.network import Network

    network = ebm["network"]
    student = LayeredFeedForward.from_network(network)
    with pytest.raises(ValueError, match=r"images \(B, 3, 8, 8\)"):
        student(torch.zeros(2, 3, 9, 9))
    with pytest.raises(ValueError, match="LayeredNetwork"):
        LayeredFeedForward(Network.init((4, 3, 2)))
    with pytest.raises(ValueError, match="no student for a str"):
        student_for("3x8x8, conv 4")
    with pytest.raises(ValueError, match="shape"):
        student.load_parameter_state({**student.parameter_state(), "i0/weight": np.zeros((4, 3, 2, 2))})
    fp = ebm["test"]
    flat = storage.FixedPointDataset(inputs=fp.inputs.reshape(len(fp.inputs), -1), labels=fp.labels,
                                     states=fp.states, residuals=fp.residuals, steps=fp.steps,
                                     converged=fp.converged, settings=fp.settings, network_hash=fp.network_hash)
    with pytest.raises(ValueError, match="input and state shapes"):
        distill(network, flat, DistillConfig(epochs=1), **QUIET)
    other = _network("maxpool", seed=9)
    with pytest.raises(ValueError, match="another network"):
        distill(other, fp, DistillConfig(epochs=1), **QUIET)
    with pytest.raises(ValueError, match="layer weights"):
        distill(network, fp, DistillConfig(epochs=1, layer_weight=[1.0, 1.0, 1.0]), **QUIET)
    x, y = data["train"]
    with pytest.raises(ValueError, match="takes 3x8x8 inputs"):
        train_baseline(network, x[:, :, :4], y, BaselineConfig(epochs=1), **QUIET)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        train_baseline(network, x, y + 5, BaselineConfig(epochs=1), **QUIET)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        train_baseline(network, x * 2, y, BaselineConfig(epochs=1), **QUIET)
    with pytest.raises(ValueError, match="come from the LayeredNetwork"):
        baseline_model(network, readout=True)
    with pytest.raises(ValueError, match="no PGD preset for dataset 'svhn'"):
        BaselineConfig.for_dataset("svhn")
    with pytest.raises(ValueError, match="NaN"):
        broken = LayeredFeedForward.from_network(network)
        with torch.no_grad():
            broken.params["i0_weight"][0, 0, 0, 0] = float("nan")
        dio.save_model(tmp_path / "nan.h5", broken, "standard", {})
    assert not (tmp_path / "nan.h5").exists()

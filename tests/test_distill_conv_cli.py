"""The distillation commands on convolutional (layered) EBMs: ``ebm init --arch`` -> ``ebm relax`` (train and test
splits, fixed points that keep their layer shapes) -> ``ebm distill`` -> ``ebm export-onnx``, and ``ebm baseline`` of
the same architecture (--like NET.h5 or --arch SPEC), with the PGD budget of the dataset unless given; bad inputs
exit 2 with a message naming the problem.

Tiny data: the embedded ``digits`` dataset (1x8x8 images, 10 classes), a 4-channel conv layer with 2x2 max pooling
and a softmax readout; a few hundred samples, one to three epochs."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from distill import io as dio  # noqa: E402
from distill.config import PGD_PRESETS  # noqa: E402
from distill.models import LayeredFeedForward  # noqa: E402
from ebm_cli.main import main  # noqa: E402
from ebm_sim import datasets, storage  # noqa: E402

ARCH = "1x8x8, conv 4 k3 p1 maxpool, readout 10"
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _error(capsys) -> str:
    """The ``ebm: error: ...`` message of a refused command (never a traceback)."""
    err = capsys.readouterr().err
    assert err.startswith("ebm: error: ") or "\nebm: error: " in err or "error: argument" in err, err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """An untrained conv network and its fixed points on 240 training and 100 test digits (ebm relax)."""
    folder = tmp_path_factory.mktemp("conv-cli")
    paths = {"net": folder / "net.h5", "train": folder / "fp_train.h5", "test": folder / "fp_test.h5"}
    assert main(["init", "--arch", ARCH, "--seed", "0", "-o", str(paths["net"])]) == 0
    for split, limit in (("train", "240"), ("test", "100")):
        assert main(["relax", str(paths["net"]), "--dataset", "digits", "--split", split, "--limit", limit,
                     "--no-progress", "-o", str(paths[split])]) == 0
    return paths


@pytest.fixture
def fake_cifar(monkeypatch):
    """``load_dataset("cifar10")`` answers a tiny synthetic 3x8x8, 3-class dataset named cifar10 (no files needed);
    other names load as usual."""
    load = datasets.load_dataset
    rng = np.random.default_rng(0)

    def fake(name, data_dir=None, limit_train=None, limit_test=None, seed=0):
        if name != "cifar10":
            return load(name, data_dir, limit_train=limit_train, limit_test=limit_test, seed=seed)
        return datasets.Dataset(x_train=rng.random((60, 192), dtype=np.float32), y_train=rng.integers(0, 3, 60),
                                x_test=rng.random((20, 192), dtype=np.float32), y_test=rng.integers(0, 3, 20),
                                name="cifar10", image_shape=(3, 8, 8), num_classes=3)

    monkeypatch.setattr(datasets, "load_dataset", fake)


def test_relaxed_conv_fixed_points_keep_their_shapes(files):
    network = storage.load_network(files["net"])
    fp = storage.load_fixed_points(files["test"], network=network)
    assert fp.inputs.shape == (100, 1, 8, 8) and [s.shape for s in fp.states] == [(100, 4, 4, 4)]


def test_distill_and_export_a_conv_student(files, tmp_path, capsys):
    student = tmp_path / "student.h5"
    capsys.readouterr()
    assert main(["distill", str(files["net"]), str(files["train"]), "--test-fixed-points", str(files["test"]),
                 "--epochs", "3", "--lr", "1e-2", "--init-from-ebm", "--no-progress", "-o", str(student)]) == 0
    out = capsys.readouterr().out
    assert "distilling layers 1x8x8-4x4x4 (softmax_readout)" in out
    assert "fit set" in out and "test          100 samples" in out and f"wrote {student}" in out
    network = storage.load_network(files["net"])
    record = dio.load_feedforward(student)
    assert isinstance(record.model, LayeredFeedForward) and record.kind == "distilled"
    assert record.network_hash == network.content_hash() and record.model.architecture == network.describe()
    assert record.fixed_points_hash == dio.stored_content_hash(files["train"])
    assert record.provenance["network_file"] == "net.h5" and record.config["init_from_ebm"]
    assert main(["info", str(student)]) == 0 and "ebm-feedforward" in capsys.readouterr().out

    from distill.onnx_export import OnnxClassifier

    onnx_path = tmp_path / "student.onnx"
    assert main(["export-onnx", str(student), "-o", str(onnx_path)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {onnx_path}: distilled model layers 1x8x8-4x4x4" in out and "64 random inputs" in out
    assert "same prediction on 100.0%" in out and "accuracy" not in out
    classifier = OnnxClassifier(onnx_path)
    assert classifier.input_shape == (1, 8, 8) and classifier.metadata["layer_shapes"] == [[1, 8, 8], [4, 4, 4]]
    assert classifier.metadata["network_hash"] == network.content_hash()

    int8_path = tmp_path / "student-int8.onnx"
    assert main(["export-onnx", str(student), "--quantize", "int8", "--dataset", "digits", "--check-samples", "50",
                 "-o", str(int8_path)]) == 0
    out = capsys.readouterr().out
    assert "distilled model (int8-quantized)" in out and "on 50 digits test images" in out
    assert "% (onnxruntime) / " in out and "% (torch)" in out
    assert OnnxClassifier(int8_path).quantization == "int8"


def test_distill_refusals(files, tmp_path, capsys):
    out = tmp_path / "s.h5"
    capsys.readouterr()
    other = tmp_path / "other.h5"
    assert main(["init", "--arch", ARCH, "--seed", "1", "-o", str(other)]) == 0
    assert main(["distill", str(other), str(files["train"]), "-o", str(out)]) == 2
    assert "computed by another network" in _error(capsys)
    # the right network's hash, but flat inputs and states (version 1): the shapes do not fit the network
    fp = storage.load_fixed_points(files["test"])
    flat = tmp_path / "flat.h5"
    storage.save_fixed_points(flat, fp.inputs.reshape(100, -1), fp.labels, [s.reshape(100, -1) for s in fp.states],
                              fp.residuals, fp.steps, fp.converged, fp.settings, fp.network_hash)
    assert main(["distill", str(files["net"]), str(files["train"]), "--test-fixed-points", str(flat),
                 "-o", str(out)]) == 2
    err = _error(capsys)
    assert str(flat) in err and "input and state shapes [(64,), (64,)]" in err and "[(1, 8, 8), (4, 4, 4)]" in err
    assert main(["distill", str(files["net"]), str(files["net"]), "-o", str(out)]) == 2
    assert "was expected" in _error(capsys)
    assert main(["distill", str(files["net"]), str(files["train"]), "--layer-weight", "1,1,1", "--no-progress",
                 "-o", str(out)]) == 2
    assert "layer weights" in _error(capsys)
    assert not out.exists()


def test_baseline_of_the_conv_architecture(files, tmp_path, capsys):
    """--like NET.h5 and --arch SPEC build the same architecture (fresh weights); standard training reports the
    digits PGD budget (0.1, 10 steps of 0.025); pgd-at takes the given budget, the rest from the dataset's."""
    common = ["--dataset", "digits", "--epochs", "1", "--limit-train", "200", "--limit-test", "50", "--no-progress"]
    like, arch = tmp_path / "like.h5", tmp_path / "arch.h5"
    capsys.readouterr()
    assert main(["baseline", "--kind", "standard", "--like", str(files["net"]), *common, "-o", str(like)]) == 0
    out = capsys.readouterr().out
    assert "standard baseline (layers 1x8x8-4x4x4 (softmax_readout)) on digits" in out
    assert "under PGD Linf eps 0.1 (10 steps of 0.025)" in out and f"wrote {like}" in out
    assert main(["baseline", "--kind", "standard", "--arch", ARCH, *common, "-o", str(arch)]) == 0
    network = storage.load_network(files["net"])
    records = [dio.load_feedforward(p) for p in (like, arch)]
    for record in records:
        assert isinstance(record.model, LayeredFeedForward) and record.kind == "standard"
        assert record.model.architecture == network.describe() and record.dataset == "digits"
    assert records[0].model.layer_shapes == records[1].model.layer_shapes == network.layer_shapes
    assert records[0].provenance["like_network_hash"] == network.content_hash()

    robust = tmp_path / "pgd.h5"
    capsys.readouterr()
    assert main(["baseline", "--kind", "pgd-at", "--like", str(files["net"]), *common, "--eps", "0.05",
                 "--pgd-steps", "2", "-o", str(robust)]) == 0
    assert "PGD adversarial training (eps 0.05, 2 steps of 0.025)" in capsys.readouterr().out
    record = dio.load_feedforward(robust)
    assert (record.config["eps"], record.config["pgd_steps"], record.config["pgd_step_size"]) == (0.05, 2, 0.025)
    assert "val_robust_accuracy" in record.history

    onnx_path = tmp_path / "pgd.onnx"
    assert main(["export-onnx", str(robust), "--dataset", "digits", "--check-samples", "40", "-o",
                 str(onnx_path)]) == 0
    out = capsys.readouterr().out
    assert "pgd-at model layers 1x8x8-4x4x4" in out and "same prediction on 100.0%" in out


def test_baseline_budget_follows_the_dataset(fake_cifar, tmp_path, capsys):
    """On cifar10 (a synthetic stand-in) the default PGD budget is CIFAR's 8/255, 7 steps of 2/255, with crop+flip for
    a convolutional baseline (none for dense layers)."""
    spec = "3x8x8, conv 2 k3 p1 avgpool, readout 3"
    common = ["--kind", "standard", "--dataset", "cifar10", "--arch", spec, "--epochs", "1", "--no-progress"]
    capsys.readouterr()
    assert main(["baseline", *common, "-o", str(tmp_path / "a.h5")]) == 0
    cifar = PGD_PRESETS["cifar"]
    assert f"eps {cifar['eps']:g} ({cifar['pgd_steps']} steps of {cifar['pgd_step_size']:g})" in \
        capsys.readouterr().out
    assert main(["baseline", *common, "--eps", "0.01", "-o", str(tmp_path / "b.h5")]) == 0
    record = dio.load_feedforward(tmp_path / "b.h5")
    assert record.config["eps"] == 0.01 and record.config["pgd_steps"] == 7
    assert record.model.input_shape == (3, 8, 8) and record.config["augment"] == "crop_flip"  # CIFAR's recipe
    dense = ["--kind", "standard", "--dataset", "cifar10", "--layers", "192,8,3", "--epochs", "1", "--no-progress"]
    assert main(["baseline", *dense, "-o", str(tmp_path / "c.h5")]) == 0  # dense layers: nothing to crop
    assert dio.load_feedforward(tmp_path / "c.h5").config["augment"] == "none"


def test_baseline_and_export_refusals(files, fake_cifar, tmp_path, capsys):
    out = tmp_path / "m.h5"
    base = ["baseline", "--kind", "standard", "--dataset", "digits", "--epochs", "1", "--no-progress"]
    capsys.readouterr()
    assert main([*base, "--arch", "3x8x8, conv 4 k3 p1 maxpool, readout 10", "-o", str(out)]) == 2
    assert "do not fit digits: 3x8x8 inputs" in _error(capsys)
    assert main([*base, "--arch", "1x8x8, conv 4 k3 p1 maxpool, readout 5", "-o", str(out)]) == 2
    assert "5 classes, but digits has 1x8x8 images (64 features) and 10 classes" in _error(capsys)
    assert main([*base, "--arch", "1x8x8, conv 4 k3 p1 maxpol, readout 10", "-o", str(out)]) == 2
    assert "maxpol" in _error(capsys)
    assert main([*base, "--like", str(files["train"]), "-o", str(out)]) == 2
    assert "was expected" in _error(capsys)
    assert main([*base, "--like", str(files["net"]), "--activation", "hard_sigmoid_half", "-o", str(out)]) == 2
    assert "contradicts" in _error(capsys)
    assert main([*base, "--like", str(files["net"]), "--layers", "64,10", "-o", str(out)]) == 2
    assert "not allowed with argument" in _error(capsys)
    assert main([*base, "--layers", "784,10", "-o", str(out)]) == 2
    assert "layer sizes 784-10 do not fit digits" in _error(capsys)
    assert not out.exists()

    # export: a model and a dataset of other shapes, no samples, an EBM
    student = tmp_path / "student.h5"
    assert main(["distill", str(files["net"]), str(files["train"]), "--epochs", "1", "--no-progress",
                 "-o", str(student)]) == 0
    onnx_path = tmp_path / "x.onnx"
    assert main(["export-onnx", str(student), "--dataset", "cifar10", "-o", str(onnx_path)]) == 2
    assert "do not fit cifar10" in _error(capsys)
    assert main(["export-onnx", str(student), "--check-samples", "0", "-o", str(onnx_path)]) == 2
    assert "check_samples must be a positive integer" in _error(capsys)
    assert main(["export-onnx", str(files["net"]), "-o", str(onnx_path)]) == 2
    assert "not a static graph" in _error(capsys)
    assert not onnx_path.exists()


def test_robustness_command_parses_the_published_protocol_options(capsys):
    from ebm_cli.main import build_parser

    parser = build_parser()
    args = parser.parse_args(["robustness", "net.h5", "--dataset", "digits", "--out-dir", "out", "--as-published",
                              "--as-published-steps", "4", "--checkpoint-steps", "none"])
    assert args.as_published and args.as_published_steps == 4 and args.checkpoint_steps == "none"
    assert parser.parse_args(["robustness", "net.h5", "--dataset", "digits", "--out-dir", "out",
                              "--checkpoint-steps", "12"]).checkpoint_steps == 12
    with pytest.raises(SystemExit):
        parser.parse_args(["robustness", "net.h5", "--dataset", "digits", "--out-dir", "out", "--checkpoint-steps",
                           "0"])
    assert "checkpoint pieces need at least 1 step" in capsys.readouterr().err

"""ONNX export of feedforward classifiers: onnxruntime's logits equal torch's (float tolerance), dynamic batch,
metadata round trip, atomic writes, clear errors on wrong files and inputs."""
import os

import numpy as np
import pytest
import torch
from torch import nn

from distill.onnx_export import (OnnxClassifier, OnnxModelError, check_onnx, compare_with_torch, default_providers,
                                 export_onnx)

ATOL = 1e-5


class HardtanhMLP(nn.Module):
    """Linear -> hard sigmoid clip(u, 0, 1) (as nn.Hardtanh(0, 1)) -> Linear."""

    def __init__(self, sizes=(20, 32, 5), seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.Hardtanh(0.0, 1.0), nn.Linear(sizes[1], sizes[2]))

    def forward(self, x):
        return self.net(x)


class ClampMLP(nn.Module):
    """The toolkit's student shape without nn.Hardtanh: Linear -> torch.clamp(slope * u, 0, 1) -> ... -> Linear."""

    def __init__(self, sizes=(20, 32, 16, 5), slope=1.0, seed=1, dtype=torch.float32):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.slope = slope
        self.linears = nn.ModuleList(nn.Linear(a, b, dtype=dtype) for a, b in zip(sizes[:-1], sizes[1:]))
        with torch.no_grad():  # weights large enough that many units saturate at 0 and at 1
            for linear in self.linears:
                linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator, dtype=dtype) * 0.6)
                linear.bias.copy_(torch.randn(linear.bias.shape, generator=generator, dtype=dtype) * 0.3)

    def forward(self, x):
        for linear in self.linears[:-1]:
            x = torch.clamp(self.slope * linear(x), 0.0, 1.0)
        return self.linears[-1](x)


def images(batch, n=20, seed=0):
    return np.random.default_rng(seed).random((batch, n), dtype=np.float32)


def torch_logits(module, x):
    with torch.no_grad():
        return module(torch.as_tensor(x, dtype=next(module.parameters()).dtype)).double().numpy()


@pytest.mark.parametrize("make", [HardtanhMLP, ClampMLP, lambda: ClampMLP(slope=0.5)],
                         ids=["hardtanh", "clamp", "clamp-half-slope"])
def test_onnxruntime_matches_torch_at_batch_1_and_37(tmp_path, make):
    module = make().eval()
    path = export_onnx(module, tmp_path / "model.onnx", input_shape=20)
    clf = OnnxClassifier(path, intra_op_threads=1)
    assert clf.batch_size is None and clf.input_shape == (20,)
    for batch in (1, 37):
        x = images(batch, seed=batch)
        logits = clf(x)
        assert logits.shape == (batch, 5) and logits.dtype == np.float32
        np.testing.assert_allclose(logits, torch_logits(module, x), rtol=0, atol=ATOL)
        np.testing.assert_array_equal(clf.predict(x), torch_logits(module, x).argmax(axis=1))
        assert compare_with_torch(module, path, x) < ATOL
    # chunked evaluation gives the same logits
    x = images(37, seed=3)
    np.testing.assert_allclose(clf(x, batch_size=8), clf(x), rtol=0, atol=1e-6)


def test_clamp_saturates_and_still_matches(tmp_path):
    """The hidden units hit both kinks of the hard sigmoid, so the match is not a linear-regime accident."""
    module = ClampMLP().eval()
    x = images(37)
    with torch.no_grad():
        hidden = torch.clamp(module.linears[0](torch.as_tensor(x)), 0, 1)
    assert (hidden == 0).any() and (hidden == 1).any()
    path = export_onnx(module, tmp_path / "clamp.onnx", input_shape=(20,))
    assert compare_with_torch(module, path, x) < ATOL


def test_float64_module_exports_float32_and_is_left_untouched(tmp_path):
    module = ClampMLP(dtype=torch.float64)
    module.train()
    path = export_onnx(module, tmp_path / "f64.onnx", input_shape=20)
    assert module.training and next(module.parameters()).dtype == torch.float64
    x = images(37)
    assert compare_with_torch(module, path, x) < ATOL
    assert module.training


def test_metadata_round_trip(tmp_path):
    metadata = {"model_kind": "distilled", "network_hash": "ab" * 32, "fixed_points_hash": "cd" * 32,
                "layer_sizes": [20, 32, 16, 5], "epochs": 12, "val_acc": 0.875, "readout": False, "number_text": "7"}
    path = export_onnx(ClampMLP(), tmp_path / "meta.onnx", input_shape=20, metadata=metadata)
    clf = OnnxClassifier(path)
    assert clf.metadata == metadata
    assert clf.metadata_props["model_kind"] == "distilled"  # plain strings stay plain for other ONNX tools
    assert clf.metadata_props["ebm_toolkit.format"] == "ebm-onnx-classifier"
    with pytest.raises(ValueError, match="reserved prefix"):
        export_onnx(ClampMLP(), tmp_path / "bad.onnx", input_shape=20, metadata={"ebm_toolkit.format": "x"})
    with pytest.raises(ValueError, match="JSON"):
        export_onnx(ClampMLP(), tmp_path / "bad.onnx", input_shape=20, metadata={"model": object()})
    assert not (tmp_path / "bad.onnx").exists()


def test_exported_file_passes_checker_and_uses_the_cpu_provider(tmp_path):
    path = export_onnx(HardtanhMLP(), tmp_path / "m.onnx", input_shape=20, opset=17)
    check_onnx(path)
    clf = OnnxClassifier(path)
    assert clf.session.get_providers()[-1] == "CPUExecutionProvider"
    assert default_providers()[-1] == "CPUExecutionProvider"
    assert [i.name for i in clf.session.get_inputs()] == ["images"]
    assert [o.name for o in clf.session.get_outputs()] == ["logits"]


def test_static_batch_export(tmp_path):
    module = ClampMLP().eval()
    path = export_onnx(module, tmp_path / "static.onnx", input_shape=20, dynamic_batch=False)
    clf = OnnxClassifier(path)
    assert clf.batch_size == 1
    np.testing.assert_allclose(clf(images(1)), torch_logits(module, images(1)), rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="fixed batch of 1"):
        clf(images(37))


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(20, 5)

    def forward(self, x):
        if torch.onnx.is_in_onnx_export():
            raise RuntimeError("exporter failed half way")
        return self.linear(x)


def test_failed_export_leaves_no_file_and_keeps_an_existing_one(tmp_path):
    target = tmp_path / "model.onnx"
    with pytest.raises(RuntimeError, match="half way"):
        export_onnx(Broken(), target, input_shape=20)
    assert os.listdir(tmp_path) == []  # neither the target nor a temporary file
    target.write_bytes(b"previous version")
    with pytest.raises(RuntimeError, match="half way"):
        export_onnx(Broken(), target, input_shape=20)
    assert os.listdir(tmp_path) == ["model.onnx"] and target.read_bytes() == b"previous version"


def test_wrong_input_shape_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="one sample's shape"):
        export_onnx(ClampMLP(), tmp_path / "m.onnx", input_shape=(1, 20))  # a batch axis given by mistake
    with pytest.raises(ValueError, match="input_shape"):
        export_onnx(ClampMLP(), tmp_path / "m.onnx", input_shape=0)
    assert os.listdir(tmp_path) == []


def test_non_onnx_file_raises_a_clear_error_naming_the_path(tmp_path):
    bogus = tmp_path / "not_a_model.onnx"
    bogus.write_text("this is not an ONNX model\n")
    with pytest.raises(OnnxModelError, match="not_a_model.onnx") as info:
        OnnxClassifier(bogus)
    assert str(bogus) in str(info.value)
    with pytest.raises(OnnxModelError, match="not_a_model.onnx"):
        check_onnx(bogus)
    missing = tmp_path / "missing.onnx"
    with pytest.raises(OnnxModelError, match="missing.onnx"):
        OnnxClassifier(missing)
    # a truncated export is refused too
    good = export_onnx(ClampMLP(), tmp_path / "good.onnx", input_shape=20)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(OnnxModelError, match="truncated.onnx"):
        OnnxClassifier(truncated)


def test_bad_inputs_are_refused(tmp_path):
    clf = OnnxClassifier(export_onnx(ClampMLP(), tmp_path / "m.onnx", input_shape=20))
    with pytest.raises(ValueError, match=r"shape \(B, 20\)"):
        clf(images(4, n=21))
    with pytest.raises(ValueError, match="NaN"):
        x = images(4)
        x[1, 3] = np.nan
        clf(x)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        clf(images(4) * 255)
    with pytest.raises(ValueError, match="dtype uint8"):
        clf((images(4) * 255).astype(np.uint8))
    with pytest.raises(ValueError, match="intra_op_threads"):
        OnnxClassifier(tmp_path / "m.onnx", intra_op_threads=-1)


def test_int8_quantization_stays_close_to_the_float_model(tmp_path):
    """Dynamic int8: logits within the quantization error, the float model's predictions on most inputs, metadata
    kept and the quantization recorded; a wide model so that the per-tensor scales are realistic."""
    from distill.onnx_export import quantize_onnx

    module = ClampMLP(sizes=(64, 128, 64, 10), seed=3).eval()
    float_path = export_onnx(module, tmp_path / "float.onnx", input_shape=64, metadata={"kind": "distilled"})
    int8_path = quantize_onnx(float_path, tmp_path / "int8.onnx")
    assert int8_path.stat().st_size < 0.5 * float_path.stat().st_size  # int8 weights
    x = images(500, n=64, seed=4)
    reference, quantized = torch_logits(module, x), OnnxClassifier(int8_path)(x).astype(np.float64)
    error = np.abs(quantized - reference).max()
    assert 1e-6 < error < 0.05 * np.abs(reference).max()  # it is quantized, and not far off
    assert np.mean(quantized.argmax(1) == reference.argmax(1)) > 0.95
    classifier = OnnxClassifier(int8_path)
    assert classifier.quantization == "int8" and OnnxClassifier(float_path).quantization is None
    assert classifier.metadata["kind"] == "distilled"


def test_quantization_refuses_bad_requests_and_writes_nothing(tmp_path):
    from distill.onnx_export import quantize_onnx

    float_path = export_onnx(ClampMLP().eval(), tmp_path / "float.onnx", input_shape=20)
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        quantize_onnx(float_path, tmp_path / "q.onnx", "int4")
    with pytest.raises(ValueError, match="the source itself"):
        quantize_onnx(float_path, float_path)
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(OnnxModelError, match="junk.onnx"):
        quantize_onnx(tmp_path / "junk.onnx", tmp_path / "q.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float.onnx", "junk.onnx"]

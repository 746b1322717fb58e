"""The Lava mapping of convolutional (layered) EBMs: convolutions as Sparse matrices (checked against the simulator's
conv and Lava's conv_to_sparse), average pooling folded into the kernel, max pooling refused with the alternatives,
the float program is the simulator's relaxation step for step, fixed point quantizes with 8-bit weights, Lava (float
and fixed point) agrees with the numpy simulator of the graph, the cost model counts conv synapses, and a
Lava-mappable preset trains with EP and maps."""
from __future__ import annotations

import numpy as np
import pytest

from ebm_sim.datasets import load_dataset
from ebm_sim.model import LayeredNetwork, presets
from ebm_sim.model.dynamics import relax
from ebm_sim.model.energy import output
from ebm_sim.model.ep import ep_gradient
from ebm_sim.model.numpy_ops import conv, pool
from hardware import cost_model, lava_file, lava_run, mapping
from hardware.conv_ops import conv_matrix, fold_avg_pool
from hardware.layered_program import LayeredProgram
from hardware.program import WEIGHT_EXP_RANGE, simulate

STRIDED = "1x8x8, conv 4 k3 s2 p1, 10"
AVGPOOL = "1x8x8, conv 4 k3 p1 avgpool, conv 6 k3 s2 p1, 10, readout 5"
ODD = "2x7x7, conv 3 k3 p0 avgpool, 8"


def network(arch, seed=0, gain=0.8, **options):
    return LayeredNetwork.init(arch, seed=seed, dtype=np.float64, gain=gain, **options)


def images(net, n=3, seed=1):
    return np.random.default_rng(seed).uniform(0, 1, (n,) + net.input_shape)


class _Geometry:
    """What numpy_ops.conv reads of a Conv2d."""

    def __init__(self, kernel, stride, padding, pool=None):
        self.kernel, self.stride, self.padding, self.pool = kernel, stride, padding, pool


@pytest.mark.parametrize("shape, k, stride, padding", [((2, 7, 6), 3, 1, 1), ((3, 8, 8), 3, 2, 1),
                                                       ((1, 9, 9), 4, 2, 0), ((2, 5, 5), 1, 1, 0)])
def test_conv_matrix_is_the_simulator_conv_and_lavas_conv_to_sparse(shape, k, stride, padding):
    from lava.proc.conv.utils import TensorOrder, conv_to_sparse

    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(3, shape[0], k, k))
    x = rng.uniform(size=(2,) + shape)
    matrix = conv_matrix(kernel, shape, stride, padding)
    u = conv(_Geometry(k, stride, padding), kernel, x)
    np.testing.assert_allclose(x.reshape(2, -1) @ matrix.T, u.reshape(2, -1), atol=1e-12)
    # Lava's own order: (X, Y, C) = (W, H, C) layers and a true convolution with (C_out, kx, ky, C_in) kernels (its
    # NCHW option indexes the kernel wrongly in lava-nc 0.10); our flat index of (c, y, x) is c H W + y W + x
    lava_kernel = kernel.transpose(0, 3, 2, 1)[:, ::-1, ::-1, :]
    dst, src, weight = conv_to_sparse(shape[::-1], u.shape[1:][::-1], lava_kernel, (stride, stride),
                                      (padding, padding), (1, 1), 1, order=TensorOrder.NWHC)
    ours_in = np.arange(int(np.prod(shape))).reshape(shape).transpose(2, 1, 0).reshape(-1)
    ours_out = np.arange(int(np.prod(u.shape[1:]))).reshape(u.shape[1:]).transpose(2, 1, 0).reshape(-1)
    lava = np.zeros(matrix.shape)
    lava[ours_out[dst], ours_in[src]] = weight
    np.testing.assert_array_equal(matrix.toarray(), lava)


@pytest.mark.parametrize("size, stride, padding", [(8, 1, 1), (7, 1, 0), (9, 2, 1), (10, 2, 0)])
def test_average_pooling_folds_into_a_strided_kernel(size, stride, padding):
    rng = np.random.default_rng(1)
    kernel = rng.normal(size=(2, 3, 3, 3))
    x = rng.uniform(size=(2, 3, size, size))
    pooled = pool(_Geometry(3, stride, padding, "avg"), conv(_Geometry(3, stride, padding), kernel, x))
    folded = conv(_Geometry(3 + stride, 2 * stride, padding), fold_avg_pool(kernel, stride), x)
    np.testing.assert_allclose(folded, pooled, atol=1e-12)


def test_max_pooling_is_refused_naming_the_alternatives():
    net = network("1x8x8, conv 4 k3 p1 maxpool, 10")
    for kind in ("float", "fixed"):
        with pytest.raises(ValueError, match=r"max pooling.*no pooling process.*avgpool.*strided.*cifar10-cpu-lava"):
            mapping.to_program(net, kind, dt=1.0, steps=5, tol=0.0)


def test_bad_options_and_networks_over_one_chip_are_refused(monkeypatch):
    net = network(STRIDED)
    with pytest.raises(ValueError, match="forward_process must be one of sparse, conv"):
        mapping.to_program(net, "fixed", steps=3, forward_process="dense")
    with pytest.raises(ValueError, match="kind must be 'float' or 'fixed'"):
        mapping.to_program(net, "half", steps=3)
    monkeypatch.setattr(mapping, "MAX_SYNAPSES", 1000)  # the one chip limit, shared with the dense mapping
    with pytest.raises(ValueError, match="synapses .*over the 1,000 of one Loihi 2 chip"):
        mapping.to_program(net, "float", steps=3)
    monkeypatch.setattr(mapping, "MAX_UNITS", 50)
    with pytest.raises(ValueError, match="74 neurons, over the 50"):
        mapping.check_mappable(net)


def test_what_has_no_process_is_refused_by_name(tmp_path):
    net = network(STRIDED)
    net.interactions[0].kind = "conv3d"  # an interaction kind the mapping does not know
    with pytest.raises(ValueError, match="conv3d.*has no Lava mapping.*dense, conv2d, bias"):
        mapping.check_mappable(net)
    with pytest.raises(ValueError, match="cannot be exported"):
        lava_file.save_program(tmp_path / "p.h5", mapping.to_program(network(STRIDED), "float", steps=3))
    with pytest.raises(ValueError, match=r"inputs must have shape \(N, 64\)"):
        mapping.to_program(network(STRIDED), "float", steps=3).encode_inputs(np.zeros((2, 1, 8, 7)))


@pytest.mark.parametrize("arch", [STRIDED, AVGPOOL, ODD])
@pytest.mark.parametrize("dt", [0.5, 1.0])
def test_float_program_is_the_simulator_relaxation_step_for_step(arch, dt):
    """Step t of the graph is step t of relax(euler, dt) (fixed_point for dt = 1), from the same zero states."""
    net = network(arch, activation="hard_sigmoid_half")
    x = images(net)
    program = mapping.to_program(net, "float", dt=dt, steps=10, tol=0.0)
    assert isinstance(program, LayeredProgram)
    run = simulate(program, program.encode_inputs(x), record=True)
    for t in (1, 4, 10):
        ref = relax(net, x, method="euler" if dt < 1 else "fixed_point", dt=dt, tol=0.0, max_steps=t,
                    per_sample=False)
        for s_ref, traj in zip(ref.states, run.trajectory):
            np.testing.assert_allclose(traj[t], s_ref.reshape(len(x), -1), atol=1e-12, rtol=0)
    assert 0 < np.mean(run.states[-1]) < 1  # not saturated: a real check of the dynamics
    if net.cost.kind == "softmax_readout":
        np.testing.assert_allclose(program.scores(run.states[-1]), output(net, ref.states), atol=1e-12)


def test_normalized_inputs_enter_the_graph_as_the_network_normalizes_them():
    net = network("3x6x6, conv 4 k3 s2 p1, 5", normalization=presets.CIFAR_NORMALIZATION)
    x = images(net)
    for kind, atol in (("float", 1e-12), ("fixed", 0.02)):
        program = mapping.to_program(net, kind, dt=0.5, steps=8, tol=0.0)
        run = simulate(program, program.encode_inputs(x))
        ref = relax(net, x, method="euler", dt=0.5, tol=0.0, max_steps=8, per_sample=False)
        np.testing.assert_allclose(program.decode_states(run.states[-1]), ref.states[-1].reshape(3, -1), atol=atol)


def test_fixed_program_uses_8_bit_mantissas_exponents_in_range_and_stays_close_to_float():
    net = network(AVGPOOL)
    program = mapping.to_program(net, "fixed", dt=0.5, steps=12, tol=0.0)
    for w in program.weights:
        assert w.dtype == np.int32 and w.min() >= -256 and w.max() <= 254 and not np.any(w % 2)
    lo, hi = WEIGHT_EXP_RANGE
    assert all(lo <= c.exp <= hi for c in program.connections())
    assert [c.name for c in program.connections()] == ["W0", "W1", "W2", "W1T", "W2T"]
    assert program.weights[0].shape == (4, 1, 4, 4)  # 3x3 kernel and 2x2 average pooling: one 4x4, stride 2 kernel
    x = images(net, n=4)
    fixed = simulate(program, program.encode_inputs(x))
    floating = mapping.to_program(net, "float", dt=0.5, steps=12, tol=0.0)
    exact = simulate(floating, floating.encode_inputs(x))
    for a, b in zip(fixed.states, exact.states):
        assert np.abs(program.decode_states(a) - b).max() < 0.03


@pytest.mark.parametrize("forward_process", ["sparse", "conv"])
def test_lava_float_and_fixed_agree_with_the_simulator_of_the_graph(forward_process):
    """Conv links run forward as Lava Sparse or Conv processes and back as Sparse ones (the transposed matrix): float
    to 1e-12, fixed point bit-exact."""
    net = network(AVGPOOL)
    x = images(net, n=2)
    for kind in ("float", "fixed"):
        program = mapping.to_program(net, kind, dt=0.5, steps=6, tol=1e-3, forward_process=forward_process)
        processes = [program.process_of(c) for c in program.connections()]
        assert processes == ["Sparse" if forward_process == "sparse" else "Conv"] * 2 + ["Dense", "Sparse", "Dense"]
        if forward_process == "conv" and kind == "fixed":
            assert program.forward_exps[:2] == (0, 0)  # Lava's fixed-point Conv has no weight exponent
        result = lava_run.run_lava(program, x, chunk=2, record="all", record_trajectory=True)
        sim = simulate(program, program.encode_inputs(x), record=True)
        for lava_layer, sim_layer in zip(result.trajectory, sim.trajectory):
            if kind == "float":
                np.testing.assert_allclose(lava_layer, sim_layer, atol=1e-12, rtol=0)
            else:
                np.testing.assert_array_equal(lava_layer, program.decode_states(sim_layer))
        np.testing.assert_array_equal(result.steps, sim.steps)
        assert result.lava_steps == 2 * 7
        # the readout (5 classes from the 10 output units) is applied to Lava's outputs too
        np.testing.assert_array_equal(result.predictions(),
                                      program.predictions(program.decode_states(sim.states[-1])))


def test_cost_model_counts_conv_synapses_and_fan_out():
    net = network(STRIDED)
    program = mapping.to_program(net, "fixed", dt=1.0, steps=6, tol=0.0)
    conv_forward = program.connections()[0].weights
    # a 3x3 stride-2 conv with padding 1 on 8x8: 4 x 4 outputs per channel whose windows cover 2, 3, 3, 3 rows and
    # columns of the image (the first one hangs over the padding)
    assert conv_forward.shape == (64, 64) and conv_forward.nnz == 4 * (2 + 3 + 3 + 3) ** 2
    assert cost_model.fan_in(program, 1) == 9 + 10           # the full 3x3 window plus the dense feedback
    assert program.num_synapses == conv_forward.nnz + 2 * 64 * 10
    x = images(net, n=3)
    encoded = program.encode_inputs(x)
    run = simulate(program, encoded)
    fan_out = np.diff(conv_forward.tocsc().indptr)  # 1 to 4 taps per pixel: a 3x3 window moved by 2
    assert fan_out.min() == 4 * 1 and fan_out.max() == 4 * 4
    # step 1 sends the input and the zero states: only the conv's taps of the nonzero pixels are reached
    np.testing.assert_array_equal(run.synaptic_ops[0], (encoded != 0) @ fan_out)
    estimate = cost_model.estimate_cost(program, run)
    np.testing.assert_allclose(estimate.synaptic_ops, run.synaptic_ops.sum(axis=0))
    sizes = program.layer_sizes
    all_to_all = sum(run.active[:, :, c.source] * sizes[c.target] for c in program.connections()).sum(axis=0)
    assert np.all(estimate.synaptic_ops < all_to_all)  # a conv reaches a window, not the whole next layer


def test_lava_preset_maps_and_its_network_relaxes_as_the_graph():
    preset = presets.get("cifar10-cpu-lava")
    assert "maxpool" not in preset.arch and preset.train["method"] in mapping.LAVA_METHODS
    assert "cifar10-cpu-lava" in __import__("hardware.layered_mapping").layered_mapping.lava_presets()
    net = LayeredNetwork.init(preset.arch, seed=0, dtype=np.float64, activation=preset.activation,
                              normalization=preset.normalization)
    x = images(net, n=2)
    float_program = mapping.to_program(net, "float", dt=1.0, steps=3, tol=0.0)
    run = simulate(float_program, float_program.encode_inputs(x))
    ref = relax(net, x, method="fixed_point", tol=0.0, max_steps=3, per_sample=False)
    for s, s_ref in zip(run.states, ref.states):
        np.testing.assert_allclose(s, s_ref.reshape(2, -1), atol=1e-12)
    fixed = mapping.to_program(net, "fixed", dt=1.0, steps=3, tol=0.0)
    assert fixed.frac_bits >= 8 and fixed.readout
    step = ep_gradient(net.astype(np.float32), x.astype(np.float32), np.eye(10)[[3, 7]], beta=0.5, free_steps=3,
                       nudged_steps=2)
    assert all(np.all(np.isfinite(g)) for grads in step.interactions for g in grads.values())


def test_an_avgpool_network_trained_with_ep_keeps_its_predictions_when_mapped():
    """EP training (torch backend, synchronous fixed_point updates, cross-entropy readout) on 600 digits, then the
    float program predicts as the simulator and the fixed-point program nearly so."""
    pytest.importorskip("torch")
    from ebm_sim.training import TrainConfig, fit

    data = load_dataset("digits")
    x_train, x_test = data.x_train[:600].reshape(-1, 1, 8, 8), data.x_test.reshape(-1, 1, 8, 8)
    net = LayeredNetwork.init("1x8x8, conv 8 k3 p1 avgpool, conv 16 k3 s2 p1, readout 10", seed=0)
    config = TrainConfig(epochs=2, batch_size=32, lr=0.1, optimizer="sgd", cost="cross_entropy",
                         method="fixed_point", free_steps=15, nudged_steps=5, tol=0.0, backend="torch", seed=0)
    fit(net, x_train, data.y_train[:600], x_test, data.y_test, config, progress=False, log=lambda _: None)
    net = net.astype(np.float64)
    ref = relax(net, x_test, method="fixed_point", tol=0.0, max_steps=15, per_sample=False)
    expected = np.argmax(output(net, ref.states), axis=1)
    assert (expected == data.y_test).mean() > 0.3  # ten classes: chance is 0.1
    agreement = {}
    for kind in ("float", "fixed"):
        program = mapping.to_program(net, kind, dt=1.0, steps=15, tol=0.0)
        run = simulate(program, program.encode_inputs(x_test))
        agreement[kind] = (program.predictions(program.decode_states(run.states[-1])) == expected).mean()
    assert agreement["float"] == 1.0 and agreement["fixed"] > 0.95, agreement


def test_the_command_line_runs_and_estimates_a_conv_network_and_refuses_max_pooling(tmp_path, capsys):
    from ebm_cli.main import main

    net, pooled = tmp_path / "conv.h5", tmp_path / "max.h5"
    assert main(["init", "--arch", "1x8x8, conv 4 k3 p1 avgpool, conv 6 k3 s2 p1, 10", "-o", str(net)]) == 0
    common = ["--dataset", "digits", "--limit", "10", "--steps", "4"]
    assert main(["hardware", "run", str(net), *common, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "run of 64-64-24-10" in out and "same prediction 100.00%, same steps 100.00%, max |output difference| 0" in out
    assert "vs numpy (ebm_sim.model) fixed_point: same prediction 100.00%" in out
    assert main(["hardware", "estimate", str(net), *common]) == 0
    assert "ESTIMATE, not a measurement" in capsys.readouterr().out
    assert main(["init", "--arch", "1x8x8, conv 4 k3 p1 maxpool, 10", "-o", str(pooled)]) == 0
    assert main(["hardware", "estimate", str(pooled), *common]) == 2
    assert "max pooling" in capsys.readouterr().err

"""The Lava graph (lava-nc 0.10, CPU simulation): float Lava is the Numba synchronous Euler trajectory, fixed-point
Lava is bit-exact with the numpy simulator of its program, digits agreement and accuracy, export -> run, resume.
Lava is part of the install (make), so these tests do not skip without it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ebm_sim import storage
from ebm_sim.datasets import load_dataset
from ebm_sim.network import Network
from ebm_sim.relax import relax
from hardware import lava_file, lava_run, mapping
from hardware.program import simulate

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "benchmarks" / "results" / "networks" / "digits_64-256-10.h5"


def small_network(activation="hard_sigmoid"):
    return Network.init((12, 16, 8, 5), seed=0, dtype=np.float64, gain=1.5, activation=activation)


def images(n, dim=12, seed=1):
    return np.random.default_rng(seed).uniform(0, 1, (n, dim))


@pytest.mark.parametrize("dt, activation", [(0.5, "hard_sigmoid"), (1.0, "hard_sigmoid_half")])
def test_float_lava_trajectory_is_the_numba_euler_trajectory(dt, activation):
    """Lava step j of a sample is Euler step j: the one-step Dense delay is absorbed by the reset step."""
    net = small_network(activation)
    x = images(3)
    program = mapping.float_program(net, dt=dt, steps=15, tol=0.0)
    result = lava_run.run_lava(program, x, chunk=2, record="all", record_trajectory=True)
    ref = relax(net, x, method="euler", dt=dt, tol=0.0, max_steps=15, record=True)
    for lava_layer, numba_layer in zip(result.trajectory, ref.trajectory):
        np.testing.assert_allclose(lava_layer, numba_layer, atol=1e-12, rtol=0)
    assert result.lava_steps == 3 * 16


def test_fixed_lava_is_bit_exact_with_the_program_simulator():
    program = mapping.fixed_program(small_network(), dt=0.5, steps=12, tol=1e-3)
    x = images(4, seed=2)
    result = lava_run.run_lava(program, x, chunk=3, record="all", record_trajectory=True)
    sim = simulate(program, program.encode_inputs(x), record=True)
    for lava_layer, sim_layer in zip(result.trajectory, sim.trajectory):
        np.testing.assert_array_equal(lava_layer, program.decode_states(sim_layer))
    for lava_layer, sim_layer in zip(result.states, sim.states):
        np.testing.assert_array_equal(lava_layer, program.decode_states(sim_layer))
    np.testing.assert_array_equal(result.steps, sim.steps)
    np.testing.assert_array_equal(result.converged, sim.converged)


def test_digits_float_agrees_with_numba_and_fixed_point_keeps_accuracy():
    """All 360 digits test images at the deployed relaxation (fixed_point, tol 1e-4, at most 30 steps)."""
    net = storage.load_network(DIGITS)
    data = load_dataset("digits")
    ref = relax(net, data.x_test, method="fixed_point", tol=1e-4, max_steps=30)
    numba_accuracy = np.mean(ref.predictions() == data.y_test)
    lava_float = lava_run.run_lava(mapping.float_program(net), data.x_test, chunk=180)
    assert np.mean(lava_float.predictions() == ref.predictions()) >= 0.995
    np.testing.assert_array_equal(lava_float.steps, ref.steps)  # same residual, same stopping step
    fixed = mapping.fixed_program(net)
    lava_fixed = lava_run.run_lava(fixed, data.x_test, chunk=180)
    assert np.mean(lava_fixed.predictions() == data.y_test) >= numba_accuracy - 0.01
    sim = simulate(fixed, fixed.encode_inputs(data.x_test))
    np.testing.assert_array_equal(lava_fixed.outputs, fixed.decode_states(sim.states[-1]))
    assert lava_fixed.ms_per_step > 0 and lava_fixed.setup_s > 0


def test_an_exported_program_runs_as_the_original(tmp_path):
    program = mapping.fixed_program(small_network(), steps=10)
    lava_file.save_program(tmp_path / "p.h5", program)
    x = images(3, seed=3)
    a = lava_run.run_lava(program, x)
    b = lava_run.run_lava(lava_file.load_program(tmp_path / "p.h5"), x)
    np.testing.assert_array_equal(a.outputs, b.outputs)


def test_an_interrupted_run_resumes_from_its_finished_chunks(tmp_path, monkeypatch):
    program = mapping.fixed_program(small_network(), steps=8)
    x = images(6, seed=4)
    expected = lava_run.run_lava(program, x, chunk=2)
    resume = tmp_path / "run.npz"
    read = lava_run._read_chunk
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return read(*args, **kwargs)

    monkeypatch.setattr(lava_run, "_read_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lava_run.run_lava(program, x, chunk=2, resume_file=resume)
    assert resume.exists()
    monkeypatch.setattr(lava_run, "_read_chunk", read)
    resumed = lava_run.run_lava(program, x, chunk=2, resume_file=resume)
    assert resumed.lava_steps == 2 * 9  # only the last chunk of two samples ran again
    np.testing.assert_array_equal(resumed.outputs, expected.outputs)
    np.testing.assert_array_equal(resumed.steps, expected.steps)
    assert not resume.exists()


def test_bad_arguments_are_refused_before_lava_starts():
    program = mapping.float_program(small_network(), steps=5)
    with pytest.raises(ValueError, match="record must be"):
        lava_run.run_lava(program, images(2), record="some")
    with pytest.raises(ValueError, match="chunk must be"):
        lava_run.run_lava(program, images(2), chunk=0)
    with pytest.raises(ValueError, match=r"shape \(N, 12\)"):
        lava_run.run_lava(program, images(2, dim=5))

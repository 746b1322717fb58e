"""The Lava mapping without Lava: float and fixed-point programs, the numpy simulator of the graph (held against
Numba and against a plain integer reference), refusals, and the export file."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from ebm_sim import storage
from ebm_sim.network import Network
from ebm_sim.relax import relax
from hardware import lava_file, mapping
from hardware.program import (DT_BITS, WEIGHT_EXP_RANGE, LavaProgram, simulate, steps_from_quiet, unpack_quiet)

ROOT = Path(__file__).resolve().parents[1]


def small_network(sizes=(12, 16, 8, 5), seed=0, dtype=np.float64, gain=1.5, activation="hard_sigmoid"):
    return Network.init(sizes, seed=seed, dtype=dtype, gain=gain, activation=activation)


def images(n, dim, seed=1):
    return np.random.default_rng(seed).uniform(0, 1, (n, dim))


# ---------------------------------------------------------------------------------------------- float program
@pytest.mark.parametrize("dt", [0.5, 1.0])
@pytest.mark.parametrize("activation", ["hard_sigmoid", "hard_sigmoid_half"])
def test_float_simulation_is_the_numba_euler_trajectory(dt, activation):
    net = small_network(activation=activation)
    x = images(7, 12)
    program = mapping.float_program(net, dt=dt, steps=25, tol=0.0)
    run = simulate(program, program.encode_inputs(x), record=True)
    ref = relax(net, x, method="euler", dt=dt, tol=0.0, max_steps=25, record=True)
    for lava_layer, numba_layer in zip(run.trajectory, ref.trajectory):
        np.testing.assert_allclose(lava_layer, numba_layer, atol=1e-12, rtol=0)


def test_float_simulation_stops_where_numba_does():
    net = small_network(gain=0.8)
    x = images(40, 12)
    program = mapping.float_program(net, dt=0.5, steps=200, tol=1e-5)
    run = simulate(program, program.encode_inputs(x))
    ref = relax(net, x, method="euler", dt=0.5, tol=1e-5, max_steps=200)
    np.testing.assert_array_equal(run.steps, ref.steps)
    np.testing.assert_array_equal(run.converged, ref.converged)


def test_steps_from_quiet_flags():
    quiet = np.array([[0, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=bool)
    steps, converged = steps_from_quiet(quiet, 4)
    np.testing.assert_array_equal(steps, [3, 4, 1])
    np.testing.assert_array_equal(converged, [True, False, True])
    words = np.array([[0b101, 0b1], [0, 0b10]])  # 3 bits per word: steps 1, 3, 4 / step 5
    np.testing.assert_array_equal(unpack_quiet(words, 5, 3),
                                  [[1, 0, 1, 1, 0], [0, 0, 0, 0, 1]])


# ---------------------------------------------------------------------------------------------- fixed point
def test_fixed_program_uses_8_bit_mantissas_and_allowed_exponents():
    net = small_network()
    program = mapping.fixed_program(net)
    for w, w_int, p in zip(net.weights, program.weights, program.weight_bits):
        assert w_int.dtype == np.int32 and np.all(w_int % 2 == 0)
        assert w_int.min() >= -256 and w_int.max() <= 254
        largest = np.abs(w).max()
        assert largest * 2.0 ** p <= 254 < largest * 2.0 ** (p + 1)  # the finest scale that fits 8 bits
        np.testing.assert_allclose(w_int * 2.0 ** -p, w, atol=2.0 ** -p)  # error below one mantissa step
    lo, hi = WEIGHT_EXP_RANGE
    assert all(lo <= e <= hi for e in program.forward_exps + program.backward_exps)
    assert program.dt_mantissa == 1 << DT_BITS and 8 <= program.frac_bits <= 16


def _integer_reference(program: LavaProgram, x_int: np.ndarray) -> list:
    """The fixed-point graph for one sample with Python integers and loops (the obvious, slow way)."""
    sizes = program.layer_sizes
    states = [[0] * n for n in sizes[1:]]
    for _ in range(program.steps):
        layers = [list(map(int, x_int))] + states
        fields = [[0] * n for n in sizes[1:]]
        for conn in program.connections():
            w = conn.weights
            for i in range(w.shape[0]):
                acc = sum(int(w[i, j]) * layers[conn.source][j] for j in range(w.shape[1]))
                fields[conn.target - 1][i] += acc << conn.exp if conn.exp >= 0 else acc >> -conn.exp
        new = []
        for k, (s, h) in enumerate(zip(states, fields)):
            layer = []
            for i in range(len(s)):
                u = (h[i] + int(program.biases[k][i])) >> program.shifts[k]
                v = s[i] + (((u - s[i]) * program.dt_mantissa) >> DT_BITS)
                layer.append(min(max(v, 0), program.full_scale))
            new.append(layer)
        states = new
    return states


@pytest.mark.parametrize("dt", [1.0, 0.5])
def test_fixed_simulation_is_bit_exact_with_an_integer_reference(dt):
    net = small_network(sizes=(6, 7, 5, 3), gain=2.0, activation="hard_sigmoid_half")
    program = mapping.fixed_program(net, dt=dt, steps=12)
    x = program.encode_inputs(images(3, 6))
    run = simulate(program, x)
    for i in range(3):
        expected = _integer_reference(program, x[i])
        for k, layer in enumerate(expected):
            np.testing.assert_array_equal(run.states[k][i], layer)


def test_fixed_point_stays_close_to_float_on_a_trained_network():
    from ebm_sim.datasets import load_dataset

    net = storage.load_network(ROOT / "benchmarks" / "results" / "networks" / "digits_64-256-10.h5")
    data = load_dataset("digits")
    ref = relax(net, data.x_test, method="fixed_point", tol=1e-4, max_steps=30)
    program = mapping.fixed_program(net)
    run = simulate(program, program.encode_inputs(data.x_test))
    accuracy = np.mean(run.states[-1].argmax(1) == data.y_test)
    assert accuracy >= np.mean(ref.predictions() == data.y_test) - 0.01
    assert np.mean(np.abs(program.decode_states(run.states[-1]) - ref.states[-1])) < 0.01


# ---------------------------------------------------------------------------------------------- refusals
def test_a_readout_network_is_refused():
    net = Network.init((8, 6, 3), seed=0, readout=True)
    with pytest.raises(ValueError, match="softmax readout"):
        mapping.float_program(net)


def test_weights_that_do_not_quantize_are_refused():
    net = small_network()
    w = np.full_like(net.weights[0], 1e-4)
    w[0, 0] = 1.0  # one large weight sets the scale: every other weight rounds to zero
    outlier = Network([w] + net.weights[1:], net.biases, net.activation)
    with pytest.raises(ValueError, match="W0 does not quantize to 8-bit weights"):
        mapping.fixed_program(outlier)
    mapping.fixed_program(outlier, max_zeroed=1.0)  # accepted when the caller allows the loss
    tiny = Network([net.weights[0], net.weights[1] * 1e-6, net.weights[2]], net.biases, net.activation)
    with pytest.raises(ValueError, match=r"weights into layer \d do not quantize.*outside Loihi's \[-7, 7\]"):
        mapping.fixed_program(tiny)


def test_fields_too_large_for_24_bits_are_refused():
    w = np.full((3, 40000), 0.9)
    net = Network([w, np.full((2, 3), 0.5)], [np.zeros(3), np.zeros(2)])
    with pytest.raises(ValueError, match="at least 8 state fraction bits"):
        mapping.fixed_program(net)
    with pytest.raises(ValueError, match="frac_bits must be an integer in"):
        mapping.fixed_program(small_network(), frac_bits=30)


def test_sizes_over_the_chip_limit_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="neurons, over the"):
        mapping.float_program(Network.init((2, mapping.MAX_UNITS + 1), seed=0))
    monkeypatch.setattr(mapping, "MAX_SYNAPSES", 100)
    with pytest.raises(ValueError, match="synapses .* over the 100"):
        mapping.fixed_program(small_network())


def test_bad_settings_and_inputs_are_refused():
    net = small_network()
    for options, message in (({"dt": 1.5}, "dt must lie in"), ({"steps": 0}, "steps must be"),
                             ({"tol": -1.0}, "tol must be")):
        with pytest.raises(ValueError, match=message):
            mapping.float_program(net, **options)
    with pytest.raises(ValueError, match="kind must be"):
        mapping.to_program(net, "analog")
    program = mapping.fixed_program(net)
    with pytest.raises(ValueError, match=r"shape \(N, 12\)"):
        program.encode_inputs(np.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        program.encode_inputs(np.full((2, 12), 2.0))


# ---------------------------------------------------------------------------------------------- export file
@pytest.mark.parametrize("kind", ["float", "fixed"])
def test_export_round_trip(tmp_path, kind):
    program = mapping.to_program(small_network(), kind)
    path = tmp_path / f"{kind}.h5"
    digest = lava_file.save_program(path, program)
    loaded = lava_file.load_program(path)
    assert loaded.content_hash() == program.content_hash() and loaded.kind == kind
    for a, b in zip(loaded.weights + loaded.biases, program.weights + program.biases):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert loaded.notes == program.notes
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left
    with h5py.File(path) as f:
        assert f.attrs["format"] == "ebm-lava-program" and f.attrs["content_hash"] == digest
        assert f["weights/W0"].dtype == (np.int32 if kind == "fixed" else np.float64)


def test_export_is_a_regular_toolkit_artifact(tmp_path):
    """Written through ebm_sim.storage (same header and content hash): its reader and `ebm info` accept the file,
    and the standalone loader's hash check agrees with storage's."""
    path = tmp_path / "p.h5"
    digest = lava_file.save_program(path, mapping.fixed_program(small_network()))
    datasets, attrs = storage.read_artifact(path, lava_file.FORMAT)
    assert attrs["kind"] == "fixed" and "weights/W0" in datasets and attrs["content_hash"] == digest
    info = storage.artifact_info(path)
    assert info["hash_status"] == "ok" and info["summary"]["kind"] == "fixed"
    assert lava_file.load_program(path).kind == "fixed"


def test_export_refuses_bad_files(tmp_path):
    path = tmp_path / "p.h5"
    lava_file.save_program(path, mapping.fixed_program(small_network()))
    with h5py.File(path, "r+") as f:
        f["weights/W0"][0, 0] += 2
    with pytest.raises(lava_file.LavaFileError, match="content hash mismatch"):
        lava_file.load_program(path)
    with pytest.raises(FileNotFoundError):
        lava_file.load_program(tmp_path / "missing.h5")
    (tmp_path / "junk.h5").write_text("not hdf5")
    with pytest.raises(lava_file.LavaFileError, match="not a readable HDF5"):
        lava_file.load_program(tmp_path / "junk.h5")
    storage.save_network(tmp_path / "net.h5", small_network())
    with pytest.raises(lava_file.LavaFileError, match="not a Lava export"):
        lava_file.load_program(tmp_path / "net.h5")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lava_file.save_program(tmp_path / "no" / "p.h5", mapping.fixed_program(small_network()))


def test_a_lava_host_loads_the_export_without_the_simulator(tmp_path):
    """A host without ebm_sim (its import blocked) loads the file and runs the program."""
    program = mapping.fixed_program(small_network())
    path = tmp_path / "p.h5"
    lava_file.save_program(path, program)
    x = program.encode_inputs(images(4, 12))
    np.save(tmp_path / "x.npy", x)
    code = (f"import sys; sys.modules['ebm_sim'] = None\n"
            f"import numpy as np\n"
            f"from hardware.lava_file import load_program\n"
            f"from hardware.program import simulate\n"
            f"p = load_program({str(path)!r})\n"
            f"print(simulate(p, np.load({str(tmp_path / 'x.npy')!r})).states[-1].tolist())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_array_equal(eval(done.stdout.strip()), simulate(program, x).states[-1])

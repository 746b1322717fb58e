"""The Loihi cost model against a hand count, its placement on cores, and its replaceable, cited table."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from ebm_sim.network import Network
from hardware import mapping
from hardware.cost_model import LOIHI, CostTable, barrier_ns, estimate_cost, estimate_label, place
from hardware.program import ProgramRun, simulate


def tiny_program():
    return mapping.float_program(Network.init((3, 4, 2), seed=0, dtype=np.float64), steps=3)


def tiny_run():
    """Two samples; active[t, i, layer] = nonzero payloads of input, layer 1, layer 2; sample 0 stops after 2 steps."""
    active = np.array([[[3, 0, 0], [2, 0, 0]],
                       [[3, 4, 1], [2, 3, 2]],
                       [[3, 2, 2], [2, 1, 0]]])
    return ProgramRun(states=[], steps=np.array([2, 3]), converged=np.array([True, False]),
                      quiet=np.zeros((2, 3), bool), active=active)


def test_counts_match_a_hand_count():
    program, run = tiny_program(), tiny_run()
    est = estimate_cost(program, run, LOIHI)
    # Dense W0: input -> layer 1 (4 targets); W1: layer 1 -> layer 2 (2 targets); W1T: layer 2 -> layer 1 (4)
    expected_synops, expected_messages, expected_ns = [], [], []
    barrier = barrier_ns(LOIHI, 2)
    for i in range(2):
        synops = messages = ns = 0.0
        for t in range(run.steps[i]):
            x, s1, s2 = run.active[t, i]
            synops += 4 * x + 2 * s1 + 4 * s2
            messages += x * 1 + s1 * 1 + s2 * 1  # each layer sits on one core; every spike reaches one core
            ns += max(4 * 8.4 + (x + s2) * 4 * 3.5, 2 * 8.4 + s1 * 2 * 3.5) + barrier
        expected_synops.append(synops)
        expected_messages.append(messages)
        expected_ns.append(ns)
    np.testing.assert_allclose(est.synaptic_ops, expected_synops)
    np.testing.assert_allclose(est.messages, expected_messages)
    np.testing.assert_allclose(est.neuron_updates, [2 * 6, 3 * 6])
    np.testing.assert_allclose(est.timesteps, [2, 3])
    np.testing.assert_allclose(est.latency_us, np.array(expected_ns) * 1e-3)
    energy_pj = (np.array(expected_synops) * 23.6 + est.neuron_updates * 81.0
                 + np.array(expected_messages) * (1.7 + 1.0 * 3.5))
    np.testing.assert_allclose(est.energy_uj, energy_pj * 1e-6)


def test_placement_splits_layers_by_synapse_memory():
    program = mapping.float_program(Network.init((784, 512, 512, 10), seed=0), steps=2)
    placement = place(program, LOIHI)
    # layer 1 keeps 784 + 512 synapses per neuron: 1048576 bits / (8 x 1296) = 101 per core -> 6 cores of 86
    assert placement.cores == (6, 3, 1) and placement.neurons_per_core == (86, 171, 10)
    assert placement.total_cores == 10 and placement.chips == 1 and placement.fits_one_chip
    wide = mapping.float_program(Network.init((5000, 4, 2), seed=0), steps=2)
    with pytest.raises(ValueError, match="over the 4096 input axons"):
        place(wide, LOIHI)


def test_barrier_grows_with_the_tiles_used():
    assert barrier_ns(LOIHI, 1) == 113.0 and barrier_ns(LOIHI, 4) == 113.0
    assert barrier_ns(LOIHI, 128) == 465.0 and barrier_ns(LOIHI, 1000) == 465.0
    assert 113.0 < barrier_ns(LOIHI, 40) < 465.0


def test_every_output_says_it_is_an_estimate_and_for_which_chip():
    program = mapping.fixed_program(Network.init((6, 5, 3), seed=0, gain=1.5), steps=10)
    run = simulate(program, program.encode_inputs(np.random.default_rng(0).uniform(0, 1, (8, 6))))
    est = estimate_cost(program, run)
    means = est.means()
    assert means["kind"] == "estimated" and means["timesteps"] == pytest.approx(np.mean(run.steps))
    for text in (est.summary(), means["label"], estimate_label(LOIHI)):
        assert "ESTIMATE, not a measurement" in text and "Loihi (1st generation)" in text
        assert "Davies et al." in text


def test_the_table_is_replaceable(tmp_path):
    path = tmp_path / "table.json"
    path.write_text(LOIHI.to_json())
    assert CostTable.from_json(path) == LOIHI
    doubled = dataclasses.replace(LOIHI, chip="Hypothetical chip", synaptic_op_pj=2 * LOIHI.synaptic_op_pj)
    path.write_text(doubled.to_json())
    program, run = tiny_program(), tiny_run()
    base, other = estimate_cost(program, run, LOIHI), estimate_cost(program, run, CostTable.from_json(path))
    np.testing.assert_allclose(other.energy_uj - base.energy_uj, base.synaptic_ops * LOIHI.synaptic_op_pj * 1e-6)
    assert "Hypothetical chip" in other.summary()


def test_bad_tables_and_runs_are_refused(tmp_path):
    path = tmp_path / "t.json"
    data = json.loads(LOIHI.to_json())
    del data["hop_pj"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="needs the keys"):
        CostTable.from_json(path)
    data["hop_pj"] = -1.0
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="hop_pj must be a finite number"):
        CostTable.from_json(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON cost table"):
        CostTable.from_json(path)
    with pytest.raises(FileNotFoundError):
        CostTable.from_json(tmp_path / "missing.json")
    run = tiny_run()
    run.active = run.active[:, :, :2]
    with pytest.raises(ValueError, match="run.active must be"):
        estimate_cost(tiny_program(), run)

"""The work behind ``ebm hardware run`` and ``ebm hardware estimate``: a program on a dataset, checked against its
references, and the cost model's estimate, as summary dicts (the CLI formats and prints them).

    program, network = program_from_file("net.h5", kind="fixed")     # a network file or a Lava export
    x, y = load_test_inputs("digits", limit=360, num_inputs=program.layer_sizes[0])
    lava_report(program, x, y, network)      # accuracy, steps, ms/step, agreement with Numba and the simulator
    estimate_report(program, x, y, table)    # operations, energy and latency per inference (ESTIMATE)
"""
from __future__ import annotations

import numpy as np

from .cost_model import LOIHI, CostTable, estimate_cost
from .program import LavaProgram, simulate


def program_from_file(path, kind: str | None = None, **options):
    """(program, network or None): a Lava export as stored, or a network file mapped with
    ``mapping.to_program(network, kind or "fixed", deployment, **options)`` (options: dt, steps, tol, frac_bits,
    ...; None values are left to the network's stored ``Deployment``). An export refuses options and another kind:
    they were fixed at export."""
    from ebm_sim import storage
    from ebm_sim.deployment import Deployment

    from . import lava_file
    from .mapping import to_program

    options = {k: v for k, v in options.items() if v is not None}
    if _format_of(path) == lava_file.FORMAT:
        program = lava_file.load_program(path)
        if options or (kind is not None and kind != program.kind):
            given = sorted(options) + (["kind"] if kind is not None and kind != program.kind else [])
            raise ValueError(f"{path} is a Lava export (a {program.kind} program with its settings fixed at export): "
                             f"{', '.join(given)} cannot be changed; export the network again instead")
        return program, None
    network = storage.load_network(path)  # dense, or layered (convolutional: hardware/layered_mapping.py)
    return to_program(network, kind or "fixed", Deployment.of_network_file(path), **options), network


def _format_of(path) -> str | None:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            value = f.attrs.get("format")
    except OSError:
        return None  # the loaders give the precise message
    return value.decode() if isinstance(value, bytes) else value


def load_test_inputs(dataset: str, data_dir=None, limit: int | None = None, num_inputs: int | None = None):
    """(x (N, n_0) float32 in [0, 1], y (N,)): the test split, or a seeded class-stratified subsample of ``limit``;
    ValueError if the images do not have ``num_inputs`` features."""
    from ebm_sim.datasets import load_dataset

    data = load_dataset(dataset, data_dir, limit_test=limit)
    if num_inputs is not None and data.num_features != num_inputs:
        raise ValueError(f"the network takes {num_inputs} inputs but {data.name} images have {data.num_features} "
                         f"features")
    return data.x_test, data.y_test


def lava_report(program: LavaProgram, x, y, network=None, *, chunk: int = 64, progress: bool = True,
                resume_file=None) -> dict:
    """Run x through the Lava graph and compare with the numpy simulator of the same program (bit-exact in fixed
    point, float64 rounding in float) and, given the network, with the Numba relaxation of the same dynamics."""
    from .lava_run import run_lava

    result = run_lava(program, x, chunk=chunk, progress=progress, resume_file=resume_file)
    predictions = result.predictions()
    sim = simulate(program, program.encode_inputs(x))
    sim_outputs = program.decode_states(sim.states[-1])
    report = {"kind": program.kind, "layer_sizes": list(program.layer_sizes), "samples": len(y),
              "accuracy": float(np.mean(predictions == y)), "steps_mean": float(np.mean(result.steps)),
              "converged": float(np.mean(result.converged)), "ms_per_step": result.ms_per_step,
              "ms_per_sample": result.ms_per_sample, "setup_s": result.setup_s, "lava_steps": result.lava_steps,
              "simulator": {"agreement": float(np.mean(predictions == program.predictions(sim_outputs))),
                            "max_output_difference": float(np.max(np.abs(result.outputs - sim_outputs))),
                            "same_steps": float(np.mean(result.steps == sim.steps))}}
    if network is not None:
        method = "fixed_point" if program.dt == 1 else "euler"
        ref_predictions, ref_steps = _reference_relaxation(network, x, program, method)
        report["numba"] = {"accuracy": float(np.mean(ref_predictions == y)),
                           "agreement": float(np.mean(predictions == ref_predictions)),
                           "same_steps": float(np.mean(result.steps == ref_steps)), "method": method,
                           "engine": "numpy (ebm_sim.model)" if hasattr(network, "layer_shapes") else "Numba"}
    return report


def _reference_relaxation(network, x, program: LavaProgram, method: str) -> tuple:
    """(predictions (N,), steps (N,)) of the simulator's relaxation with the program's dt, tol and step cap: the
    Numba kernels for a dense ``Network``, ``ebm_sim.model.dynamics.relax`` (numpy) for a layered one."""
    options = {"method": method, "tol": program.tol, "max_steps": program.steps, "dt": program.dt}
    if not hasattr(network, "layer_shapes"):
        from ebm_sim.relax import relax

        ref = relax(network, x, **options)
        return ref.predictions(), ref.steps
    from ebm_sim.model.dynamics import relax as relax_layered
    from ebm_sim.model.energy import output

    ref = relax_layered(network, np.asarray(x).reshape((-1,) + network.input_shape), **options)
    return np.argmax(output(network, ref.states), axis=1), ref.steps


def estimate_report(program: LavaProgram, x, y, table: CostTable = LOIHI) -> dict:
    """The cost model on x: operation counts, energy and latency per inference (means), with the estimate's label;
    the activity comes from the numpy simulator of the program (bit-exact with the Lava fixed-point models)."""
    run = simulate(program, program.encode_inputs(x))
    predictions = program.predictions(program.decode_states(run.states[-1]))
    estimate = estimate_cost(program, run, table)
    return {"kind": program.kind, "layer_sizes": list(program.layer_sizes), "samples": len(y),
            "accuracy": float(np.mean(predictions == y)), "converged": float(np.mean(run.converged)),
            "placement": {"neurons_per_core": list(estimate.placement.neurons_per_core),
                          "cores": list(estimate.placement.cores)},
            **estimate.means(), "summary": estimate.summary()}

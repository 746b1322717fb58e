"""Build the Lava 0.10 graph of a ``LavaProgram`` and run a dataset through it, sample after sample.

    result = run_lava(program, x)             # x (N, n_0) in [0, 1]
    result.outputs (N, n_L), result.steps, result.converged, result.predictions(), result.ms_per_step

Graph: ``ClampedInput`` -> Dense W0 -> ``HardSigmoidLayer`` 1 <-> Dense W1 / W1T <-> layer 2 ... (every Dense with
num_message_bits=24, graded payloads). One compiled graph runs all N samples back to back, P = T + 1 Lava steps each:
the first step of a sample resets the layers and absorbs Dense's one-step delay (see
hardware/lava_processes/models.py), the next T are the Euler steps, so Lava step j of a sample equals Euler step j
of ``ebm_sim.relax.relax(..., method="euler", dt=dt, tol=0, max_steps=T)``. Samples cannot be batched: Dense ports
are 1-D (a batch would need block-diagonal weights), so the dataset streams through one sample at a time, and the
host reads the records of each chunk of samples (Var.get moves one number per message: records are kept small).

Every sample runs all T steps (no global stop on the chip); ``steps``/``converged`` say when it reached equilibrium
(the first step at which every layer moved less than tol dt, the residual of ``relax``), from per-step flags the
layers record. Long runs show a progress bar and, with ``resume_file``, continue after an interruption.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .program import LavaProgram, steps_from_quiet, unpack_quiet

SELECT_TAG = {"float": "floating_pt", "fixed": "fixed_pt"}
NUM_MESSAGE_BITS = 24


@dataclass
class LavaRunResult:
    """Outputs of a Lava run of N samples, in [0, 1] (decoded from fixed point).

    outputs: (N, n_L) output states after T steps; states: all layers' (list of (N, n_k)) with record="all";
    steps, converged: (N,) equilibrium per sample; trajectory: with record_trajectory, list of L arrays
    (T + 1, N, n_k); lava_steps: Lava time steps run; run_s: seconds inside Lava's run calls (compile, start-up and
    reading records excluded); setup_s: compile and start-up; read_s: reading records; kind: "float" | "fixed";
    predict: the program's ``predictions`` (outputs -> classes).
    """

    outputs: np.ndarray
    steps: np.ndarray
    converged: np.ndarray
    kind: str
    lava_steps: int
    run_s: float
    setup_s: float
    read_s: float
    states: list | None = None
    trajectory: list | None = None
    predict: object = None

    def predictions(self) -> np.ndarray:
        """The predicted classes (N,): the program's ``predictions`` of the outputs (``predict``: the argmax of the
        output states, or of a layered program's readout logits), the argmax without one."""
        return np.argmax(self.outputs, axis=1) if self.predict is None else self.predict(self.outputs)

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.run_s / max(self.lava_steps, 1)

    @property
    def ms_per_sample(self) -> float:
        return 1e3 * self.run_s / max(len(self.outputs), 1)


def build_graph(program: LavaProgram, inputs: np.ndarray, record_samples: int, record_trajectory: bool = False):
    """Lava processes for ``program`` with encoded ``inputs`` (N, n_0): returns (source, layers, denses); a
    connection with a sparse matrix (a convolution of a ``LayeredProgram``) becomes a ``Sparse`` process."""
    from lava.proc.dense.process import Dense
    from lava.proc.sparse.process import Sparse
    from scipy.sparse import issparse

    from .lava_processes.process import ClampedInput, HardSigmoidLayer

    steps = program.steps
    source = ClampedInput(inputs=inputs, steps_per_sample=steps + 1, name="input")
    fixed = program.kind == "fixed"
    layers = [HardSigmoidLayer(shape=(n,), bias=b, dt=program.dt_mantissa if fixed else program.dt, shift=shift,
                               full_scale=program.full_scale, quiet_below=program.quiet_below, steps=steps,
                               record_samples=record_samples, record_trajectory=record_trajectory, name=f"layer{k}")
              for k, (n, b, shift) in enumerate(zip(program.layer_sizes[1:], program.biases, program.shifts), 1)]
    nodes = [source] + layers
    denses = []
    lava_conv = getattr(program, "lava_conv", lambda name: None)  # a LayeredProgram's conv processes
    for conn in program.connections():
        options = {"weight_exp": conn.exp, "num_weight_bits": 8} if fixed else {}
        conv = lava_conv(conn.name)
        if conv is not None:
            denses.append(_conv_process(conv, nodes[conn.source], nodes[conn.target], conn.name, options))
            continue
        if issparse(conn.weights):  # a convolution or its transpose (hardware/layered_program.py)
            dense = Sparse(weights=conn.weights.tocsr(), num_message_bits=NUM_MESSAGE_BITS, name=conn.name,
                           **options)
        else:
            dense = Dense(weights=np.ascontiguousarray(conn.weights), num_message_bits=NUM_MESSAGE_BITS,
                          name=conn.name, **options)
        nodes[conn.source].s_out.connect(dense.s_in)
        dense.a_out.connect(nodes[conn.target].a_in)
        denses.append(dense)
    return source, layers, denses


def _conv_process(conv: dict, source, target, name: str, options: dict):
    """A ``lava.proc.conv.Conv`` from ``source``'s flat (C H W,) states to ``target``'s a_in: the flat ports are
    reshaped to (C, H, W) and transposed to Lava's (W, H, C) on the way in, and back on the way out (virtual ports).
    ``conv``: ``LayeredProgram.lava_conv``; Lava's fixed-point Conv ignores weight_exp (the program's is 0)."""
    from lava.proc.conv.process import Conv

    process = Conv(weight=conv["weight"], input_shape=conv["input_shape"], padding=conv["padding"],
                   stride=conv["stride"], num_message_bits=NUM_MESSAGE_BITS, name=name, **options)
    source.s_out.reshape(conv["pre_shape"]).transpose((2, 1, 0)).connect(process.s_in)
    process.a_out.transpose((2, 1, 0)).reshape((int(np.prod(conv["post_shape"])),)).connect(target.a_in)
    return process


def _inputs_hash(encoded: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(encoded).tobytes() + str(encoded.shape).encode()).hexdigest()


def _load_partial(path: Path, key: str) -> dict | None:
    """Finished samples of an interrupted run with the same program, inputs and records, else None."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key:
                return None
            return {name: data[name] for name in data.files if name != "key"}
    except (OSError, ValueError, KeyError):
        return None


def _save_partial(path: Path, key: str, arrays: dict) -> None:
    """Atomically write the finished samples (temp file, then rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    try:
        np.savez(tmp, key=np.array(key), **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def run_lava(program: LavaProgram, x, *, chunk: int = 64, record: str = "output", record_trajectory: bool = False,
             progress: bool = False, resume_file=None) -> LavaRunResult:
    """Run images x (N, n_0) in [0, 1] through the Lava graph of ``program`` (``floating_pt`` or ``fixed_pt``
    models, Loihi2SimCfg on the CPU).

    chunk: samples between host reads (and checkpoints); record: "output" (the output layer) or "all" (every
    layer's final state); record_trajectory: every step of every layer (slow to read: tests and small N only).
    resume_file: a .npz where finished chunks are saved; a rerun with the same program and inputs continues from it
    (it is deleted at the end)."""
    from tqdm import tqdm

    if record not in ("output", "all"):
        raise ValueError(f"record must be 'output' or 'all', got {record!r}")
    if not (isinstance(chunk, (int, np.integer)) and chunk >= 1):
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    encoded = program.encode_inputs(x)
    n, steps, sizes = encoded.shape[0], program.steps, program.layer_sizes[1:]
    kept = range(len(sizes)) if record == "all" else [len(sizes) - 1]
    arrays = {"steps": np.zeros(n, np.int64), "converged": np.zeros(n, bool),
              **{f"s{k + 1}": np.zeros((n, sizes[k])) for k in kept}}
    if record_trajectory:
        arrays.update({f"traj{k + 1}": np.zeros((steps + 1, n, m)) for k, m in enumerate(sizes)})
    key = f"{program.content_hash()}:{_inputs_hash(encoded)}:{record}:{record_trajectory}"
    resume_file = Path(resume_file) if resume_file is not None else None
    done = 0
    partial = _load_partial(resume_file, key) if resume_file is not None else None
    if partial is not None:
        done = int(partial.pop("done"))
        arrays.update(partial)
    totals = {"lava_steps": 0, "run_s": 0.0, "setup_s": 0.0, "read_s": 0.0}
    if done < n:
        _run_remaining(program, encoded, done, chunk, arrays, kept, record_trajectory, totals, resume_file, key,
                       tqdm(total=n, initial=done, desc=f"lava {program.kind}", unit="sample", disable=not progress))
    if resume_file is not None:
        resume_file.unlink(missing_ok=True)
    decode = program.decode_states
    return LavaRunResult(decode(arrays[f"s{len(sizes)}"]), arrays["steps"], arrays["converged"], program.kind,
                         totals["lava_steps"], totals["run_s"], totals["setup_s"], totals["read_s"],
                         states=[decode(arrays[f"s{k + 1}"]) for k in kept] if record == "all" else None,
                         trajectory=[decode(arrays[f"traj{k + 1}"]) for k in range(len(sizes))]
                         if record_trajectory else None, predict=program.predictions)


def _run_remaining(program, encoded, done, chunk, arrays, kept, record_trajectory, totals, resume_file, key,
                   bar) -> None:
    """Compile one graph for samples done..N-1 and run it chunk by chunk, filling ``arrays`` (see run_lava)."""
    from lava.magma.core.run_conditions import RunSteps
    from lava.magma.core.run_configs import Loihi2SimCfg

    n, steps = encoded.shape[0], program.steps
    rows = min(chunk, n - done)
    start = time.perf_counter()
    source, layers, _ = build_graph(program, encoded[done:], rows, record_trajectory)
    try:
        source.create_runtime(run_cfg=Loihi2SimCfg(select_tag=SELECT_TAG[program.kind]))
        totals["setup_s"] += time.perf_counter() - start
        with bar:
            while done < n:
                count = min(rows, n - done)
                start = time.perf_counter()
                source.run(condition=RunSteps(num_steps=count * (steps + 1)))
                totals["run_s"] += time.perf_counter() - start
                totals["lava_steps"] += count * (steps + 1)
                start = time.perf_counter()
                _read_chunk(program, layers, done, count, arrays, kept, record_trajectory)
                totals["read_s"] += time.perf_counter() - start
                done += count
                if resume_file is not None and done < n:
                    _save_partial(resume_file, key, {**arrays, "done": np.array(done)})
                bar.update(count)
    finally:
        source.stop()


def _read_chunk(program, layers, first, count, arrays, kept, record_trajectory) -> None:
    """Copy the records of samples first..first+count-1 from the layers' Vars into ``arrays``."""
    from .lava_processes.process import MASK_BITS

    quiet = np.ones((count, program.steps), dtype=bool)
    for layer in layers:
        quiet &= unpack_quiet(layer.quiet.get()[:count], program.steps, MASK_BITS)
    steps, converged = steps_from_quiet(quiet, program.steps)
    arrays["steps"][first:first + count] = steps
    arrays["converged"][first:first + count] = converged
    for k in kept:
        arrays[f"s{k + 1}"][first:first + count] = layers[k].final.get()[:count]
    if record_trajectory:
        for k, layer in enumerate(layers):
            arrays[f"traj{k + 1}"][:, first:first + count] = layer.trajectory.get()[:count].transpose(1, 0, 2)

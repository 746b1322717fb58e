"""Loihi cost model: operations per inference of a Lava program, turned into energy and latency ESTIMATES.

    run = simulate(program, program.encode_inputs(x))        # or the activity of any run of the same program
    estimate = estimate_cost(program, run, LOIHI)            # LOIHI: Davies et al. 2018, Table 2
    print(estimate.summary())

Counts per inference (sample i stops at its step to equilibrium T_i; every step t < T_i):
  timesteps       T_i
  neuron updates  T_i (n_1 + ... + n_L)
  payloads        units whose state is nonzero, summed over steps (event-driven: a zero payload is not sent)
  synaptic ops    sum over processes c of the fan-out of every unit with a nonzero payload (one per synapse reached):
                  payloads(source of c) x n_target(c) for a Dense; a unit's column of taps for a conv's Sparse
  messages        sum over layers of payloads x the cores holding that layer's targets (one spike per core)
Energy  = synaptic ops E_syn + neuron updates E_neuron + messages (E_spike + mean_hops E_hop)
Latency = sum over steps of (max over layers of the per-core time m_k t_neuron + inputs_k(t) m_k t_syn) + barrier,
with m_k neurons per core (the core's neuron and synapse-memory limits) and the barrier interpolated between the
table's 1-tile and 32-tile times. Dynamic energy of these operations only: no static power, host I/O or input
encoding. These are estimates for the chip named in the table, never measurements.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from .program import LavaProgram, ProgramRun


@dataclass(frozen=True)
class CostTable:
    """Per-operation costs and core limits of a neuromorphic chip (replaceable: ``CostTable.from_json``)."""

    chip: str
    source: str
    synaptic_op_pj: float
    synaptic_op_ns: float
    neuron_update_pj: float
    neuron_update_ns: float
    spike_pj: float
    hop_pj: float
    mean_hops: float
    barrier_ns_one_tile: float
    barrier_ns_max_tiles: float
    max_tiles: int
    neurons_per_core: int
    synapse_bits_per_core: int
    bits_per_synapse: int
    input_axons_per_core: int
    cores_per_tile: int
    cores_per_chip: int
    caveat: str = ""

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("float", "int") and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                                    and math.isfinite(value) and value >= 0):
                raise ValueError(f"cost table field {f.name} must be a finite number >= 0, got {value!r}")
        for name in ("neurons_per_core", "synapse_bits_per_core", "bits_per_synapse", "input_axons_per_core",
                     "cores_per_tile", "cores_per_chip", "max_tiles"):
            if getattr(self, name) < 1:
                raise ValueError(f"cost table field {name} must be >= 1")

    @classmethod
    def from_json(cls, path) -> "CostTable":
        """A table from a JSON object with exactly this class's fields (see docs/hardware.md)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such cost table") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a JSON cost table: {e}") from None
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.name != "caveat"}
        if not isinstance(data, dict) or set(data) - names or required - set(data):
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{path}: a cost table needs the keys {sorted(required)} (and optionally 'caveat'); "
                             f"got {got}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


# Davies et al., "Loihi: A Neuromorphic Manycore Processor with On-Chip Learning", IEEE Micro 38(1), 2018, Table 2
# (0.75 V): synaptic spike op >= 23.6 pJ (min energy) and <= 3.5 ns (max time); neuron update 81 pJ / 8.4 ns active
# (52 pJ / 5.3 ns inactive: every unit here updates every step, so active); spike within a tile 1.7 pJ; tile hop
# 3-4 pJ (E-W / N-S; 3.5 taken); mesh-wide barrier sync 113-465 ns for 1-32 tiles. Core limits from nengo-loihi
# (nengo_loihi/block.py, builder/validate.py): 1024 compartments, 4096 input axons and 1 Mbit (1048576 bits) of
# synapse memory per core; 128 cores per chip, 4 per tile (Davies et al. 2018: 128 cores on a 32-tile mesh).
LOIHI = CostTable(
    chip="Intel Loihi (1st generation)", source="Davies et al., IEEE Micro 38(1), 2018, Table 2; nengo-loihi limits",
    synaptic_op_pj=23.6, synaptic_op_ns=3.5, neuron_update_pj=81.0, neuron_update_ns=8.4, spike_pj=1.7,
    hop_pj=3.5, mean_hops=1.0, barrier_ns_one_tile=113.0, barrier_ns_max_tiles=465.0, max_tiles=32,
    neurons_per_core=1024, synapse_bits_per_core=1_048_576, bits_per_synapse=8, input_axons_per_core=4096,
    cores_per_tile=4, cores_per_chip=128,
    caveat="Loihi 1 has binary spikes only: the graded (24-bit) payloads of this graph are charged as one spike "
           "each, as Loihi 2 would carry them; no per-operation table for Loihi 2 is public. Assumed: 8 bits per "
           "synapse (dense encoding), one tile hop per message.")
TABLES = {"loihi": LOIHI}


def estimate_label(table: CostTable) -> str:
    """The sentence every output of the cost model carries."""
    return (f"ESTIMATE, not a measurement: {table.chip}, per-operation costs of {table.source}. {table.caveat}")


@dataclass(frozen=True)
class Placement:
    """Layers on cores: cores c_k per layer (1..L) and neurons_per_core m_k = ceil(n_k / c_k) on each, total cores
    and chips."""

    neurons_per_core: tuple
    cores: tuple
    total_cores: int
    chips: int
    fits_one_chip: bool


def synapses_per_target(weights) -> np.ndarray:
    """Stored synapses into each target unit of one Dense or Sparse process (n_target,): n_source for a dense matrix
    (every weight, zeros included), the row's stored entries for a sparse one (a convolution's taps)."""
    if isinstance(weights, np.ndarray):
        return np.full(weights.shape[0], weights.shape[1], dtype=np.int64)
    return np.diff(weights.tocsr().indptr).astype(np.int64)


def fan_in(program: LavaProgram, k: int) -> int:
    """The largest number of synapses into one neuron of layer k (1-based), over all processes into it: n_{k-1} +
    n_{k+1} for a dense chain (W_{k-1} and W_k^T), the conv taps plus the dense inputs for a layered program."""
    total = np.zeros(program.layer_sizes[k], dtype=np.int64)
    for c in program.connections():
        if c.target == k:
            total += synapses_per_target(c.weights)
    return int(total.max(initial=0))


def place(program: LavaProgram, table: CostTable) -> Placement:
    """Split each layer over as few cores as its neurons fit: at most min(neurons per core, synapse memory /
    (bits per synapse x fan-in_k)) each, spread evenly.

    fan-in_k: the synapses the core stores for each of its neurons (``fan_in``; n_{k-1} + n_{k+1} in a dense chain).
    Raises ValueError when one neuron's fan-in exceeds a core (input axons or synapse memory)."""
    sizes = program.layer_sizes
    per_core, cores = [], []
    for k in range(1, len(sizes)):
        fan_in_k = fan_in(program, k)
        if fan_in_k > table.input_axons_per_core:
            raise ValueError(f"layer {k} has a fan-in of {fan_in_k}, over the {table.input_axons_per_core} input "
                             f"axons of a {table.chip} core")
        m = min(table.neurons_per_core, table.synapse_bits_per_core // (table.bits_per_synapse * fan_in_k))
        if m < 1:
            raise ValueError(f"layer {k}: one neuron's {fan_in_k} synapses exceed the synapse memory of a "
                             f"{table.chip} core")
        count = -(-sizes[k] // m)
        cores.append(count)
        per_core.append(-(-sizes[k] // count))  # the layer split evenly over its cores
    total = int(sum(cores))
    return Placement(tuple(per_core), tuple(cores), total, -(-total // table.cores_per_chip),
                     total <= table.cores_per_chip)


@dataclass
class CostEstimate:
    """Per-inference means (and per-sample arrays) of the counts and of the estimated energy and latency."""

    table: CostTable
    placement: Placement
    timesteps: np.ndarray
    neuron_updates: np.ndarray
    payloads: np.ndarray
    synaptic_ops: np.ndarray
    messages: np.ndarray
    energy_uj: np.ndarray
    latency_us: np.ndarray

    @property
    def label(self) -> str:
        return estimate_label(self.table)

    def means(self) -> dict:
        """Mean per inference of every count and estimate, plus the placement and the label (JSON-ready)."""
        out = {name: float(np.mean(getattr(self, name))) for name in
               ("timesteps", "neuron_updates", "payloads", "synaptic_ops", "messages", "energy_uj", "latency_us")}
        out.update(cores=self.placement.total_cores, chips=self.placement.chips,
                   fits_one_chip=self.placement.fits_one_chip, chip=self.table.chip, kind="estimated",
                   label=self.label)
        return out

    def summary(self) -> str:
        m = self.means()
        return (f"{self.table.chip} cost model, per inference (mean of {len(self.timesteps)} samples): "
                f"{m['timesteps']:.1f} timesteps to equilibrium, {m['synaptic_ops']:.3g} synaptic ops, "
                f"{m['neuron_updates']:.3g} neuron updates, {m['messages']:.3g} messages on "
                f"{m['cores']} cores -> energy {m['energy_uj']:.3g} uJ, latency {m['latency_us']:.3g} us\n"
                f"  {self.label}")


def barrier_ns(table: CostTable, cores: int) -> float:
    """Barrier synchronization time, linear in the tiles used between the 1-tile and max-tile times."""
    tiles = min(max(1, -(-cores // table.cores_per_tile)), table.max_tiles)
    if table.max_tiles == 1:
        return table.barrier_ns_one_tile
    return table.barrier_ns_one_tile + (table.barrier_ns_max_tiles - table.barrier_ns_one_tile) * (
        (tiles - 1) / (table.max_tiles - 1))


def estimate_cost(program: LavaProgram, run: ProgramRun, table: CostTable = LOIHI) -> CostEstimate:
    """Counts and estimates per inference from the activity of a run of ``program`` (``program.simulate`` gives
    ``run.active`` (T, N, L + 1) and ``run.steps`` (N,)); see the module docstring for the formulas."""
    if not isinstance(table, CostTable):
        raise ValueError(f"table must be a CostTable, got {type(table).__name__}")
    num = program.num_layers
    active = np.asarray(run.active, dtype=np.float64)
    steps = np.asarray(run.steps)
    if active.ndim != 3 or active.shape[2] != num + 1 or active.shape[0] < steps.max(initial=0):
        raise ValueError(f"run.active must be (T >= max steps, N, {num + 1}), got {active.shape}")
    placement = place(program, table)
    live = (np.arange(active.shape[0])[:, None] < steps[None, :])[:, :, None]  # steps before equilibrium
    active = active * live
    sizes = program.layer_sizes
    connections = program.connections()
    if run.synaptic_ops is not None:  # exact: each nonzero payload times its unit's fan-out (conv borders too)
        synops = np.asarray(run.synaptic_ops, dtype=np.float64) * live[:, :, 0]
    else:
        synops = sum(active[:, :, c.source] * sizes[c.target] for c in connections)   # (T, N), dense fan-out
    # a spike is delivered once to every core that holds one of its targets
    target_cores = np.zeros(num + 1)
    for c in connections:
        target_cores[c.source] += placement.cores[c.target - 1]
    messages = (active * target_cores).sum(axis=2)
    inputs_to = [sum(active[:, :, c.source] for c in connections if c.target == k) for k in range(1, num + 1)]
    core_ns = np.max(np.stack([m * table.neuron_update_ns + inp * m * table.synaptic_op_ns
                               for m, inp in zip(placement.neurons_per_core, inputs_to)]), axis=0)  # (T, N)
    step_ns = (core_ns + barrier_ns(table, placement.total_cores)) * live[:, :, 0]
    neuron_updates = steps * program.num_units
    synaptic_ops, messages_total = synops.sum(axis=0), messages.sum(axis=0)
    energy_pj = (synaptic_ops * table.synaptic_op_pj + neuron_updates * table.neuron_update_pj
                 + messages_total * (table.spike_pj + table.mean_hops * table.hop_pj))
    return CostEstimate(table, placement, steps.astype(np.float64), neuron_updates.astype(np.float64),
                        (active[:, :, :].sum(axis=(0, 2))), synaptic_ops, messages_total, energy_pj * 1e-6,
                        step_ns.sum(axis=0) * 1e-3)

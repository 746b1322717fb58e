"""A network as the Lava graph runs it (``LavaProgram``), and a numpy simulator of that graph, step for step.

This module needs only numpy (no simulator, no Lava): it is what a Lava host loads from an export file
(:mod:`hardware.lava_file`) and what :mod:`hardware.lava_run` builds the Lava processes from.

Topology (layer 0 is the clamped input, layers 1..L relax): Dense "W{k}" carries layer k to k + 1 (k = 0..L-1) and
Dense "W{k}T" carries layer k + 1 back to layer k (k = 1..L-1); several Dense outputs into one layer are summed.
Every Lava step each layer does

    float:  u = (a_in + b) * 2^-shift,         s <- clip(s + dt (u - s), 0, 1)
    fixed:  u = (a_in + b) >> shift,           s <- clip(s + (((u - s) * dt_m) >> 12), 0, 2^q)

where a_in is the sum of its Dense outputs, each W s_src computed one step earlier (Dense sends last step's product
before receiving: the one-step delay that makes the graph synchronous Euler), in fixed point
(W_int s_src) << e or >> -e with the connection's weight exponent e (Lava's bit-accurate Dense). Fixed-point units:
states and inputs s_int = s 2^q (q = ``frac_bits``, payloads of at most 24 bits), weights W = W_int 2^-p_k with 8-bit
mantissas W_int (even integers in [-256, 254], Lava's mixed-sign 8-bit weights), the field of layer k in units
2^-r_k (``field_bits``), so shift_k = r_k - q + (1 for the hard_sigmoid_half slope); dt = dt_m / 4096 (12 bits).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

KINDS = ("float", "fixed")
DT_BITS = 12                       # dt is a 12-bit mantissa in fixed point (like Loihi's 12-bit decays)
PAYLOAD_BITS = 24                  # graded-spike payloads and neuron state (Dense num_message_bits=24)
ACCUMULATOR_BITS = 32              # Lava's bit-accurate Dense accumulates W_int s_in in int32 before the shift
WEIGHT_MANTISSA_RANGE = (-256, 254)   # 8-bit mixed-sign weights: even integers (Lava: the LSB is the sign bit)
WEIGHT_EXP_RANGE = (-7, 7)         # Loihi's synaptic weight exponent (nengo-loihi, builder/validate.py: -7 <= wgtExp <= 7)


@dataclass(frozen=True)
class Connection:
    """One Dense process: ``weights`` (n_target, n_source) from layer ``source`` to layer ``target`` (layer 0 is the
    input), with weight exponent ``exp`` (fixed point; 0 in float)."""

    name: str
    source: int
    target: int
    weights: np.ndarray
    exp: int


@dataclass(frozen=True, eq=False)
class LavaProgram:
    """A layered network mapped for Lava: the parameters the processes take, in float or fixed point.

    layer_sizes (n_0, ..., n_L); weights: W_k (n_{k+1}, n_k), float64 or int32 mantissas; forward_exps[k]: exponent
    of Dense W_k; backward_exps[k - 1]: exponent of Dense W_k^T (k = 1..L-1); biases[k - 1]: b_k (n_k,) float64 or
    int32 in units 2^-field_bits[k - 1]; shifts[k - 1]: the layer's right shift (float: the slope exponent);
    dt: the Euler step (fixed: dt_mantissa / 4096); frac_bits q; weight_bits p_k; steps T per sample; tol: a sample
    is at equilibrium from the first step t with max_k max |s_k(t) - s_k(t-1)| < tol dt (``relax``'s residual; in
    fixed point a change of one state unit also counts as quiet, see ``quiet_below``).
    """

    kind: str
    layer_sizes: tuple
    weights: tuple
    biases: tuple
    shifts: tuple
    dt: float
    steps: int
    tol: float
    forward_exps: tuple = ()
    backward_exps: tuple = ()
    dt_mantissa: int = 0
    frac_bits: int = 0
    weight_bits: tuple = ()
    field_bits: tuple = ()
    network_hash: str = ""
    notes: dict = field(default_factory=dict)

    def __post_init__(self):
        _check_program(self)

    # ------------------------------------------------------------------ structure
    @property
    def num_layers(self) -> int:
        """L, the layers that relax."""
        return len(self.layer_sizes) - 1

    def connections(self) -> list:
        """The Dense processes, forward ones first: W0, W1, ..., then W1T, W2T, ... (see the module docstring)."""
        exps_f = self.forward_exps or (0,) * self.num_layers
        exps_b = self.backward_exps or (0,) * (self.num_layers - 1)
        forward = [Connection(f"W{k}", k, k + 1, w, int(exps_f[k])) for k, w in enumerate(self.weights)]
        backward = [Connection(f"W{k}T", k + 1, k, self.weights[k].T, int(exps_b[k - 1]))
                    for k in range(1, self.num_layers)]
        return forward + backward

    @property
    def num_units(self) -> int:
        """Neurons that relax, n_1 + ... + n_L."""
        return int(sum(self.layer_sizes[1:]))

    @property
    def num_synapses(self) -> int:
        """Synapses of all Dense processes (W_k and W_k^T counted separately, as the hardware stores them)."""
        return int(sum(c.weights.size for c in self.connections()))

    # ------------------------------------------------------------------ units
    @property
    def full_scale(self):
        """The state that means 1: 1.0 in float, 2^q in fixed point."""
        return 1.0 if self.kind == "float" else 1 << self.frac_bits

    @property
    def quiet_below(self) -> float:
        """A layer is quiet at a step when max |s_t - s_{t-1}| < quiet_below: tol dt in state units; in fixed point
        at least 1.5 units, so that a change of one unit (the resolution 2^-q, which integer dynamics near their
        fixed point keep flipping) counts as quiet: the residual cannot be resolved below it."""
        threshold = float(self.tol * self.dt * self.full_scale)
        return threshold if self.kind == "float" else max(threshold, 1.5)

    def encode_inputs(self, x) -> np.ndarray:
        """Images (N, n_0) in [0, 1] -> what the input source sends: float64, or round(x 2^q) as int32."""
        x = check_images(x, self.layer_sizes[0])
        if self.kind == "float":
            return x
        return np.rint(x * self.full_scale).astype(np.int32)

    def predictions(self, output_states) -> np.ndarray:
        """The predicted classes (N,) of output states (N, n_L) (program units or decoded): their argmax."""
        return np.argmax(np.asarray(output_states), axis=1)

    def decode_states(self, states) -> np.ndarray:
        """States in program units -> activations in [0, 1] (float64)."""
        return np.asarray(states, dtype=np.float64) / self.full_scale

    def dequantized_weights(self) -> list:
        """W_k as real numbers: the float weights, or W_int 2^-p_k."""
        if self.kind == "float":
            return [np.asarray(w, dtype=np.float64) for w in self.weights]
        return [w.astype(np.float64) * 2.0 ** -p for w, p in zip(self.weights, self.weight_bits)]

    def content_hash(self) -> str:
        """SHA-256 over every field that changes what the graph computes."""
        h = hashlib.sha256()
        h.update(json.dumps(self.describe(), sort_keys=True).encode())
        for array in (*self.weights, *self.biases):
            h.update(np.ascontiguousarray(array).tobytes())
        return h.hexdigest()

    def describe(self) -> dict:
        """The scalar parameters and the topology as plain JSON values (the export file's attributes)."""
        return {"kind": self.kind, "layer_sizes": [int(n) for n in self.layer_sizes],
                "shifts": [int(s) for s in self.shifts], "dt": float(self.dt), "steps": int(self.steps),
                "tol": float(self.tol), "forward_exps": [int(e) for e in self.forward_exps],
                "backward_exps": [int(e) for e in self.backward_exps], "dt_mantissa": int(self.dt_mantissa),
                "frac_bits": int(self.frac_bits), "weight_bits": [int(p) for p in self.weight_bits],
                "field_bits": [int(r) for r in self.field_bits], "network_hash": self.network_hash,
                "topology": [{"name": c.name, "source": c.source, "target": c.target,
                              "matrix": f"W{c.name[1:].rstrip('T')}", "transposed": c.name.endswith("T"),
                              "weight_exp": c.exp} for c in self.connections()]}


def check_images(x, n_0: int) -> np.ndarray:
    """Images (N, n_0) of finite values in [0, 1] as float64; ValueError naming what is wrong otherwise."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != n_0:
        raise ValueError(f"inputs must have shape (N, {n_0}) for this program, got {x.shape}")
    if x.shape[0] == 0:
        raise ValueError("inputs hold no samples")
    if not np.issubdtype(x.dtype, np.number) or not np.all(np.isfinite(x)):
        raise ValueError("inputs must be finite numbers")
    if x.min() < 0 or x.max() > 1:
        raise ValueError(f"inputs must lie in [0, 1], got values in [{x.min():g}, {x.max():g}]")
    return x.astype(np.float64)


def _check_program(p: LavaProgram) -> None:
    """Refuse (ValueError, naming the field) a program the processes cannot run: a hand-made or tampered one."""
    if p.kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {p.kind!r}")
    sizes = tuple(int(n) for n in p.layer_sizes)
    if len(sizes) < 2 or any(n <= 0 for n in sizes):
        raise ValueError(f"layer_sizes needs an input and at least one more positive size, got {p.layer_sizes}")
    num = len(sizes) - 1
    if len(p.weights) != num or len(p.biases) != num or len(p.shifts) != num:
        raise ValueError(f"{num} layers need {num} weight matrices, biases and shifts; got {len(p.weights)}, "
                         f"{len(p.biases)} and {len(p.shifts)}")
    fixed = p.kind == "fixed"
    for k, (w, b) in enumerate(zip(p.weights, p.biases)):
        w, b = np.asarray(w), np.asarray(b)
        if w.shape != (sizes[k + 1], sizes[k]) or b.shape != (sizes[k + 1],):
            raise ValueError(f"W{k} must have shape {(sizes[k + 1], sizes[k])} and b{k + 1} {(sizes[k + 1],)}, got "
                             f"{w.shape} and {b.shape}")
        if fixed:
            if w.dtype != np.int32 or b.dtype != np.int32:
                raise ValueError(f"a fixed-point program holds int32 weights and biases; W{k} is {w.dtype}, "
                                 f"b{k + 1} {b.dtype}")
            lo, hi = WEIGHT_MANTISSA_RANGE
            if w.size and (w.min() < lo or w.max() > hi or np.any(w % 2)):
                raise ValueError(f"W{k}: 8-bit mixed-sign weight mantissas must be even integers in [{lo}, {hi}]")
            if b.size and np.abs(b).max() >= 1 << (PAYLOAD_BITS - 1):
                raise ValueError(f"b{k + 1} does not fit {PAYLOAD_BITS} bits")
        elif w.dtype != np.float64 or b.dtype != np.float64 or not (np.all(np.isfinite(w)) and np.all(np.isfinite(b))):
            raise ValueError(f"a float program holds finite float64 weights and biases (W{k}: {w.dtype})")
    if any(int(s) < 0 or int(s) > PAYLOAD_BITS for s in p.shifts):
        raise ValueError(f"shifts must lie in [0, {PAYLOAD_BITS}], got {p.shifts}")
    if not (isinstance(p.steps, (int, np.integer)) and p.steps >= 1):
        raise ValueError(f"steps must be an integer >= 1, got {p.steps!r}")
    if not (np.isfinite(p.tol) and p.tol >= 0):
        raise ValueError(f"tol must be finite and >= 0, got {p.tol!r}")
    if not (0 < p.dt <= 1):
        raise ValueError(f"dt must lie in (0, 1], got {p.dt!r}")
    if fixed:
        if len(p.forward_exps) != num or len(p.backward_exps) != num - 1:
            raise ValueError(f"a fixed-point program needs {num} forward and {num - 1} backward weight exponents")
        lo, hi = WEIGHT_EXP_RANGE
        if any(not lo <= int(e) <= hi for e in (*p.forward_exps, *p.backward_exps)):
            raise ValueError(f"weight exponents must lie in [{lo}, {hi}], got {p.forward_exps} / {p.backward_exps}")
        if not 1 <= p.dt_mantissa <= 1 << DT_BITS or p.dt != p.dt_mantissa / (1 << DT_BITS):
            raise ValueError(f"dt_mantissa must lie in [1, {1 << DT_BITS}] and dt equal dt_mantissa / "
                             f"{1 << DT_BITS}, got {p.dt_mantissa} and {p.dt}")
        if not 1 <= p.frac_bits <= PAYLOAD_BITS - 2:
            raise ValueError(f"frac_bits must lie in [1, {PAYLOAD_BITS - 2}] (states up to 2^q in "
                             f"{PAYLOAD_BITS}-bit payloads), got {p.frac_bits}")
        if len(p.weight_bits) != num or len(p.field_bits) != num:
            raise ValueError(f"a fixed-point program needs {num} weight_bits and field_bits")


# ---------------------------------------------------------------------------------------------- quiet flags
def steps_from_quiet(quiet, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Steps to equilibrium from per-step quiet flags.

    quiet: (N, T) bool, True at step t (column t - 1) when every layer moved less than the tolerance (the residual
    of ``relax``). Returns (steps (N,) int64: the first such t, or T; converged (N,) bool: such a t exists)."""
    quiet = np.asarray(quiet, dtype=bool)
    converged = quiet.any(axis=1)
    first = np.argmax(quiet, axis=1) + 1
    return np.where(converged, first, steps).astype(np.int64), converged


def unpack_quiet(words, steps: int, bits_per_word: int) -> np.ndarray:
    """Per-layer record words (N, W) with bit (t - 1) % b of word (t - 1) // b set when quiet at step t -> (N, T)."""
    words = np.asarray(words).astype(np.int64)
    t = np.arange(steps)
    return (words[:, t // bits_per_word] >> (t % bits_per_word)) & 1 == 1


# ---------------------------------------------------------------------------------------------- simulation
@dataclass
class ProgramRun:
    """A run of a program over N samples, T steps each (every sample runs all T steps, as the Lava graph does).

    states: list of L arrays (N, n_k) in program units after T steps; steps, converged (N,): equilibrium as in
    ``steps_from_quiet``; quiet (N, T); active: (T, N, L + 1) nonzero payloads sent at each step by the input and
    each layer (the messages an event-driven chip would carry; the state of step t - 1 is sent at step t);
    trajectory: with record=True, list of L arrays (T + 1, N, n_k); synaptic_ops: (T, N) the synapses those
    payloads reach (each nonzero payload times its unit's fan-out in every process it feeds).
    """

    states: list
    steps: np.ndarray
    converged: np.ndarray
    quiet: np.ndarray
    active: np.ndarray
    trajectory: list | None = None
    synaptic_ops: np.ndarray | None = None


def _dense_output(conn: Connection, source: np.ndarray, fixed: bool) -> np.ndarray:
    """What a Dense sends: W s (float), or (W_int s_int) shifted by its exponent, as Lava's bit-accurate Dense."""
    if not fixed:
        return source @ conn.weights.T
    # Integer products in float64 are exact: every partial sum is an integer below 2^31 (checked when the program is
    # made), far below 2^53, so BLAS gives the int32 accumulator's exact value whatever its summation order.
    acc = np.rint(source.astype(np.float64) @ conn.weights.T.astype(np.float64)).astype(np.int64)
    return acc << conn.exp if conn.exp > 0 else acc >> -conn.exp


def layer_update(program: LavaProgram, k: int, s: np.ndarray, a_in: np.ndarray) -> np.ndarray:
    """One Euler step of layer k (1-based) from state s and summed input a_in (module docstring)."""
    if program.kind == "float":
        u = (a_in + program.biases[k - 1]) * 2.0 ** -int(program.shifts[k - 1])
        return np.clip(s + program.dt * (u - s), 0.0, 1.0)
    u = (a_in + program.biases[k - 1].astype(np.int64)) >> int(program.shifts[k - 1])
    new = s + (((u - s) * program.dt_mantissa) >> DT_BITS)
    return np.clip(new, 0, program.full_scale)


def simulate(program: LavaProgram, inputs, record: bool = False) -> ProgramRun:
    """Run the graph's dynamics in numpy on encoded inputs (N, n_0) (``program.encode_inputs``): T synchronous steps
    from s = 0, s_k(t) = update(s_k(t-1), sum of the Dense outputs of s(t-1)). Bit-exact with the fixed-point Lava
    models; float64 in float."""
    fixed = program.kind == "fixed"
    x = np.asarray(inputs, dtype=np.int64 if fixed else np.float64)
    if x.ndim != 2 or x.shape[1] != program.layer_sizes[0]:
        raise ValueError(f"inputs must have shape (N, {program.layer_sizes[0]}), got {x.shape}")
    n, steps, num = x.shape[0], program.steps, program.num_layers
    states = [np.zeros((n, m), dtype=x.dtype) for m in program.layer_sizes[1:]]
    connections = program.connections()
    fan_out = [_fan_out(conn.weights) for conn in connections]
    quiet = np.zeros((n, steps), dtype=bool)
    active = np.zeros((steps, n, num + 1), dtype=np.int64)
    synaptic_ops = np.zeros((steps, n), dtype=np.float64)
    trajectory = [np.zeros((steps + 1, n, m), dtype=x.dtype) for m in program.layer_sizes[1:]] if record else None
    for t in range(steps):
        layers = [x] + states
        active[t] = np.stack([np.count_nonzero(s, axis=1) for s in layers], axis=1)
        inputs_to = [np.zeros_like(s) for s in states]
        for conn, out in zip(connections, fan_out):
            synaptic_ops[t] += (layers[conn.source] != 0) @ out
            inputs_to[conn.target - 1] = inputs_to[conn.target - 1] + _dense_output(conn, layers[conn.source], fixed)
        new = [layer_update(program, k + 1, s, a) for k, (s, a) in enumerate(zip(states, inputs_to))]
        moved = np.max(np.stack([np.max(np.abs(a - b), axis=1) for a, b in zip(new, states)]), axis=0)
        quiet[:, t] = moved < program.quiet_below
        states = new
        if record:
            for k, s in enumerate(states):
                trajectory[k][t + 1] = s
    steps_to_eq, converged = steps_from_quiet(quiet, steps)
    return ProgramRun(states, steps_to_eq, converged, quiet, active, trajectory, synaptic_ops)


def _fan_out(weights) -> np.ndarray:
    """Synapses of each source unit (n_source,) float64: n_target for a dense matrix, the stored entries of its
    column for a sparse one (a convolution)."""
    if isinstance(weights, np.ndarray):
        return np.full(weights.shape[1], float(weights.shape[0]))
    return np.diff(weights.tocsc().indptr).astype(np.float64)

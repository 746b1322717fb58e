"""Map a trained ``ebm_sim.network.Network`` onto the Lava graph: a float program, or a fixed-point one with 8-bit
weights and weight exponents chosen per layer (the units are described in :mod:`hardware.program`).

    program = to_program(network, "fixed", dt=1.0, steps=30, tol=1e-4)

Fixed-point choices, per weight matrix W_k: the largest p_k with max |W_k| 2^p_k <= 254, mantissas
W_int = 2 round(W_k 2^p_k / 2) (even integers in [-256, 254]: Lava's 8-bit mixed-sign weights pass unchanged).
The field of layer k is kept in units 2^-r_k with r_k = q + max(0, max_in p - 7), so that every incoming Dense has a
weight exponent e = r_k - q - p in Loihi's [-7, 7]; the state fraction bits q are the largest (at most 16) for which
no accumulator can overflow: W_int s_int below 2^31 (Lava's int32 Dense) and fields plus biases below 2^23 (24 bits).

Refused with ValueError naming the problem: a softmax readout (outside the dynamics), an activation whose slope is
not a power of two, a network over one Loihi 2 chip's capacity (MAX_UNITS neurons, MAX_SYNAPSES synapses: Intel,
"Taking Neuromorphic Computing to the Next Level with Loihi 2", technology brief, 2021), and weights that do not
quantize: a relative error ||W_q - W||_F / ||W||_F above ``max_weight_error``, more than ``max_zeroed`` of the
nonzero weights rounded to 0 (one large weight sets a scale too coarse for the rest), exponents outside [-7, 7], or
accumulators that would overflow at 8 fraction bits.
"""
from __future__ import annotations

import math

import numpy as np

from ebm_sim.deployment import Deployment
from ebm_sim.model.network import is_layered
from ebm_sim.network import Network

from .program import (ACCUMULATOR_BITS, DT_BITS, PAYLOAD_BITS, WEIGHT_EXP_RANGE, WEIGHT_MANTISSA_RANGE, LavaProgram)

RELAXATION_KEYS = ("dt", "steps", "tol")  # what of a relaxation the Lava graph takes
#: the integrators the Lava graph runs: it updates every layer at once from the previous states (synchronous Euler)
LAVA_METHODS = ("fixed_point", "euler")


def relaxation_of(deployment: Deployment) -> dict:
    """The Lava graph's {"dt", "steps", "tol"} for a network's ``Deployment``; ValueError for a method the graph does
    not run (alternating, rk45)."""
    if deployment.method not in LAVA_METHODS:
        raise ValueError(f"the network is deployed with {deployment.method!r}, but the Lava graph updates every layer "
                         f"at once (synchronous Euler: {', '.join(LAVA_METHODS)}); give dt, steps and tol "
                         f"(--dt 1 --steps N --tol T) to map it with the fixed-point iteration")
    return {"dt": deployment.step, "steps": int(deployment.max_steps), "tol": float(deployment.tol)}


def relaxation_with(deployment: Deployment, given: dict) -> dict:
    """The Lava graph's {"dt", "steps", "tol"}: those in ``given``, the rest from ``deployment`` (not consulted, so
    not checked, when ``given`` holds all three)."""
    given = {key: given[key] for key in RELAXATION_KEYS if key in given}
    return given if len(given) == len(RELAXATION_KEYS) else {**relaxation_of(deployment), **given}


DEPLOYED = relaxation_of(Deployment())  # the default deployment (fixed_point, 30 steps, tol 1e-4)
MAX_UNITS = 1_048_576          # neurons per Loihi 2 chip (Intel Loihi 2 brief, 2021: "up to 1 million")
MAX_SYNAPSES = 120_000_000     # synapses per Loihi 2 chip (same brief: "up to 120 million")
MAX_FRAC_BITS = 16             # state resolution 2^-16: far finer than the 8-bit weights, and tol 1e-4 is 6.6 units
MIN_FRAC_BITS = 8
MAX_WEIGHT_ERROR = 0.1
MAX_ZEROED = 0.5   # refuse a matrix most of whose nonzero weights round to 0 (trained networks here: 1-7 %)


def slope_shift(network: Network) -> int:
    """The activation's slope a as a right shift: a = 2^-shift (hard_sigmoid 0, hard_sigmoid_half 1)."""
    shift = -math.log2(network.slope)
    if shift != int(shift) or shift < 0:
        raise ValueError(f"activation {network.activation!r} has slope {network.slope}, not a power of two 2^-n: "
                         f"the fixed-point neuron applies it as a shift")
    return int(shift)


def check_mappable(network: Network) -> None:
    """Refuse a network the Lava graph cannot carry: a readout outside the dynamics, or over one chip's capacity
    (a ``LayeredNetwork``: :func:`hardware.layered_mapping.check_layered_mappable`)."""
    if is_layered(network):
        from .layered_mapping import check_layered_mappable
        return check_layered_mappable(network)
    if not isinstance(network, Network):
        raise ValueError(f"expected an ebm_sim Network, got {type(network).__name__}")
    if network.readout:
        raise ValueError("this network has a softmax readout (cross-entropy training), which lies outside the "
                         "dynamics; the Lava mapping carries MSE-trained networks whose output layer relaxes")
    slope_shift(network)
    sizes = network.layer_sizes
    check_chip_capacity('-'.join(map(str, sizes)), sum(sizes[1:]),
                        sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
                        + sum(a * b for a, b in zip(sizes[1:-1], sizes[2:])), "W_k and W_k^T")


def check_chip_capacity(name: str, units: int, synapses: int, synapse_note: str) -> None:
    """ValueError when a network (``name``) needs more neurons or synapses (counted as ``synapse_note`` says) than
    one Loihi 2 chip has: the limit of this mapping."""
    if units > MAX_UNITS:
        raise ValueError(f"{name} has {units:,} neurons, over the {MAX_UNITS:,} of one Loihi 2 chip (the limit of "
                         f"this mapping)")
    if synapses > MAX_SYNAPSES:
        raise ValueError(f"{name} needs {synapses:,} synapses ({synapse_note}), over the {MAX_SYNAPSES:,} of one "
                         f"Loihi 2 chip (the limit of this mapping)")


def _check_relaxation(dt: float, steps: int, tol: float) -> None:
    if not (isinstance(dt, (int, float)) and 0 < dt <= 1):
        raise ValueError(f"dt must lie in (0, 1] (dt = 1 is the fixed_point iteration), got {dt!r}")
    if not (isinstance(steps, (int, np.integer)) and not isinstance(steps, bool) and steps >= 1):
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")


def float_program(network: Network, dt: float = DEPLOYED["dt"], steps: int = DEPLOYED["steps"],
                  tol: float = DEPLOYED["tol"]) -> LavaProgram:
    """The network in float64 (Lava's ``floating_pt`` models): the same Euler dynamics as ``relax(..., "euler", dt)``
    (``"fixed_point"`` for dt = 1)."""
    check_mappable(network)
    _check_relaxation(dt, steps, tol)
    shift = slope_shift(network)
    return LavaProgram("float", tuple(network.layer_sizes), tuple(w.astype(np.float64) for w in network.weights),
                       tuple(b.astype(np.float64) for b in network.biases), (shift,) * network.num_layers,
                       float(dt), int(steps), float(tol), network_hash=network.content_hash())


def weight_scale_bits(w: np.ndarray) -> int:
    """p: the largest integer with max |W| 2^p <= 254 (the 8-bit mantissas' magnitude), 0 for an all-zero W."""
    largest = float(np.max(np.abs(w))) if w.size else 0.0
    if largest == 0.0:
        return 0
    return int(math.floor(math.log2(WEIGHT_MANTISSA_RANGE[1] / largest)))


def quantize_weights(w: np.ndarray, p: int) -> np.ndarray:
    """W_int = 2 round(W 2^p / 2), clipped to the 8-bit mixed-sign range: even int32 in [-256, 254]."""
    lo, hi = WEIGHT_MANTISSA_RANGE
    return np.clip(2 * np.rint(np.asarray(w, dtype=np.float64) * 2.0 ** p / 2), lo, hi).astype(np.int32)


def _relative_error(w: np.ndarray, w_int: np.ndarray, p: int) -> float:
    norm = float(np.linalg.norm(w))
    return 0.0 if norm == 0 else float(np.linalg.norm(w_int * 2.0 ** -p - w) / norm)


def _zeroed_fraction(w: np.ndarray, w_int: np.ndarray) -> float:
    """Share of the nonzero weights that quantize to 0."""
    nonzero = w != 0
    return float(np.count_nonzero(nonzero & (w_int == 0)) / max(np.count_nonzero(nonzero), 1))


def _dense_list(w_int, shift_in) -> list:
    """(name, matrix (n_target, n_source), target layer index 0..L-1, weight exponent) of every Dense."""
    forward = [(f"W{k}", w, k, shift_in[("f", k)]) for k, w in enumerate(w_int)]
    return forward + [(f"W{k}T", w_int[k].T, k - 1, shift_in[("b", k)]) for k in range(1, len(w_int))]


def abs_row_sums(matrix) -> np.ndarray:
    """sum_j |M_ij| (n_rows,) float64 of a numpy array or a scipy sparse matrix."""
    return np.asarray(abs(matrix.astype(np.float64)).sum(axis=1), dtype=np.float64).ravel()


def _largest_frac_bits(dense, extra, biases) -> tuple[int, str]:
    """The largest q for which no accumulator overflows, and which bound decides it (for the error message).

    Per Dense c: max_i sum_j |W_int|_ij 2^q < 2^31 (Lava's int32 accumulation); per layer k:
    max_i (sum_c rowsum_c,i 2^e_c + |b_i| 2^extra_k) 2^q < 2^23 (the 24-bit field)."""
    best, reason = PAYLOAD_BITS - 2, f"{PAYLOAD_BITS}-bit payloads (states up to 2^q)"
    field = [np.zeros(b.shape[0]) for b in biases]
    for name, matrix, target, e in dense:
        rowsum = abs_row_sums(matrix)
        if rowsum.max(initial=0) > 0:
            q = math.floor(math.log2(((1 << (ACCUMULATOR_BITS - 1)) - 1) / rowsum.max()))
            if q < best:
                best, reason = q, f"the int32 accumulator of Dense {name}"
        field[target] += rowsum * 2.0 ** e
    for k, b in enumerate(biases):
        bound = float(np.max(field[k] + np.abs(b) * 2.0 ** extra[k], initial=0))
        if bound > 0:
            q = math.floor(math.log2(((1 << (PAYLOAD_BITS - 1)) - 1) / bound))
            if q < best:
                best, reason = q, f"the {PAYLOAD_BITS}-bit field of layer {k + 1}"
    return best, reason


def check_fixed_options(max_weight_error, max_zeroed) -> None:
    """ValueError unless both quantization limits are positive numbers."""
    for name, value in (("max_weight_error", max_weight_error), ("max_zeroed", max_zeroed)):
        if not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"{name} must be positive, got {value!r}")


def quantize_all(weights: list, max_weight_error: float, max_zeroed: float) -> tuple:
    """(p_i, W_int_i, relative errors, zeroed fractions) of float64 arrays W_i (matrices or kernels): p_i from
    ``weight_scale_bits``, W_int_i = ``quantize_weights``; ValueError naming the first W_i whose relative error is
    above ``max_weight_error`` or more than ``max_zeroed`` of whose nonzero weights round to 0."""
    p = [weight_scale_bits(w) for w in weights]
    w_int = [quantize_weights(w, pk) for w, pk in zip(weights, p)]
    errors = [_relative_error(w, wi, pk) for w, wi, pk in zip(weights, w_int, p)]
    zeroed = [_zeroed_fraction(w, wi) for w, wi in zip(weights, w_int)]
    for k, (error, lost) in enumerate(zip(errors, zeroed)):
        if error > max_weight_error or lost > max_zeroed:
            w = weights[k]
            spread = float(np.abs(w).max() / max(np.sqrt(np.mean(w ** 2)), 1e-300))
            raise ValueError(f"W{k} does not quantize to 8-bit weights: relative error {error:.3f} (limit "
                             f"{max_weight_error:g}), {100 * lost:.0f}% of its nonzero weights round to 0 (limit "
                             f"{100 * max_zeroed:.0f}%); its largest |weight| is {spread:.0f}x its RMS")
    return p, w_int, errors, zeroed


def field_extra_bits(incoming: list, pinned: list | None = None) -> list:
    """extra_k = max(0, max_c p_c - 7) for the scales p_c of the connections into each layer k (``incoming[k - 1]``):
    the field of layer k is kept in units 2^-(q + extra_k), so every connection's weight exponent extra_k - p_c lies
    in Loihi's [-7, 7]; ``pinned[k - 1]``, when not None, sets extra_k instead (a process without a weight exponent
    needs extra_k = its p). ValueError naming the layer when the scales are too far apart for that."""
    extra = [max(0, max(ps) - WEIGHT_EXP_RANGE[1]) for ps in incoming]
    for k, value in enumerate(pinned or []):
        if value is not None:
            if value < 0:
                raise ValueError(f"the weights into layer {k + 1} need a weight exponent of 0 but are too large "
                                 f"for it (8-bit scale 2^-p with p = {value} < 0)")
            extra[k] = value
    lo, hi = WEIGHT_EXP_RANGE
    for k, ps in enumerate(incoming, start=1):
        exps = [extra[k - 1] - pk for pk in ps]
        if not all(lo <= e <= hi for e in exps):
            raise ValueError(f"the weights into layer {k} do not quantize: their 8-bit scales 2^-p (p = "
                             f"{', '.join(map(str, ps))}) need weight exponents {exps}, outside Loihi's [{lo}, {hi}] "
                             f"(weights far too large, or scales too different between the connections into it)")
    return extra


def choose_frac_bits(limit: int, reason: str, frac_bits: int | None) -> int:
    """q: ``frac_bits`` if given and in [1, limit], else min(MAX_FRAC_BITS, limit); ValueError when the default is
    below MIN_FRAC_BITS or the given one is out of range (``reason``: the bound that sets ``limit``)."""
    if frac_bits is None:
        q = min(MAX_FRAC_BITS, limit)
        if q < MIN_FRAC_BITS:
            raise ValueError(f"the fixed-point mapping needs at least {MIN_FRAC_BITS} state fraction bits, but "
                             f"{reason} allows only {limit}: the weights or fan-in are too large for 8-bit weights "
                             f"and {PAYLOAD_BITS}-bit states")
        return q
    if not (isinstance(frac_bits, (int, np.integer)) and 1 <= frac_bits <= limit):
        raise ValueError(f"frac_bits must be an integer in [1, {limit}] for this network ({reason} allows at "
                         f"most {limit}), got {frac_bits!r}")
    return int(frac_bits)


def fixed_program(network: Network, dt: float = DEPLOYED["dt"], steps: int = DEPLOYED["steps"],
                  tol: float = DEPLOYED["tol"], frac_bits: int | None = None,
                  max_weight_error: float = MAX_WEIGHT_ERROR, max_zeroed: float = MAX_ZEROED) -> LavaProgram:
    """The network in fixed point (Lava's ``fixed_pt`` models, bit-accurate Dense): see the module docstring.

    frac_bits: q, the state resolution 2^-q (default: the largest safe one, at most 16). dt is rounded to a 12-bit
    mantissa (dt = m / 4096; 1.0 and 0.5 are exact). Raises ValueError for weights that do not quantize."""
    check_mappable(network)
    _check_relaxation(dt, steps, tol)
    check_fixed_options(max_weight_error, max_zeroed)
    num = network.num_layers
    weights = [w.astype(np.float64) for w in network.weights]
    p, w_int, errors, zeroed = quantize_all(weights, max_weight_error, max_zeroed)
    # layer k (1-based) hears W_{k-1} (p[k-1]) and, below the output, W_k^T (p[k])
    extra = field_extra_bits([[p[k - 1]] + ([p[k]] if k < num else []) for k in range(1, num + 1)])
    shift_in = {("f", k): extra[k] - p[k] for k in range(num)}        # Dense W_k into layer k + 1: e = r - q - p
    shift_in.update({("b", k): extra[k - 1] - p[k] for k in range(1, num)})  # Dense W_k^T into layer k
    biases = [b.astype(np.float64) for b in network.biases]
    limit, reason = _largest_frac_bits(_dense_list(w_int, shift_in), extra, biases)
    q = choose_frac_bits(limit, reason, frac_bits)
    base = slope_shift(network)
    dt_mantissa = int(round(dt * (1 << DT_BITS)))
    b_int = [np.rint(b * 2.0 ** (q + extra[k])).astype(np.int32) for k, b in enumerate(biases)]
    notes = {"weight_relative_error": errors, "weights_rounded_to_zero": zeroed, "dt_requested": float(dt),
             "frac_bits_limit": int(limit), "frac_bits_limited_by": reason}
    return LavaProgram("fixed", tuple(network.layer_sizes), tuple(w_int), tuple(b_int),
                       tuple(base + e for e in extra), dt_mantissa / (1 << DT_BITS), int(steps), float(tol),
                       forward_exps=tuple(int(shift_in[("f", k)]) for k in range(num)),
                       backward_exps=tuple(int(shift_in[("b", k)]) for k in range(1, num)),
                       dt_mantissa=dt_mantissa, frac_bits=int(q), weight_bits=tuple(p),
                       field_bits=tuple(q + e for e in extra), network_hash=network.content_hash(), notes=notes)


def to_program(network: Network, kind: str = "float", deployment: Deployment | None = None,
               **options) -> LavaProgram:
    """``float_program`` or ``fixed_program`` by ``kind`` ("float" | "fixed"), or for a ``LayeredNetwork``
    ``hardware.layered_mapping.to_layered_program``; options: dt, steps, tol (and for
    fixed point frac_bits, max_weight_error, max_zeroed). deployment: the network's ``Deployment``, whose dt, steps
    and tol (``relaxation_with``) apply where options do not give them."""
    if deployment is not None:
        options = {**options, **relaxation_with(deployment, options)}
    if is_layered(network):
        from .layered_mapping import to_layered_program
        return to_layered_program(network, kind, **options)
    if kind == "float":
        return float_program(network, **options)
    if kind == "fixed":
        return fixed_program(network, **options)
    raise ValueError(f"kind must be 'float' or 'fixed', got {kind!r}")

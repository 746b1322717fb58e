"""Map a trained ``ebm_sim.model.LayeredNetwork`` (dense and convolutional layers) onto the Lava graph: a float
``LayeredProgram``, or a fixed-point one with the dense mapping's 8-bit weights and exponents
(:mod:`hardware.mapping`, whose quantization this module reuses; units in :mod:`hardware.program`).

    program = to_layered_program(network, "fixed", dt=1.0, steps=30, tol=1e-4)   # or mapping.to_program(...)

What maps: Dense, Conv2d without pooling or with 2x2 average pooling (folded into the kernel: a conv of kernel k + S
and stride 2 S, :func:`hardware.conv_ops.fold_avg_pool`), any stride and padding, Bias, and a squared-error or
softmax-readout cost (the readout is applied by the host to the relaxed output layer, as the simulator does after
its relaxation). A dense interaction becomes a Dense process and its transpose; a conv a Sparse process with the
convolution's matrix and a second Sparse with its transpose (the feedback conv_transpose, any stride), or with
``forward_process="conv"`` a ``lava.proc.conv.Conv`` forward (Lava's layout and kernel order, through virtual
reshape/transpose ports) and the same Sparse feedback. Lava's fixed-point Conv applies no weight exponent: its
post layer's field is then kept in units 2^-(q + p) of the conv's own scale p (fewer state fraction bits q).

Refused with ValueError naming the problem: max pooling (Lava has no pooling process, and max-unpooling routes the
feedback to the argmax of the current conv output, a state-dependent operator that no static weight holds: the
message names the alternatives), any other interaction or cost kind, an activation whose slope is not a power of
two, a network over one Loihi 2 chip's neurons or synapses, and (fixed point) weights that do not quantize.

Fixed point, per link i (matrix or pool-folded kernel): p_i and W_int as the dense mapping (``quantize_all``); the
field of layer k in units 2^-(q + extra_k) with extra_k = max(0, max p of the links into k - 7)
(``field_extra_bits``), weight exponents extra_post - p_i (forward) and extra_pre - p_i (feedback); q the largest
(at most 16) for which no int32 accumulator or 24-bit field overflows (``_largest_frac_bits``), the normalized
input counted at its largest magnitude max_c max(|mean_c|, |1 - mean_c|) / std_c.
"""
from __future__ import annotations

import math

import numpy as np

from ebm_sim.model.network import LayeredNetwork

from .conv_ops import conv_output_size, fold_avg_pool
from .layered_program import LayeredProgram, link_matrix
from .mapping import (DEPLOYED, MAX_WEIGHT_ERROR, MAX_ZEROED, _check_relaxation, check_chip_capacity,
                      _largest_frac_bits, check_fixed_options, choose_frac_bits, field_extra_bits, quantize_all,
                      slope_shift)
from .program import DT_BITS, PAYLOAD_BITS

MAPPABLE_INTERACTIONS = ("dense", "conv2d", "bias")
#: how a conv's forward direction runs: a Sparse process with its matrix, or lava.proc.conv.Conv (the feedback is
#: always a Sparse with the transposed matrix: Lava has no transposed convolution)
FORWARD_PROCESSES = ("sparse", "conv")
MAPPABLE_COSTS = ("squared_error", "softmax_readout")


def lava_presets() -> list:
    """Names of the convolutional presets (ebm_sim.model.presets) without max pooling: the ones this maps."""
    from ebm_sim.model.presets import PRESETS

    return sorted(name for name, preset in PRESETS.items() if "maxpool" not in preset.arch)


def check_layered_mappable(network: LayeredNetwork) -> None:
    """Refuse (ValueError naming it) what the Lava graph cannot carry: max pooling (naming the alternatives), an
    interaction or cost it has no process for, a slope that is not 2^-n, more than one chip's neurons or synapses."""
    if not isinstance(network, LayeredNetwork):
        raise ValueError(f"expected an ebm_sim LayeredNetwork, got {type(network).__name__}")
    for i in network.interactions:
        if i.kind not in MAPPABLE_INTERACTIONS:
            raise ValueError(f"{i.describe()} has no Lava mapping: the mappable interactions are "
                             f"{', '.join(MAPPABLE_INTERACTIONS)}")
        if i.kind == "conv2d" and i.pool == "max":
            raise ValueError(
                f"{i.describe()} uses 2x2 max pooling, which the Lava graph cannot carry: Lava 0.10 has no pooling "
                "process, and max-unpooling sends the feedback to the argmax of the current conv output, a "
                "state-dependent operator that no static Conv or Sparse weight holds. Use average pooling "
                "('avgpool' in the spec: folded into the conv weights) or a strided convolution (e.g. 'k3 s2 p1') "
                f"instead; presets built that way: {', '.join(lava_presets()) or 'none'}")
    if network.cost.kind not in MAPPABLE_COSTS:
        raise ValueError(f"the {network.cost.kind!r} cost has no Lava mapping (mappable: {', '.join(MAPPABLE_COSTS)})")
    slope_shift(network)
    shapes = network.layer_shapes
    check_chip_capacity(repr(network), sum(int(np.prod(s)) for s in shapes[1:]),
                        sum(_link_synapses(link, shapes) * (2 if link["pre"] >= 1 else 1)
                            for link, _ in _links(network)), "forward and feedback")


def _link_synapses(link: dict, shapes: tuple) -> int:
    """Upper bound on one direction's synapses: n_pre n_post (dense), C_out Ho Wo C_in k^2 (conv, padding taps
    included)."""
    pre, post = shapes[link["pre"]], shapes[link["post"]]
    if link["kind"] == "dense":
        return int(np.prod(pre)) * int(np.prod(post))
    return int(np.prod(post)) * pre[0] * link["kernel"] ** 2


def _links(network: LayeredNetwork) -> list:
    """(link, float64 weights) per binary interaction, in order: a dense matrix, or the conv kernel with average
    pooling folded in (then stride 2 S and kernel k + S)."""
    out = []
    for i in network.interactions:
        if i.unary:
            continue
        w = np.asarray(i.params["weight"], dtype=np.float64)
        if i.kind == "dense":
            out.append(({"kind": "dense", "pre": i.pre, "post": i.post}, w))
            continue
        stride = i.stride
        if i.pool == "avg":
            w, stride = fold_avg_pool(w, i.stride), 2 * i.stride
        link = {"kind": "conv", "pre": i.pre, "post": i.post, "kernel": int(w.shape[2]), "stride": int(stride),
                "padding": int(i.padding)}
        _check_folded_shape(link, network.layer_shapes)
        out.append((link, w))
    return out


def _check_folded_shape(link: dict, shapes: tuple) -> None:
    """The (folded) conv must give the post layer's shape (it does for every shape Conv2d accepts)."""
    _, height, width = shapes[link["pre"]]
    size = tuple(conv_output_size(n, link["kernel"], link["stride"], link["padding"]) for n in (height, width))
    if (shapes[link["post"]][0],) + size != tuple(shapes[link["post"]]):
        raise ValueError(f"the folded conv {link} gives {size}, not layer {link['post']}'s {shapes[link['post']]}")


def _layer_biases(network: LayeredNetwork) -> list:
    """b_k (n_k,) float64 per layer that relaxes: the sum of its Bias interactions, broadcast over H and W."""
    biases = [np.zeros(int(np.prod(s))) for s in network.state_shapes]
    for i in network.interactions:
        if i.unary:
            shape = network.layer_shapes[i.post]
            b = np.asarray(i.params["bias"], dtype=np.float64)
            biases[i.post - 1] = biases[i.post - 1] + (np.repeat(b, shape[1] * shape[2]) if len(shape) == 3 else b)
    return biases


def _readout(network: LayeredNetwork) -> tuple:
    if network.cost.kind != "softmax_readout":
        return ()
    return tuple(np.asarray(network.cost.params[k], dtype=np.float64) for k in ("weight", "bias"))


def _common(network: LayeredNetwork) -> dict:
    """The fields that float and fixed programs share."""
    shapes = network.layer_shapes
    return {"layer_sizes": tuple(int(np.prod(s)) for s in shapes), "layer_shapes": shapes,
            "readout": _readout(network), "normalization": network.normalization,
            "network_hash": network.content_hash()}


def _check_forward_process(forward_process: str) -> None:
    if forward_process not in FORWARD_PROCESSES:
        raise ValueError(f"forward_process must be one of {', '.join(FORWARD_PROCESSES)}, got {forward_process!r}")


def float_layered_program(network: LayeredNetwork, dt: float = DEPLOYED["dt"], steps: int = DEPLOYED["steps"],
                          tol: float = DEPLOYED["tol"], forward_process: str = "sparse") -> LayeredProgram:
    """The network in float64 (Lava's ``floating_pt`` models): the Euler dynamics of
    ``ebm_sim.model.dynamics.relax(..., "euler", dt)`` (``"fixed_point"`` for dt = 1). forward_process: "sparse"
    or "conv" (module docstring)."""
    check_layered_mappable(network)
    _check_relaxation(dt, steps, tol)
    _check_forward_process(forward_process)
    links = _links(network)
    shift = slope_shift(network)
    return LayeredProgram("float", weights=tuple(w for _, w in links), biases=tuple(_layer_biases(network)),
                          shifts=(shift,) * network.num_layers, dt=float(dt), steps=int(steps), tol=float(tol),
                          forward_exps=(0,) * len(links), backward_exps=(0,) * len(links),
                          links=tuple(link for link, _ in links), conv_process=forward_process == "conv",
                          **_common(network))


def fixed_layered_program(network: LayeredNetwork, dt: float = DEPLOYED["dt"], steps: int = DEPLOYED["steps"],
                          tol: float = DEPLOYED["tol"], frac_bits: int | None = None,
                          max_weight_error: float = MAX_WEIGHT_ERROR, max_zeroed: float = MAX_ZEROED,
                          forward_process: str = "sparse") -> LayeredProgram:
    """The network in fixed point (Lava's bit-accurate ``fixed_pt`` Dense, Sparse and Conv): see the module
    docstring. Options as :func:`hardware.mapping.fixed_program`; forward_process "conv" pins the field units of a
    conv's post layer to the conv's scale (Lava's fixed-point Conv applies no weight exponent)."""
    check_layered_mappable(network)
    _check_relaxation(dt, steps, tol)
    check_fixed_options(max_weight_error, max_zeroed)
    _check_forward_process(forward_process)
    links = _links(network)
    p, w_int, errors, zeroed = quantize_all([w for _, w in links], max_weight_error, max_zeroed)
    incoming = [[] for _ in network.state_shapes]
    for (link, _), pi in zip(links, p):
        incoming[link["post"] - 1].append(pi)
        if link["pre"] >= 1:
            incoming[link["pre"] - 1].append(pi)
    pinned = _pinned_scales(links, p, network.num_layers) if forward_process == "conv" else None
    extra = field_extra_bits(incoming, pinned)  # every layer hears at least the link into it
    forward = [extra[link["post"] - 1] - pi for (link, _), pi in zip(links, p)]
    backward = [extra[link["pre"] - 1] - pi if link["pre"] >= 1 else 0 for (link, _), pi in zip(links, p)]
    biases = _layer_biases(network)
    limit, reason = _frac_bits_limit(network, links, w_int, forward, backward, extra, biases)
    q = choose_frac_bits(limit, reason, frac_bits)
    dt_mantissa = int(round(dt * (1 << DT_BITS)))
    base = slope_shift(network)
    notes = {"weight_relative_error": errors, "weights_rounded_to_zero": zeroed, "dt_requested": float(dt),
             "frac_bits_limit": int(limit), "frac_bits_limited_by": reason}
    return LayeredProgram(
        "fixed", weights=tuple(w_int), biases=tuple(np.rint(b * 2.0 ** (q + e)).astype(np.int32)
                                                    for b, e in zip(biases, extra)),
        shifts=tuple(base + e for e in extra), dt=dt_mantissa / (1 << DT_BITS), steps=int(steps), tol=float(tol),
        forward_exps=tuple(int(e) for e in forward), backward_exps=tuple(int(e) for e in backward),
        dt_mantissa=dt_mantissa, frac_bits=int(q), weight_bits=tuple(int(v) for v in p),
        field_bits=tuple(q + e for e in extra), links=tuple(link for link, _ in links), notes=notes,
        conv_process=forward_process == "conv", **_common(network))


def _pinned_scales(links: list, p: list, num_layers: int) -> list:
    """Per layer, the scale p of the conv link into it (None without one): a Conv process has no weight exponent,
    so its post layer's field units must be 2^-(q + p). ValueError for two convs of different scales into a layer."""
    pinned = [None] * num_layers
    for i, ((link, _), pi) in enumerate(zip(links, p)):
        if link["kind"] != "conv":
            continue
        k = link["post"] - 1
        if pinned[k] is not None and pinned[k] != pi:
            raise ValueError(f"layer {k + 1} hears two convolutions with different 8-bit scales (p = {pinned[k]} and "
                             f"{pi}): Lava's Conv has no weight exponent to reconcile them; map with "
                             f"forward_process='sparse'")
        pinned[k] = pi
    return pinned


def _frac_bits_limit(network, links, w_int, forward, backward, extra, biases) -> tuple[int, str]:
    """The largest safe q and the bound that sets it: the dense mapping's accumulator and field bounds over every
    Dense/Sparse (a link from the input scaled by the input's largest |s_0|), and the normalized input's payload."""
    shapes = network.layer_shapes
    bound = _input_bound(network)
    processes = []
    for i, ((link, _), w) in enumerate(zip(links, w_int)):
        matrix = link_matrix(link, w, shapes[link["pre"]])
        scale = bound if link["pre"] == 0 else 1.0
        processes.append((f"W{i}", matrix * scale, link["post"] - 1, forward[i]))
        if link["pre"] >= 1:
            processes.append((f"W{i}T", matrix.T, link["pre"] - 1, backward[i]))
    limit, reason = _largest_frac_bits(processes, extra, biases)
    if bound > 1:
        q = math.floor(math.log2(((1 << (PAYLOAD_BITS - 1)) - 1) / bound))
        if q < limit:
            limit, reason = q, f"the {PAYLOAD_BITS}-bit payloads of the normalized input (|s_0| up to {bound:.3g})"
    return limit, reason


def _input_bound(network: LayeredNetwork) -> float:
    """max |s_0| for images in [0, 1]: max_c max(|mean_c|, |1 - mean_c|) / std_c, or 1."""
    if network.normalization is None:
        return 1.0
    mean, std = (np.asarray(network.normalization[k], dtype=np.float64) for k in ("mean", "std"))
    return float(np.max(np.maximum(np.abs(mean), np.abs(1 - mean)) / std))


def to_layered_program(network: LayeredNetwork, kind: str = "float", **options) -> LayeredProgram:
    """``float_layered_program`` or ``fixed_layered_program`` by ``kind`` ("float" | "fixed")."""
    if kind == "float":
        return float_layered_program(network, **options)
    if kind == "fixed":
        return fixed_layered_program(network, **options)
    raise ValueError(f"kind must be 'float' or 'fixed', got {kind!r}")

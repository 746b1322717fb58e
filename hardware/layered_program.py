"""A layered (convolutional) network as the Lava graph runs it: ``LayeredProgram``, a ``LavaProgram`` whose
connections are any interactions between layers, not only a chain of dense matrices (numpy and scipy only).

Layers 0..L are flat in the graph (a (C, H, W) layer in C order, see :mod:`hardware.conv_ops`). Every binary
interaction i (pre -> post) of the network becomes

    "W{i}"   pre -> post: a Dense process with the matrix W (dense interaction), or a Sparse process with the matrix M
             of the convolution (conv interaction; 2x2 average pooling folded into the kernel), or with
             ``conv_process`` a ``lava.proc.conv.Conv`` that computes the same M s (``lava_conv``)
    "W{i}T"  post -> pre (only when pre is a layer that relaxes): the transpose, W^T or M^T (Sparse for a conv: the
             transposed convolution of any stride)

and every layer runs the same update as the dense program (:mod:`hardware.program`): u = (a_in + b) 2^-shift,
s <- clip(s + dt (u - s), 0, 1), in float or in the same fixed-point units. So :func:`hardware.program.simulate`,
:func:`hardware.lava_run.run_lava` and :mod:`hardware.cost_model` run it unchanged. What differs from a dense
program: per-interaction weight exponents (``forward_exps[i]``, ``backward_exps[i]``, the latter 0 and unused for an
interaction from the clamped input), biases broadcast per channel (stored flat, one value per unit), the clamped
input normalized as the network does (s_0 = (x - mean) / std per channel, signed in fixed point), and a softmax
readout outside the dynamics, applied by the host to the relaxed output layer (``scores``).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from .conv_ops import conv_matrix
from .program import (DT_BITS, KINDS, PAYLOAD_BITS, WEIGHT_EXP_RANGE, WEIGHT_MANTISSA_RANGE, Connection,
                      LavaProgram, check_images)

LINK_KINDS = ("dense", "conv")


@dataclass(frozen=True, eq=False)
class LayeredProgram(LavaProgram):
    """A ``LavaProgram`` (fields as there) for a layered network; ``layer_sizes`` are the flat sizes n_k.

    layer_shapes: (n,) or (C, H, W) per layer; links: one dict per binary interaction i, {"kind": "dense" | "conv",
    "pre", "post"} and for a conv {"stride", "padding"} of the (pool-folded) convolution; weights[i]: its matrix
    (n_post, n_pre) or kernel (C_out, C_in, k, k), float64 or int32 mantissas; weight_bits[i]: p_i (fixed point);
    readout: () or (W_r (classes, n_L), b_r (classes,)) float64, applied by the host; normalization: None or
    {"mean", "std"} per input channel; conv_process: the forward direction of every conv link runs as
    ``lava.proc.conv.Conv`` (``lava_conv``) instead of a Sparse (same arithmetic: the simulator does not change; in
    fixed point its weight exponent is 0)."""

    layer_shapes: tuple = ()
    links: tuple = ()
    readout: tuple = ()
    normalization: dict | None = None
    conv_process: bool = False

    def __post_init__(self):
        _check_layered(self)
        object.__setattr__(self, "_connections", self._build_connections())

    def _build_connections(self) -> list:
        """The Dense/Sparse processes: forward ones W{i} first, then the feedback ones W{i}T (module docstring)."""
        forward, backward = [], []
        for i, (link, w) in enumerate(zip(self.links, self.weights)):
            matrix = link_matrix(link, w, self.layer_shapes[link["pre"]])
            forward.append(Connection(f"W{i}", link["pre"], link["post"], matrix, int(self.forward_exps[i])))
            if link["pre"] >= 1:
                transposed = matrix.T.tocsr() if link["kind"] == "conv" else np.ascontiguousarray(matrix.T)
                backward.append(Connection(f"W{i}T", link["post"], link["pre"], transposed,
                                           int(self.backward_exps[i])))
        return forward + backward

    def connections(self) -> list:
        return list(self._connections)

    def lava_conv(self, name: str) -> dict | None:
        """For a forward conv connection "W{i}" of a program with ``conv_process``: the arguments of
        ``lava.proc.conv.Conv`` in Lava's order, input (X, Y, C) = (W, H, C) and a true convolution with kernel
        (C_out, kx, ky, C_in): K_lava[o, a, b, c] = K[o, c, k - 1 - b, k - 1 - a]; plus the layers' (C, H, W)
        shapes (the graph reshapes and transposes the flat ports). None for every other connection."""
        if not self.conv_process or name.endswith("T"):
            return None
        link = self.links[int(name[1:])]
        if link["kind"] != "conv":
            return None
        kernel = np.asarray(self.weights[int(name[1:])])
        pre, post = self.layer_shapes[link["pre"]], self.layer_shapes[link["post"]]
        return {"weight": np.ascontiguousarray(kernel.transpose(0, 3, 2, 1)[:, ::-1, ::-1, :]),
                "input_shape": tuple(pre[::-1]), "stride": link["stride"], "padding": link["padding"],
                "pre_shape": tuple(pre), "post_shape": tuple(post)}

    def encode_inputs(self, x) -> np.ndarray:
        """Images (N, *input_shape) or (N, n_0) in [0, 1] -> s_0 = (x - mean) / std (per channel), then float64 or
        round(s_0 2^q) as int32 (signed)."""
        x = np.asarray(x)
        if x.ndim >= 2 and x.shape[1:] == tuple(self.layer_shapes[0]):
            x = x.reshape(x.shape[0], -1)
        images = check_images(x, self.layer_sizes[0])
        s0 = self.normalize(images)
        return s0 if self.kind == "float" else np.rint(s0 * self.full_scale).astype(np.int32)

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """(N, n_0) images -> the clamped layer s_0, (x - mean_c) / std_c on the units of channel c."""
        if self.normalization is None:
            return np.asarray(x, dtype=np.float64)
        units = self.layer_sizes[0] // len(self.normalization["mean"])
        mean = np.repeat(np.asarray(self.normalization["mean"], dtype=np.float64), units)
        std = np.repeat(np.asarray(self.normalization["std"], dtype=np.float64), units)
        return (np.asarray(x, dtype=np.float64) - mean) / std

    def scores(self, output_states) -> np.ndarray:
        """The prediction scores of relaxed output states (N, n_L) in [0, 1]: the readout's logits W_r s_L + b_r,
        or s_L itself without a readout."""
        s = np.asarray(output_states, dtype=np.float64)
        return s if not self.readout else s @ self.readout[0].T + self.readout[1]

    def predictions(self, output_states) -> np.ndarray:
        """argmax of ``scores`` (N,) of output states decoded to [0, 1] (``decode_states``)."""
        return np.argmax(self.scores(output_states), axis=1)

    def dequantized_weights(self) -> list:
        """The weights (matrices and pool-folded kernels) as real numbers: float, or W_int 2^-p_i."""
        if self.kind == "float":
            return [np.asarray(w, dtype=np.float64) for w in self.weights]
        return [w.astype(np.float64) * 2.0 ** -p for w, p in zip(self.weights, self.weight_bits)]

    def describe(self) -> dict:
        """The scalar parameters and the topology as plain JSON values."""
        return {"kind": self.kind, "layer_shapes": [list(s) for s in self.layer_shapes],
                "shifts": [int(s) for s in self.shifts], "dt": float(self.dt), "steps": int(self.steps),
                "tol": float(self.tol), "dt_mantissa": int(self.dt_mantissa), "frac_bits": int(self.frac_bits),
                "weight_bits": [int(p) for p in self.weight_bits], "field_bits": [int(r) for r in self.field_bits],
                "network_hash": self.network_hash, "links": [dict(link) for link in self.links],
                "normalization": self.normalization, "readout": bool(self.readout),
                "topology": [{"name": c.name, "source": c.source, "target": c.target, "weight_exp": c.exp,
                              "process": self.process_of(c)} for c in self._connections]}

    def process_of(self, connection: Connection) -> str:
        """The Lava process that carries a connection: "Dense", "Sparse" or "Conv"."""
        if self.lava_conv(connection.name) is not None:
            return "Conv"
        return "Dense" if isinstance(connection.weights, np.ndarray) else "Sparse"

    def content_hash(self) -> str:
        """SHA-256 over ``describe()`` and every array (weights, biases, readout)."""
        h = hashlib.sha256()
        h.update(json.dumps(self.describe(), sort_keys=True).encode())
        for array in (*self.weights, *self.biases, *self.readout):
            h.update(np.ascontiguousarray(array).tobytes())
        return h.hexdigest()


def link_matrix(link: dict, weights: np.ndarray, pre_shape: tuple):
    """The forward operator of a link as its process holds it: the dense matrix itself, or the CSR matrix of the
    convolution (``conv_matrix``) for a conv link."""
    if link["kind"] == "conv":
        return conv_matrix(weights, pre_shape, link["stride"], link["padding"])
    return np.asarray(weights)


def _check_layered(p: LayeredProgram) -> None:
    """Refuse (ValueError naming the field) a layered program the processes cannot run."""
    if p.kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {p.kind!r}")
    shapes = tuple(tuple(int(n) for n in s) for s in p.layer_shapes)
    sizes = tuple(int(np.prod(s)) for s in shapes)
    if len(shapes) < 2 or tuple(p.layer_sizes) != sizes:
        raise ValueError(f"layer_sizes {p.layer_sizes} must be the flat sizes of layer_shapes {p.layer_shapes}")
    num, count = len(sizes) - 1, len(p.links)
    if not (len(p.weights) == len(p.forward_exps) == len(p.backward_exps) == count):
        raise ValueError(f"{count} links need {count} weights, forward_exps and backward_exps")
    if len(p.biases) != num or len(p.shifts) != num:
        raise ValueError(f"{num} layers need {num} biases and shifts")
    fixed = p.kind == "fixed"
    for i, (link, w) in enumerate(zip(p.links, p.weights)):
        if link.get("kind") not in LINK_KINDS or not 0 <= link.get("pre", -1) < link.get("post", -1) <= num:
            raise ValueError(f"link {i} must be a {' or '.join(LINK_KINDS)} link with 0 <= pre < post <= {num}, "
                             f"got {link}")
        w = np.asarray(w)
        if link["kind"] == "dense" and w.shape != (sizes[link["post"]], sizes[link["pre"]]):
            raise ValueError(f"W{i} must have shape {(sizes[link['post']], sizes[link['pre']])}, got {w.shape}")
        if fixed:
            lo, hi = WEIGHT_MANTISSA_RANGE
            if w.dtype != np.int32 or (w.size and (w.min() < lo or w.max() > hi or np.any(w % 2))):
                raise ValueError(f"W{i}: 8-bit mixed-sign weight mantissas must be even int32 in [{lo}, {hi}]")
        elif w.dtype != np.float64 or not np.all(np.isfinite(w)):
            raise ValueError(f"a float program holds finite float64 weights (W{i}: {w.dtype})")
    for k, b in enumerate(p.biases):
        if np.shape(b) != (sizes[k + 1],) or np.asarray(b).dtype != (np.int32 if fixed else np.float64):
            raise ValueError(f"b{k + 1} must be {'int32' if fixed else 'float64'} of shape {(sizes[k + 1],)}")
    if not (isinstance(p.steps, (int, np.integer)) and p.steps >= 1) or not (0 < p.dt <= 1):
        raise ValueError(f"steps must be an integer >= 1 and dt in (0, 1], got {p.steps!r} and {p.dt!r}")
    if fixed and p.conv_process and any(e != 0 for link, e in zip(p.links, p.forward_exps) if link["kind"] == "conv"):
        raise ValueError(f"Lava's fixed-point Conv applies no weight exponent: the forward exponents of conv links "
                         f"must be 0, got {p.forward_exps}")
    if fixed:
        lo, hi = WEIGHT_EXP_RANGE
        if any(not lo <= int(e) <= hi for e in (*p.forward_exps, *p.backward_exps)):
            raise ValueError(f"weight exponents must lie in [{lo}, {hi}], got {p.forward_exps} / {p.backward_exps}")
        if not 1 <= p.dt_mantissa <= 1 << DT_BITS or p.dt != p.dt_mantissa / (1 << DT_BITS):
            raise ValueError(f"dt_mantissa must lie in [1, {1 << DT_BITS}] and dt equal dt_mantissa / {1 << DT_BITS}")
        if not 1 <= p.frac_bits <= PAYLOAD_BITS - 2:
            raise ValueError(f"frac_bits must lie in [1, {PAYLOAD_BITS - 2}], got {p.frac_bits}")

"""Lava Processes: a clamped input source and a layer of hard-sigmoid rate ("graded") units.

Both keep a sample clock of P = T + 1 Lava steps per sample (see models.py): step 0 of a sample resets the layer
(and absorbs Dense's one-step delay), steps 1..T are the T Euler steps. No side effects at import (Lava executes
this file to find ProcessModels).
"""
from __future__ import annotations

import numpy as np
from lava.magma.core.process.ports.ports import InPort, OutPort
from lava.magma.core.process.process import AbstractProcess
from lava.magma.core.process.variable import Var

MASK_BITS = 31  # quiet-step flags per record word (exact through Lava's float64 Var transfer)


def mask_words(steps: int) -> int:
    """Record words needed for one flag per Euler step."""
    return -(-steps // MASK_BITS)


class ClampedInput(AbstractProcess):
    """Sends sample i's input (n_0,) on every Lava step of sample i (P steps each).

    inputs: (N, n_0) array (float, or integers in units of 2^-frac_bits for the fixed-point model).
    """

    def __init__(self, *, inputs: np.ndarray, steps_per_sample: int, name: str | None = None) -> None:
        inputs = np.asarray(inputs)
        super().__init__(steps_per_sample=int(steps_per_sample), name=name)
        self.s_out = OutPort(shape=(inputs.shape[1],))
        self.inputs = Var(shape=inputs.shape, init=inputs)


class HardSigmoidLayer(AbstractProcess):
    """n rate units with the synchronous Euler dynamics of the EBM: u = (a_in + bias) 2^-shift,
    s <- clip(s + dt (u - s), 0, full_scale).

    a_in (n,): the summed Dense inputs W_{k-1} s_{k-1} + W_k^T s_{k+1}; s_out (n,): the state, sent every step as a
    graded payload. Float: full_scale 1.0, dt a float. Fixed point: integers, u = (a_in + bias) >> shift,
    s += ((u - s) dt) >> 12 with dt a 12-bit mantissa, full_scale 2^frac_bits. Records, for each of
    ``record_samples`` samples (a ring: sample i goes to row i % record_samples): ``final`` (n,) the state after T
    steps, ``quiet`` bit (t - 1) % 31 of word (t - 1) // 31 set when max |s_t - s_{t-1}| < quiet_below at step t,
    and with ``record_trajectory`` the state after every step (T + 1, n).
    """

    def __init__(self, *, shape: tuple, bias: np.ndarray, dt, shift: int, full_scale, quiet_below: float,
                 steps: int, record_samples: int, record_trajectory: bool = False,
                 name: str | None = None) -> None:
        n = int(shape[0])
        super().__init__(steps=int(steps), record_samples=int(record_samples),
                         record_trajectory=bool(record_trajectory), name=name)
        self.a_in = InPort(shape=(n,))
        self.s_out = OutPort(shape=(n,))
        self.s = Var(shape=(n,), init=0)
        self.bias = Var(shape=(n,), init=np.asarray(bias))
        self.dt = Var(shape=(1,), init=dt)
        self.shift = Var(shape=(1,), init=int(shift))
        self.full_scale = Var(shape=(1,), init=full_scale)
        self.quiet_below = Var(shape=(1,), init=float(quiet_below))
        self.final = Var(shape=(record_samples, n), init=0)
        self.quiet = Var(shape=(record_samples, mask_words(steps)), init=0)
        frames = (record_samples, steps + 1, n) if record_trajectory else (1, 1, 1)
        self.trajectory = Var(shape=frames, init=0)

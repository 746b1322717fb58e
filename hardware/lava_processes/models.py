"""ProcessModels of the EBM Processes: ``floating_pt`` (float64) and ``fixed_pt`` (integers as Loihi 2 carries them).

Sample clock: Lava step t (1-based) belongs to sample (t - 1) // P at local step j = (t - 1) % P, P = T + 1.
  j = 0    reset: the layer sets s = 0 and ignores a_in (which carries the previous sample's Dense outputs);
           the input source already sends the new sample, so Dense's one-step delay is absorbed here
  j >= 1   Euler step j: a_in = W s(j - 1) (Dense sends last step's product), s(j) = clip(s + dt (a h - s), 0, S)
Fixed point: u = (a_in + bias) >> shift, s += ((u - s) * dt) >> 12 (12-bit dt), clip to [0, 2^frac_bits]; payloads
are the integer states (at most 24 bits). Written out here on purpose rather than shared with hardware.program, so
that the tests hold these models against that independent numpy simulator.
"""
from __future__ import annotations

import numpy as np
from lava.magma.core.decorator import implements, requires, tag
from lava.magma.core.model.py.model import PyLoihiProcessModel
from lava.magma.core.model.py.ports import PyInPort, PyOutPort
from lava.magma.core.model.py.type import LavaPyType
from lava.magma.core.resources import CPU
from lava.magma.core.sync.protocols.loihi_protocol import LoihiProtocol

from hardware.lava_processes.process import MASK_BITS, ClampedInput, HardSigmoidLayer


class _ClampedInputModel(PyLoihiProcessModel):
    def run_spk(self) -> None:
        sample = (self.time_step - 1) // self.proc_params["steps_per_sample"]
        self.s_out.send(self.inputs[sample % self.inputs.shape[0]])


@implements(proc=ClampedInput, protocol=LoihiProtocol)
@requires(CPU)
@tag("floating_pt")
class PyClampedInputFloat(_ClampedInputModel):
    s_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, float)
    inputs: np.ndarray = LavaPyType(np.ndarray, float)


@implements(proc=ClampedInput, protocol=LoihiProtocol)
@requires(CPU)
@tag("fixed_pt")
class PyClampedInputFixed(_ClampedInputModel):
    s_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, np.int32, precision=24)
    inputs: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=24)


class _HardSigmoidModel(PyLoihiProcessModel):
    """The sample clock and the records, shared by both models; ``_step`` (one Euler step) differs."""

    def run_spk(self) -> None:
        steps = self.proc_params["steps"]
        local = (self.time_step - 1) % (steps + 1)
        row = ((self.time_step - 1) // (steps + 1)) % self.proc_params["record_samples"]
        a_in = self.a_in.recv()
        if local == 0:
            self.s[:] = 0
            self.quiet[row] = 0
        else:
            new = self._step(a_in)
            if np.max(np.abs(new - self.s), initial=0) < self.quiet_below[0]:
                self.quiet[row, (local - 1) // MASK_BITS] += 1 << ((local - 1) % MASK_BITS)
            self.s[:] = new
            if local == steps:
                self.final[row] = new
        if self.proc_params["record_trajectory"]:
            self.trajectory[row, local] = self.s
        self.s_out.send(self.s)


@implements(proc=HardSigmoidLayer, protocol=LoihiProtocol)
@requires(CPU)
@tag("floating_pt")
class PyHardSigmoidFloat(_HardSigmoidModel):
    a_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, float)
    s_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, float)
    s: np.ndarray = LavaPyType(np.ndarray, float)
    bias: np.ndarray = LavaPyType(np.ndarray, float)
    dt: np.ndarray = LavaPyType(np.ndarray, float)
    shift: np.ndarray = LavaPyType(np.ndarray, int)
    full_scale: np.ndarray = LavaPyType(np.ndarray, float)
    quiet_below: np.ndarray = LavaPyType(np.ndarray, float)
    final: np.ndarray = LavaPyType(np.ndarray, float)
    quiet: np.ndarray = LavaPyType(np.ndarray, np.int64)
    trajectory: np.ndarray = LavaPyType(np.ndarray, float)

    def _step(self, a_in: np.ndarray) -> np.ndarray:
        target = (a_in + self.bias) * 2.0 ** -int(self.shift[0])
        return np.clip(self.s + self.dt[0] * (target - self.s), 0.0, self.full_scale[0])


@implements(proc=HardSigmoidLayer, protocol=LoihiProtocol)
@requires(CPU)
@tag("fixed_pt")
class PyHardSigmoidFixed(_HardSigmoidModel):
    a_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, np.int32, precision=24)
    s_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, np.int32, precision=24)
    s: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=24)
    bias: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=24)
    dt: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=13)
    shift: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=5)
    full_scale: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=24)
    quiet_below: np.ndarray = LavaPyType(np.ndarray, float)
    final: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=24)
    quiet: np.ndarray = LavaPyType(np.ndarray, np.int64)
    trajectory: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=24)

    def _step(self, a_in: np.ndarray) -> np.ndarray:
        s = self.s.astype(np.int64)
        target = (a_in.astype(np.int64) + self.bias) >> int(self.shift[0])
        new = s + (((target - s) * int(self.dt[0])) >> 12)
        return np.clip(new, 0, int(self.full_scale[0])).astype(np.int32)

"""The optimizers of EP training, each parameter's update one fused Numba loop (no temporaries).

    SGD   v <- momentum v + g + weight_decay theta,   theta <- theta - scale lr v           (PyTorch's SGD)
    Adam  g' = g + weight_decay theta,  m <- b1 m + (1 - b1) g',  v <- b2 v + (1 - b2) g'^2,
          theta <- theta - scale lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)         (PyTorch's Adam)

The state (velocity; first and second moments) has the parameter's dtype, as in PyTorch (float32 for the toolkit's
default networks); a checkpoint written before (float64 moments) resumes in float64, exactly as it was saved. Each
update is one vectorized pass over the flat parameter (0.08 ms for the 0.4 M parameters of a 784-512-10 network,
measured; the numpy float64 code it replaces took about 3 ms, 18 % of a dense EP epoch).
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def _sgd_update(p, g, v, step, momentum, weight_decay):
    """In place on the flat arrays p, v (the parameter's dtype) from g: the SGD formula of the module docstring,
    step = scale lr; the scalars in the parameter's dtype (``_scalars``), so that the loop vectorizes."""
    for j in range(p.size):
        update = momentum * v[j] + g[j] + weight_decay * p[j]
        v[j] = update
        p[j] -= step * update


@njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def _adam_update(p, g, m, v, step, beta1, beta2, complement1, complement2, eps, inverse2, weight_decay):
    """In place on the flat arrays p, m, v from g: the Adam formula of the module docstring, with
    step = scale lr / (1 - b1^t), complement_i = 1 - b_i, inverse2 = 1 / (1 - b2^t); the scalars in the parameter's
    dtype (``_scalars``). (NumPy's error model and same-typed scalars let LLVM vectorize it: 10x faster measured.)"""
    for j in range(p.size):
        grad = g[j] + weight_decay * p[j]
        first = beta1 * m[j] + complement1 * grad
        second = beta2 * v[j] + complement2 * grad * grad
        m[j] = first
        v[j] = second
        p[j] -= step * first / (np.sqrt(second * inverse2) + eps)


def _scalars(dtype, *values) -> tuple:
    """The values as scalars of ``dtype`` (float32 arithmetic for float32 parameters)."""
    return tuple(np.dtype(dtype).type(value) for value in values)


def _flat(array: np.ndarray, what: str) -> np.ndarray:
    """A contiguous array's flat view (the updates write through it)."""
    if not array.flags.c_contiguous:
        raise ValueError(f"{what} must be C-contiguous to be updated in place")
    return array.reshape(-1)


def _gradient(g, p) -> np.ndarray:
    """The gradient as a flat array of the parameter's dtype and size."""
    g = np.ascontiguousarray(g, dtype=p.dtype).reshape(-1)
    if g.size != p.size:
        raise ValueError(f"a gradient of {g.size} values for a parameter of {p.size}")
    return g


class SGD:
    """theta <- theta - lr (v), v <- momentum v + g + weight_decay theta (PyTorch's SGD with momentum)."""

    def __init__(self, params, rates, momentum=0.9, weight_decay=0.0):
        self.rates, self.momentum, self.weight_decay = list(rates), momentum, weight_decay
        self.velocity = [np.zeros_like(p) for p in params]

    def step(self, params, grads, scale=1.0):
        for p, g, v, lr in zip(params, grads, self.velocity, self.rates):
            _sgd_update(_flat(p, "a parameter"), _gradient(g, p), _flat(v, "the velocity"),
                        *_scalars(p.dtype, scale * lr, self.momentum, self.weight_decay))

    def state(self) -> dict:
        return {f"velocity_{i}": v for i, v in enumerate(self.velocity)}

    def load(self, state: dict):
        self.velocity = [np.array(state[f"velocity_{i}"]) for i in range(len(self.velocity))]


class Adam:
    """Adam (Kingma & Ba 2015) with L2 weight decay added to the gradient (PyTorch's Adam)."""

    def __init__(self, params, rates, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.rates, self.betas, self.eps, self.weight_decay = list(rates), betas, eps, weight_decay
        self.first = [np.zeros_like(p) for p in params]
        self.second = [np.zeros_like(p) for p in params]
        self.count = 0

    def step(self, params, grads, scale=1.0):
        self.count += 1
        b1, b2 = self.betas
        correction1, correction2 = 1 - b1 ** self.count, 1 - b2 ** self.count
        for p, g, m, v, lr in zip(params, grads, self.first, self.second, self.rates):
            if m.dtype != p.dtype:  # moments from an older checkpoint (float64): update in their precision
                _adam_step_mixed(p, g, m, v, scale * lr / correction1, b1, b2, self.eps, correction2,
                                 self.weight_decay)
                continue
            _adam_update(_flat(p, "a parameter"), _gradient(g, p), _flat(m, "the first moment"),
                         _flat(v, "the second moment"),
                         *_scalars(p.dtype, scale * lr / correction1, b1, b2, 1 - b1, 1 - b2, self.eps,
                                   1 / correction2, self.weight_decay))

    def state(self) -> dict:
        state = {"count": np.int64(self.count)}
        state.update({f"first_{i}": m for i, m in enumerate(self.first)})
        state.update({f"second_{i}": v for i, v in enumerate(self.second)})
        return state

    def load(self, state: dict):
        self.count = int(state["count"])
        self.first = [np.array(state[f"first_{i}"]) for i in range(len(self.first))]
        self.second = [np.array(state[f"second_{i}"]) for i in range(len(self.second))]


def _adam_step_mixed(p, g, m, v, rate, b1, b2, eps, correction2, weight_decay):
    """The Adam update with moments in another dtype than the parameter (float64 moments of a checkpoint written
    before the moments took the parameter's dtype): numpy, in the moments' precision."""
    g = np.asarray(g, dtype=m.dtype) + (weight_decay * p if weight_decay else 0.0)
    m *= b1
    m += (1 - b1) * g
    v *= b2
    v += (1 - b2) * g * g
    p -= (rate * m / (np.sqrt(v / correction2) + eps)).astype(p.dtype)

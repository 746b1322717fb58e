"""Feedforward students with the EBM's layers (PyTorch): ``FeedForward`` for a dense ``ebm_sim`` Network (below) and
``LayeredFeedForward`` for a layered (convolutional) ``ebm_sim.model.LayeredNetwork`` (its class docstring: the
EBM's own conv/pool/dense fields, normalization inside, readout); ``student_for(network)`` picks the one that fits
(``STUDENTS``). Both offer forward_layers(x, preactivations), input_shape, state_shapes, num_classes, architecture
and parameter_state / load_parameter_state, which distillation, the baselines, checkpoints and files use.

Dense students:

A student maps x in [0, 1] (B, n_0) (or images (B, ...) flattened to n_0) through

    u_k = W_{k-1} a_{k-1} + b_k,   a_0 = x
    a_k = rho(u_k) = clip(slope * u_k, 0, 1)        hidden layers, slope = the EBM's (``Network.slope``)

so a_k estimates the EBM's fixed-point state s_k in one pass, without the feedback term W_k^T s_{k+1}.

Output layer and logits:
- EBM with a softmax readout (``network.readout``): the last layer is linear, logits = W_{L-1} a_{L-1} + b_L,
  exactly the EBM's readout; the states are a_1 .. a_{L-1} (estimates of s_1 .. s_{L-1}).
- MSE-trained EBM (no readout): logits = slope * u_L, the output layer's *pre-activation* (scaled by the slope, not
  clipped), and the output state estimate is a_L = clip(logits, 0, 1). Since clip is non-decreasing, argmax(logits)
  equals argmax(a_L) whenever a_L has a unique largest entry, so the prediction convention is the EBM's argmax s_L;
  the unclipped logits keep a gradient when the output saturates (cross-entropy, attacks).
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn

ACTIVATION_SLOPES = {"hard_sigmoid": 1.0, "hard_sigmoid_half": 0.5}


def hard_sigmoid(u: torch.Tensor, slope: float) -> torch.Tensor:
    """rho(u) = clip(slope * u, 0, 1)."""
    return torch.clamp(u * slope if slope != 1.0 else u, 0.0, 1.0)


class FeedForward(nn.Module):
    """Dense feedforward network n_0 -> n_1 -> ... -> n_L with hard-sigmoid hidden layers.

    layer_sizes: (n_0, ..., n_L); activation: "hard_sigmoid" (slope 1) or "hard_sigmoid_half" (slope 1/2);
    readout: True when the last layer is a linear (softmax) readout, as in an EBM with ``readout=True``.
    ``linears[k]`` holds W_k (weight, (n_{k+1}, n_k)) and b_{k+1} (bias, (n_{k+1},)).
    """

    def __init__(self, layer_sizes, activation: str = "hard_sigmoid", readout: bool = False,
                 dtype=torch.float32, seed: int | None = None):
        super().__init__()
        sizes = tuple(int(n) for n in layer_sizes)
        if len(sizes) < 2 or any(n <= 0 for n in sizes):
            raise ValueError(f"layer_sizes needs at least two positive sizes (input, ..., output), got {layer_sizes}")
        if activation not in ACTIVATION_SLOPES:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATION_SLOPES)}")
        if readout and len(sizes) < 3:
            raise ValueError("a readout needs at least one hidden layer before it")
        self.layer_sizes = sizes
        self.activation = activation
        self.slope = ACTIVATION_SLOPES[activation]
        self.readout = bool(readout)
        self.linears = nn.ModuleList(nn.Linear(n_in, n_out, dtype=dtype) for n_in, n_out in zip(sizes[:-1], sizes[1:]))
        if seed is not None:
            self.reset_parameters(seed)

    # ------------------------------------------------------------------ construction
    def reset_parameters(self, seed: int) -> None:
        """Seeded init, torch.nn.Linear's default: W, b ~ U(-1/sqrt(n_in), 1/sqrt(n_in))."""
        generator = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            for linear in self.linears:
                bound = 1.0 / math.sqrt(linear.in_features)
                for p in (linear.weight, linear.bias):
                    p.copy_(torch.rand(p.shape, generator=generator, dtype=torch.float64).mul_(2 * bound)
                            .sub_(bound).to(p.dtype))

    @classmethod
    def from_network(cls, network, init_from_ebm: bool = False, seed: int = 0, dtype=torch.float32) -> "FeedForward":
        """A student with ``network``'s layer sizes, activation and readout; its forward weights W_k, b_k copied
        from the EBM when ``init_from_ebm`` (else a seeded random init)."""
        model = cls(network.layer_sizes, network.activation, network.readout, dtype=dtype, seed=seed)
        if init_from_ebm:
            model.load_parameters(network.weights, network.biases)
        return model

    def load_parameters(self, weights, biases) -> None:
        """Copy numpy/tensor weights [W_0..W_{L-1}] and biases [b_1..b_L] into the model (shapes checked)."""
        if len(weights) != len(self.linears) or len(biases) != len(self.linears):
            raise ValueError(f"expected {len(self.linears)} weight matrices and bias vectors, got {len(weights)} "
                             f"and {len(biases)}")
        with torch.no_grad():
            for k, (linear, w, b) in enumerate(zip(self.linears, weights, biases)):
                w, b = torch.as_tensor(np.asarray(w)), torch.as_tensor(np.asarray(b))
                if tuple(w.shape) != tuple(linear.weight.shape) or tuple(b.shape) != tuple(linear.bias.shape):
                    raise ValueError(f"layer {k}: W_{k} {tuple(w.shape)} / b_{k + 1} {tuple(b.shape)} do not fit "
                                     f"{tuple(linear.weight.shape)} / {tuple(linear.bias.shape)}")
                linear.weight.copy_(w)
                linear.bias.copy_(b)

    # ------------------------------------------------------------------ shapes
    @property
    def num_layers(self) -> int:
        """L, the number of weight matrices."""
        return len(self.linears)

    @property
    def state_sizes(self) -> tuple:
        """Sizes of the states the student estimates: n_1..n_L, or n_1..n_{L-1} with a readout."""
        return self.layer_sizes[1:-1] if self.readout else self.layer_sizes[1:]

    @property
    def dtype(self) -> torch.dtype:
        return self.linears[0].weight.dtype

    def _flatten(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(np.asarray(x))
        if x.ndim < 2:
            raise ValueError(f"expected a batch (B, {self.layer_sizes[0]}) or (B, ...) images, got shape "
                             f"{tuple(x.shape)}: add a batch dimension")
        x = x.reshape(x.shape[0], -1) if x.ndim != 2 else x
        if not torch.jit.is_tracing() and x.shape[1] != self.layer_sizes[0]:  # (shapes are tensors when traced)
            raise ValueError(f"the model takes {self.layer_sizes[0]} input features per sample, got shape "
                             f"{tuple(x.shape)}")
        return x.to(self.dtype) if x.dtype != self.dtype else x

    # ------------------------------------------------------------------ forward
    def forward_layers(self, x, preactivations: bool = False) -> tuple:
        """(states, logits): states = [a_1, ..., a_L] (no readout; a_L = clip(logits, 0, 1)) or
        [a_1, ..., a_{L-1}] (readout), each (B, n_k); logits (B, n_L) (see the module docstring).
        preactivations=True adds a third item, [z_1, ...] with z_k = slope * u_k and a_k = clip(z_k, 0, 1)."""
        a = self._flatten(x)
        states, zs = [], []
        for linear in self.linears[:-1]:
            z = linear(a)
            z = z * self.slope if self.slope != 1.0 else z
            a = torch.clamp(z, 0.0, 1.0)
            zs.append(z)
            states.append(a)
        u = self.linears[-1](a)
        if self.readout:
            return (states, u, zs) if preactivations else (states, u)
        logits = u * self.slope if self.slope != 1.0 else u
        states.append(torch.clamp(logits, 0.0, 1.0))
        zs.append(logits)
        return (states, logits, zs) if preactivations else (states, logits)

    def forward(self, x) -> torch.Tensor:
        """x in [0, 1], (B, n_0) or (B, ...) with n_0 features per sample -> logits (B, n_L)."""
        a = self._flatten(x)
        for linear in self.linears[:-1]:
            a = hard_sigmoid(linear(a), self.slope)
        u = self.linears[-1](a)
        return u * self.slope if (self.slope != 1.0 and not self.readout) else u

    @torch.no_grad()
    def predict(self, x, batch_size: int = 4096) -> np.ndarray:
        """argmax of the logits, (B,) int64 numpy, in batches."""
        x = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
        return torch.cat([self(x[i:i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)]).numpy()

    def weights_biases(self) -> tuple[list, list]:
        """([W_0..W_{L-1}], [b_1..b_L]) as numpy arrays (copies)."""
        return ([l.weight.detach().cpu().numpy().copy() for l in self.linears],
                [l.bias.detach().cpu().numpy().copy() for l in self.linears])

    # ------------------------------------------------------------------ the interface every student shares
    @property
    def input_shape(self) -> tuple:
        """One sample's input shape, (n_0,)."""
        return (self.layer_sizes[0],)

    @property
    def state_shapes(self) -> tuple:
        """Shapes of the estimated states: ((n_1,), ...) as ``state_sizes``."""
        return tuple((n,) for n in self.state_sizes)

    @property
    def num_classes(self) -> int:
        return self.layer_sizes[-1]

    @property
    def architecture(self) -> dict:
        """The architecture as plain data: {"layer_sizes", "activation", "readout"}."""
        return {"layer_sizes": list(self.layer_sizes), "activation": self.activation, "readout": bool(self.readout)}

    def parameter_state(self) -> dict:
        """{"W{k}": W_k, "b{k+1}": b_{k+1}} as numpy copies (checkpoints, ``distill.fitting``)."""
        weights, biases = self.weights_biases()
        state = {f"W{k}": w for k, w in enumerate(weights)}
        state.update({f"b{k + 1}": b for k, b in enumerate(biases)})
        return state

    def load_parameter_state(self, state: dict) -> None:
        """Inverse of ``parameter_state``."""
        num = self.num_layers
        self.load_parameters([state[f"W{k}"] for k in range(num)], [state[f"b{k}"] for k in range(1, num + 1)])

    def extra_repr(self) -> str:
        return (f"layer_sizes={self.layer_sizes}, activation={self.activation!r}"
                + (", readout=True" if self.readout else ""))


# ---------------------------------------------------------------------------------------------- layered students
def _logits_of_readout(student, params: dict, a_last, z_last):
    """A softmax readout: logits = W flat(a_L) + b, the EBM's own readout of its last state."""
    return implementation(student.cost.kind, "torch").output(student.cost, params, a_last)


def _logits_of_squared_error(student, params: dict, a_last, z_last):
    """No readout (the squared-error cost): logits = flat(z_L) = slope * flat(u_L), unclipped (argmax equals the
    EBM's argmax s_L convention wherever a_L = clip(z_L, 0, 1) has a unique maximum; gradients survive saturation)."""
    return z_last.reshape(z_last.shape[0], -1)


#: cost kind of the EBM -> how the student turns its last layer into logits: fn(student, cost params, a_L, z_L)
STUDENT_LOGITS = {"softmax_readout": _logits_of_readout, "squared_error": _logits_of_squared_error}


def implementation(kind: str, backend: str):
    """The simulator's registered implementation of an interaction or cost kind (``ebm_sim.model.interaction``)."""
    from ebm_sim.model.interaction import implementation as lookup
    return lookup(kind, backend)


class LayeredFeedForward(nn.Module):
    """The feedforward student of a layered (e.g. convolutional) EBM, ``ebm_sim.model.LayeredNetwork``: same layers,
    same interactions and hyperparameters, no feedback.

    For each layer k = 1..L, in order, with s_0 = normalize(x) (the EBM's normalization, inside the model):

        u_k = sum_{binary i: post(i) = k} F_i(a_{pre(i)}) + sum_{Bias i on k} b_i       (the EBM's post fields)
        z_k = slope * u_k,   a_k = clip(z_k, 0, 1)                                     (a_k, z_k: (B, *shape_k))

    F_i is the interaction's own torch implementation (``ebm_sim.model.torch_ops``): Conv2d: pool(conv(a, W)) with
    the EBM's kernel, stride, padding and 2x2 max/avg pooling; Dense: W flat(a). The EBM's fixed point is
    s_k = clip(slope (u_k(s) + feedback_k(s)), 0, 1) with feedback_k = sum of the pre fields from the layers above; the
    student drops that term, so it is one bottom-up sweep. Logits: ``STUDENT_LOGITS[cost kind]`` (the softmax
    readout W flat(a_L) + b, or flat(z_L) for the squared error, as ``FeedForward``).

    Parameters are ``nn.Parameter``s named ``i{index}_{name}`` (the network's ``index``-th interaction) and
    ``cost_{name}``. Inputs: images (B, *input_shape) in [0, 1] (or (B, prod(input_shape)), reshaped).
    """

    def __init__(self, network, init_from_ebm: bool = False, seed: int = 0, dtype=torch.float32):
        super().__init__()
        from ebm_sim.model.network import LayeredNetwork

        if not isinstance(network, LayeredNetwork):
            raise ValueError(f"LayeredFeedForward needs an ebm_sim.model.LayeredNetwork, got "
                             f"{type(network).__name__} (a dense ebm_sim Network has FeedForward)")
        if network.cost.kind not in STUDENT_LOGITS:
            raise ValueError(f"no student readout for the cost {network.cost.kind!r}; known: "
                             f"{', '.join(sorted(STUDENT_LOGITS))}")
        if not isinstance(init_from_ebm, bool):
            raise ValueError(f"init_from_ebm must be a bool, got {init_from_ebm!r}")
        self.description = network.describe()
        self.layer_shapes = network.layer_shapes
        self.activation = network.activation
        self.slope = float(network.slope)
        source = network if init_from_ebm else _seeded_copy(network, seed)
        self.interactions = [_without_params(i) for i in network.interactions]
        self.cost = _without_params(network.cost)
        self.params = nn.ParameterDict()
        for index, interaction in enumerate(source.interactions):
            for name, array in interaction.params.items():
                self.params[f"i{index}_{name}"] = nn.Parameter(torch.tensor(np.asarray(array), dtype=dtype))
        for name, array in sorted(source.cost.params.items()):
            self.params[f"cost_{name}"] = nn.Parameter(torch.tensor(np.asarray(array), dtype=dtype))
        self._feeds = [[j for j, i in enumerate(self.interactions) if i.post == k]
                       for k in range(1, len(self.layer_shapes))]
        mean, std = _normalization(network, dtype)
        self.normalized = network.normalization is not None
        self.register_buffer("norm_mean", mean)
        self.register_buffer("norm_std", std)

    @classmethod
    def from_network(cls, network, init_from_ebm: bool = False, seed: int = 0,
                     dtype=torch.float32) -> "LayeredFeedForward":
        """A student with ``network``'s layers, its feedforward parameters copied when ``init_from_ebm`` (else
        a seeded init with the simulator's own rule, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) per interaction)."""
        return cls(network, init_from_ebm=init_from_ebm, seed=seed, dtype=dtype)

    @classmethod
    def from_state(cls, description: dict, state: dict, dtype=torch.float32) -> "LayeredFeedForward":
        """The student of the architecture ``description`` (``LayeredNetwork.describe()``) with parameters ``state``
        (``parameter_state()``'s names); ValueError names a missing or misshapen parameter."""
        from ebm_sim.model.network import LayeredNetwork

        num = len(description["interactions"])
        params = [{key.split("/", 1)[1]: value for key, value in state.items() if key.split("/", 1)[0] == f"i{j}"}
                  for j in range(num)]
        cost = {key.split("/", 1)[1]: value for key, value in state.items() if key.startswith("cost/")}
        network = LayeredNetwork.from_description(description, params, cost)
        return cls(network, init_from_ebm=True, dtype=dtype)

    # ------------------------------------------------------------------ shapes
    @property
    def num_layers(self) -> int:
        """L, the number of layers that relax in the EBM."""
        return len(self.layer_shapes) - 1

    @property
    def input_shape(self) -> tuple:
        return self.layer_shapes[0]

    @property
    def state_shapes(self) -> tuple:
        """Shapes of the estimated states s_1..s_L (the EBM's layer shapes)."""
        return self.layer_shapes[1:]

    @property
    def num_classes(self) -> int:
        return int(self.description["cost"]["classes"])

    @property
    def architecture(self) -> dict:
        """The EBM's ``describe()``: layers, interactions with their settings, cost, activation, normalization."""
        return self.description

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype

    def _interaction_params(self, index: int) -> dict:
        return {name: self.params[f"i{index}_{name}"] for name in self.interactions[index].param_names}

    def _cost_params(self) -> dict:
        return {key[len("cost_"):]: p for key, p in self.params.items() if key.startswith("cost_")}

    def _inputs(self, x) -> torch.Tensor:
        """x (B, *input_shape) or (B, prod(input_shape)) -> (B, *input_shape) in the model's dtype."""
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(np.asarray(x))
        if torch.jit.is_tracing():  # shapes are tensors when traced (ONNX export): no checks, no reshape
            return x.to(self.dtype)
        shape = tuple(self.input_shape)
        if x.ndim >= 2 and tuple(x.shape[1:]) == shape:
            pass
        elif x.ndim == 2 and x.shape[1] == int(np.prod(shape)):
            x = x.reshape((x.shape[0],) + shape)
        else:
            raise ValueError(f"the model takes images (B, {', '.join(map(str, shape))}) (or (B, {int(np.prod(shape))})"
                             f" flat), got shape {tuple(x.shape)}")
        return x.to(self.dtype) if x.dtype != self.dtype else x

    # ------------------------------------------------------------------ forward
    def forward_layers(self, x, preactivations: bool = False) -> tuple:
        """(states, logits) or, with preactivations=True, (states, logits, zs): states = [a_1..a_L] and
        zs = [z_1..z_L] (a_k = clip(z_k, 0, 1)), each (B, *shape_k); logits (B, classes) (see the class docstring)."""
        s0 = self._inputs(x)
        every = [(s0 - self.norm_mean) / self.norm_std if self.normalized else s0]
        zs = []
        for feeds in self._feeds:
            u = None
            for j in (j for j in feeds if not self.interactions[j].unary):
                i = self.interactions[j]
                term = implementation(i.kind, "torch").post_field(i, self._interaction_params(j), every[i.pre])
                u = term if u is None else u + term
            for j in (j for j in feeds if self.interactions[j].unary):
                i = self.interactions[j]
                u = u + implementation(i.kind, "torch").field(i, self._interaction_params(j), u)
            z = u * self.slope if self.slope != 1.0 else u
            zs.append(z)
            every.append(torch.clamp(z, 0.0, 1.0))
        states = every[1:]
        logits = STUDENT_LOGITS[self.cost.kind](self, self._cost_params(), states[-1], zs[-1])
        return (states, logits, zs) if preactivations else (states, logits)

    def forward(self, x) -> torch.Tensor:
        """Images in [0, 1] (B, *input_shape) -> logits (B, classes)."""
        return self.forward_layers(x)[1]

    @torch.no_grad()
    def predict(self, x, batch_size: int = 1024) -> np.ndarray:
        """argmax of the logits, (B,) int64 numpy, in batches."""
        x = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
        return torch.cat([self(x[i:i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)]).numpy()

    # ------------------------------------------------------------------ parameters as arrays
    def parameter_state(self) -> dict:
        """{"i{index}/{name}": array, "cost/{name}": array} numpy copies (checkpoints and files)."""
        return {key.replace("_", "/", 1): p.detach().cpu().numpy().copy() for key, p in self.params.items()}

    def load_parameter_state(self, state: dict) -> None:
        """Inverse of ``parameter_state`` (names and shapes checked, ValueError before anything is copied)."""
        expected = {key.replace("_", "/", 1): p for key, p in self.params.items()}
        if set(state) != set(expected):
            raise ValueError(f"parameters {sorted(expected)} expected, got {sorted(state)}")
        for key, p in expected.items():
            if tuple(np.shape(state[key])) != tuple(p.shape):
                raise ValueError(f"parameter {key}: shape {tuple(np.shape(state[key]))}, expected {tuple(p.shape)}")
        with torch.no_grad():
            for key, p in expected.items():
                p.copy_(torch.as_tensor(np.asarray(state[key])))

    def to_network(self):
        """The student's parameters as a LayeredNetwork of the same architecture (float32 or float64 numpy)."""
        from ebm_sim.model.network import LayeredNetwork

        state = self.parameter_state()
        params = [{name: state[f"i{j}/{name}"] for name in i.param_names} for j, i in enumerate(self.interactions)]
        cost = {key.split("/", 1)[1]: value for key, value in state.items() if key.startswith("cost/")}
        return LayeredNetwork.from_description(self.description, params, cost)

    def extra_repr(self) -> str:
        shapes = "-".join("x".join(map(str, s)) for s in self.layer_shapes)
        return f"layers={shapes}, activation={self.activation!r}, cost={self.cost.kind!r}"


def _without_params(part):
    """A shallow copy of an interaction or cost with empty ``params`` (the student keeps its hyperparameters only)."""
    clone = copy.copy(part)
    clone.params = {}
    return clone


def _seeded_copy(network, seed: int):
    """A copy of ``network`` re-initialized with the simulator's rule (``Interaction.init_params``, the cost's
    ``init_params``) from numpy's generator seeded by ``seed``."""
    fresh = network.copy()
    rng = np.random.default_rng(int(seed))
    shapes = fresh.layer_shapes
    for i in fresh.interactions:
        i.init_params(rng, shapes[i.pre], shapes[i.post], fresh.dtype)
    fresh.cost.init_params(rng, shapes[-1], fresh.dtype)
    return fresh


def _normalization(network, dtype) -> tuple:
    """(mean, std) buffers shaped (1, C, 1, 1) (or (1, C)) for s_0 = (x - mean) / std; empty without one."""
    if network.normalization is None:
        return torch.zeros(0, dtype=dtype), torch.ones(0, dtype=dtype)
    shape = (1, -1) + (1,) * (len(network.input_shape) - 1)
    return (torch.tensor(network.normalization["mean"], dtype=dtype).reshape(shape),
            torch.tensor(network.normalization["std"], dtype=dtype).reshape(shape))


# ---------------------------------------------------------------------------------------------- students by EBM type
def _dense_network_class():
    from ebm_sim.network import Network
    return Network


def _layered_network_class():
    from ebm_sim.model.network import LayeredNetwork
    return LayeredNetwork


#: (the EBM class, looked up lazily) -> the student class with ``from_network(network, init_from_ebm, seed)``
STUDENTS = [(_dense_network_class, FeedForward), (_layered_network_class, LayeredFeedForward)]


def student_class(network):
    """The student class of an EBM: FeedForward for a dense ``ebm_sim.network.Network``, LayeredFeedForward for an
    ``ebm_sim.model.LayeredNetwork``; ValueError for anything else."""
    for network_class, student in STUDENTS:
        if isinstance(network, network_class()):
            return student
    raise ValueError(f"no student for a {type(network).__name__}: expected an ebm_sim Network or LayeredNetwork")


def student_for(network, init_from_ebm: bool = False, seed: int = 0, dtype=torch.float32):
    """The feedforward student of ``network`` (see ``student_class``), its forward weights copied when
    ``init_from_ebm``."""
    return student_class(network).from_network(network, init_from_ebm=init_from_ebm, seed=seed, dtype=dtype)

"""A layered network: layer shapes, the interactions that join them, and the cost of the nudged phase.

    layer_shapes[0] is the clamped input s_0 = x; layer_shapes[1:] are the layers that relax, s_1 .. s_L, each (n,) or
    (C, H, W); states are activations in [0, 1], batch first: s_k has shape (B, *layer_shapes[k]).
    interactions: Dense / Conv2d (binary, pre < post) and Bias (unary), see :mod:`ebm_sim.model.interaction`;
    cost: SquaredError (s_L is the output) or SoftmaxReadout (logits = W flat(s_L) + b).
    activation: rho(u) = clip(a u, 0, 1) with a = ACTIVATIONS[activation] (the simulator's one table).
    normalization: None, or {"mean": [...], "std": [...]} per input channel: the clamped layer is
        s_0 = (x - mean) / std for images x in [0, 1] (inside the model, so that attacks and budgets stay in pixel
        space; zero padding is then zero in the normalized space, as in the reference codes).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from ..limits import require_memory
from ..network import ACTIVATIONS, Network, _check_dtype
from . import spec as spec_module
from .bias import Bias
from .conv import Conv2d
from .cost import COSTS, SoftmaxReadout, SquaredError
from .dense import Dense
from .interaction import INTERACTIONS


@dataclass
class LayeredNetwork:
    layer_shapes: tuple
    interactions: list
    cost: object = field(default_factory=SquaredError)
    activation: str = "hard_sigmoid"
    history: dict = field(default_factory=dict)
    normalization: dict | None = None

    def __post_init__(self):
        self.layer_shapes = tuple(tuple(int(n) for n in shape) for shape in self.layer_shapes)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; choose one of {sorted(ACTIVATIONS)}")
        if len(self.layer_shapes) < 2:
            raise ValueError("a network needs an input layer and at least one layer that relaxes")
        for k, shape in enumerate(self.layer_shapes):
            if len(shape) not in (1, 3) or min(shape) < 1:
                raise ValueError(f"layer {k} has shape {shape}: a layer is (n,) or (C, H, W) with positive sizes")
        last = len(self.layer_shapes) - 1
        touched = set()
        dtypes = set()
        for i in self.interactions:
            if i.unary:
                if not 1 <= i.post <= last:
                    raise ValueError(f"{i.describe()}: the layer must be one of 1..{last} (the input is clamped)")
            elif not (0 <= i.pre < i.post <= last):
                raise ValueError(f"{i.describe()}: needs 0 <= pre < post <= {last}")
            else:
                touched.add(i.post)
            i.check(self.layer_shapes[i.pre], self.layer_shapes[i.post])
            dtypes |= {np.asarray(p).dtype for p in i.params.values()}
        missing = sorted(set(range(1, last + 1)) - touched)
        if missing:
            raise ValueError(f"layers {missing} receive no interaction from a lower layer")
        expected = self.cost.param_shapes(self.layer_shapes[-1])
        for name, shape in expected.items():
            if tuple(np.shape(self.cost.params.get(name))) != tuple(shape):
                raise ValueError(f"the {self.cost.kind} parameter {name!r} must have shape {shape}, "
                                 f"got {np.shape(self.cost.params.get(name))}")
        dtypes |= {np.asarray(p).dtype for p in self.cost.params.values()}
        if len(dtypes) > 1:
            raise ValueError(f"parameters mix dtypes {sorted(map(str, dtypes))}")
        if dtypes:
            _check_dtype(next(iter(dtypes)))
        self._check_normalization()

    def _check_normalization(self) -> None:
        if self.normalization is None:
            return
        channels = self.layer_shapes[0][0] if len(self.layer_shapes[0]) == 3 else 1
        if set(self.normalization) != {"mean", "std"}:
            raise ValueError(f"normalization needs exactly 'mean' and 'std', got {sorted(self.normalization)}")
        mean, std = (np.asarray(self.normalization[k], dtype=np.float64).reshape(-1) for k in ("mean", "std"))
        if mean.shape != (channels,) or std.shape != (channels,):
            raise ValueError(f"normalization mean and std need {channels} values (one per input channel), got "
                             f"{mean.size} and {std.size}")
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
            raise ValueError("normalization mean must be finite and std positive")
        self.normalization = {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}

    def normalize(self, x):
        """s_0 = (x - mean) / std per channel (x unchanged without a normalization); numpy arrays or tensors."""
        if self.normalization is None:
            return x
        shape = (1, -1) + (1,) * (x.ndim - 2)
        mean = np.asarray(self.normalization["mean"], dtype=np.float64).reshape(shape)
        std = np.asarray(self.normalization["std"], dtype=np.float64).reshape(shape)
        if hasattr(x, "new_tensor"):
            return (x - x.new_tensor(mean)) / x.new_tensor(std)
        return ((x - mean) / std).astype(x.dtype)

    # ------------------------------------------------------------------ shape and type
    @property
    def num_layers(self) -> int:
        """L, the number of layers that relax."""
        return len(self.layer_shapes) - 1

    @property
    def state_shapes(self) -> tuple:
        return self.layer_shapes[1:]

    @property
    def input_shape(self) -> tuple:
        return self.layer_shapes[0]

    @property
    def num_classes(self) -> int:
        return self.cost.classes(self.layer_shapes[-1])

    @property
    def slope(self) -> float:
        return ACTIVATIONS[self.activation]

    @property
    def dtype(self) -> np.dtype:
        for p in self.parameter_arrays():
            return p.dtype
        return np.dtype(np.float32)

    def parameter_arrays(self) -> list:
        """Every parameter array, interactions in order then the cost's."""
        return [i.params[n] for i in self.interactions for n in i.param_names] + [
            self.cost.params[n] for n in sorted(self.cost.params)]

    def synapses(self) -> int:
        """Multiply-adds of one forward sweep of every interaction (and the readout) for one sample."""
        return sum(i.synapses(self.layer_shapes[i.pre], self.layer_shapes[i.post]) for i in self.interactions) + \
            self.cost.synapses(self.layer_shapes[-1])

    def zero_states(self, batch: int) -> list:
        return [np.zeros((batch,) + shape, dtype=self.dtype) for shape in self.state_shapes]

    def astype(self, dtype) -> "LayeredNetwork":
        dtype = _check_dtype(dtype)
        interactions = [type(i).__new__(type(i)) for i in self.interactions]
        for new, old in zip(interactions, self.interactions):
            new.__dict__.update(old.__dict__)
            new.params = {n: p.astype(dtype) for n, p in old.params.items()}
        cost = type(self.cost).__new__(type(self.cost))
        cost.__dict__.update(self.cost.__dict__)
        cost.params = {n: p.astype(dtype) for n, p in self.cost.params.items()}
        return LayeredNetwork(self.layer_shapes, interactions, cost, self.activation, dict(self.history),
                              self.normalization)

    def copy(self) -> "LayeredNetwork":
        return self.astype(self.dtype)

    # ------------------------------------------------------------------ identity
    def describe(self) -> dict:
        """The architecture as plain data (layers, interactions with their settings, cost, activation)."""
        return {"layers": [list(s) for s in self.layer_shapes], "activation": self.activation,
                "interactions": [{"kind": i.kind, "pre": i.pre, "post": i.post, **i.hyperparameters()}
                                 for i in self.interactions],
                "cost": {"kind": self.cost.kind, "classes": self.num_classes},
                **({"normalization": self.normalization} if self.normalization is not None else {})}

    def content_hash(self) -> str:
        """SHA-256 over the architecture (``describe``), the dtype and the exact parameter bytes."""
        h = hashlib.sha256()
        h.update(json.dumps(self.describe(), sort_keys=True).encode())
        h.update(str(self.dtype).encode())
        for array in self.parameter_arrays():
            h.update(np.ascontiguousarray(array).tobytes())
        return h.hexdigest()

    def __repr__(self) -> str:
        shapes = "-".join("x".join(map(str, s)) for s in self.layer_shapes)
        return (f"LayeredNetwork({shapes}, {len(self.interactions)} interactions, cost={self.cost.kind}, "
                f"activation={self.activation!r}, dtype={self.dtype})")

    # ------------------------------------------------------------------ construction
    @classmethod
    def init(cls, architecture, seed: int = 0, dtype=np.float32, activation: str | None = None,
             gain: float = 1.0, normalization: dict | None = None) -> "LayeredNetwork":
        """A seeded network from a spec string, a TOML path, layer sizes or a parsed ``spec.Architecture``.

        Each block adds a layer, its interaction from the layer below (Dense or Conv2d) and a Bias; a readout block
        sets the cost. Parameters ~ U(-g/sqrt(fan_in), g/sqrt(fan_in)) (torch's Linear/Conv2d default)."""
        architecture = spec_module.load(architecture)
        activation = activation or architecture.activation or "hard_sigmoid"
        dtype = _check_dtype(dtype)
        if not np.isfinite(gain) or gain <= 0:
            raise ValueError(f"gain must be positive, got {gain}")
        shapes, interactions, cost = [tuple(architecture.input_shape)], [], SquaredError()
        for block in architecture.blocks:
            k, below = len(shapes), shapes[-1]
            try:
                if block.kind == "readout":
                    cost = SoftmaxReadout(block.size)
                    continue
                if block.kind == "conv":
                    link = Conv2d(k - 1, k, kernel=block.kernel, stride=block.stride, padding=block.padding,
                                  pool=block.pool)
                    shapes.append(link.output_shape(below, block.size))
                else:
                    link = Dense(k - 1, k)
                    shapes.append((block.size,))
            except ValueError as error:
                raise spec_module.SpecError(f"block {k} ({block.text()}) of '{architecture.text()}': {error}") from None
            interactions += [link, Bias(k, fan_in_units=link.fan_in(below))]
        count = sum(int(np.prod(s)) for s in _param_shapes(shapes, interactions, cost))
        require_memory(count * (8 + dtype.itemsize), f"a {architecture.text()} network ({count:,} parameters)",
                       "check the architecture")
        rng = np.random.default_rng(seed)
        for i in interactions:
            i.init_params(rng, shapes[i.pre], shapes[i.post], dtype, gain)
        cost.init_params(rng, shapes[-1], dtype, gain)
        return cls(tuple(shapes), interactions, cost, activation, normalization=normalization)

    @classmethod
    def from_dense(cls, network: Network) -> "LayeredNetwork":
        """The same network (sharing no arrays) as layers and interactions: W_k -> Dense(k, k+1), b_{k+1} -> Bias;
        a readout network's last (W, b) -> SoftmaxReadout."""
        dynamic = network.dynamics()
        sizes = dynamic.layer_sizes
        interactions = []
        for k, (w, b) in enumerate(zip(dynamic.weights, dynamic.biases)):
            interactions.append(Dense(k, k + 1, {"weight": w.copy()}))
            interactions.append(Bias(k + 1, {"bias": b.copy()}, fan_in_units=sizes[k]))
        if network.readout:
            w, b = network.readout_layer()
            cost = SoftmaxReadout(w.shape[0], {"weight": w.copy(), "bias": b.copy()})
        else:
            cost = SquaredError()
        return cls(tuple((n,) for n in sizes), interactions, cost, network.activation, dict(network.history))

    @classmethod
    def from_description(cls, description: dict, interaction_params: list, cost_params: dict,
                         history: dict | None = None) -> "LayeredNetwork":
        """The network that ``describe()`` gave ``description``, with these parameters: ``interaction_params[i]``
        ({name: array}) for the i-th interaction, ``cost_params`` for the cost. Classes come from the registries
        (``INTERACTIONS``, ``COSTS``) by kind; every kind is looked up before anything is built. ValueError names an
        unknown kind, a missing or unexpected parameter or anything the network itself refuses. (A Bias's
        ``fan_in_units``, which only sets its initialization bound, is not part of the description: it is the fan-in
        of the interaction feeding its layer, as ``init`` sets it.)"""
        entries = list(description["interactions"])
        if len(entries) != len(interaction_params):
            raise ValueError(f"{len(entries)} interactions are described but {len(interaction_params)} parameter "
                             "sets were given")
        classes = [_registered(INTERACTIONS, entry["kind"], "interaction") for entry in entries]
        cost_class = _registered(COSTS, description["cost"]["kind"], "cost")
        interactions = [_interaction_from(c, entry, params)
                        for c, entry, params in zip(classes, entries, interaction_params)]
        _feed_bias_fan_in(interactions, [tuple(shape) for shape in description["layers"]])
        cost = _cost_from(cost_class, description["cost"], description["layers"][-1], cost_params)
        return cls(tuple(description["layers"]), interactions, cost, description["activation"], dict(history or {}),
                   description.get("normalization"))


def is_layered(network) -> bool:
    """A network of layers and interactions (this module), e.g. convolutional, rather than a dense Network."""
    return isinstance(network, LayeredNetwork)


def _registered(registry: dict, kind, what: str):
    """``registry[kind]``, or ValueError naming the unknown kind and the known ones."""
    if kind not in registry:
        raise ValueError(f"unknown {what} kind {kind!r}; known: {', '.join(sorted(registry))}")
    return registry[kind]


def _interaction_from(interaction_class, entry: dict, params: dict):
    """An interaction from its ``describe()`` entry: a unary one is built as ``cls(layer, params, **settings)``,
    a binary one as ``cls(pre, post, params, **settings)``; settings are the entry's hyperparameters."""
    settings = {k: v for k, v in entry.items() if k not in ("kind", "pre", "post")}
    layers = (entry["post"],) if interaction_class.unary else (entry["pre"], entry["post"])
    return interaction_class(*layers, dict(params), **settings)


def _feed_bias_fan_in(interactions: list, shapes: list) -> None:
    """Give each Bias the fan-in of the first interaction that feeds its layer from below (``init``'s rule: the bias
    shares its layer's weights' initialization bound), so that a network rebuilt from a file re-initializes as
    ``init`` would; a layer fed by none keeps 1."""
    feeding = {}
    for i in interactions:
        if not i.unary and i.post not in feeding:
            feeding[i.post] = i.fan_in(shapes[i.pre])
    for i in interactions:
        if i.unary and hasattr(i, "fan_in_units"):
            i.fan_in_units = int(feeding.get(i.post, 1))


def _cost_from(cost_class, entry: dict, last_shape, params: dict):
    """A cost from its ``describe()`` entry ({"kind", "classes"}): a cost whose class count is a setting
    (``num_classes``) gets it; the parameters must be exactly the ones its ``param_shapes`` names."""
    settings = {"num_classes": int(entry["classes"])} if hasattr(cost_class, "num_classes") else {}
    cost = cost_class(params=dict(params), **settings)
    expected = sorted(cost.param_shapes(tuple(last_shape)))
    if sorted(params) != expected:
        raise ValueError(f"the {cost.kind} cost needs parameters {expected}, got {sorted(params)}")
    return cost


def _param_shapes(shapes, interactions, cost) -> list:
    out = [s for i in interactions for s in i.param_shapes(shapes[i.pre], shapes[i.post]).values()]
    return out + list(cost.param_shapes(shapes[-1]).values())

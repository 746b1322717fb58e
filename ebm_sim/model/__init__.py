"""Layered networks as layers and interactions (dense, conv with pooling, bias, softmax readout): the energy as a sum
of terms, one implementation per backend (numpy reference, torch), relaxation and EP written once.
See docs/architecture.md."""
from .bias import Bias
from .conv import Conv2d
from .cost import SoftmaxReadout, SquaredError
from .dense import Dense
from .interaction import INTERACTIONS, IMPLEMENTATIONS, Interaction, implementation, implements, register_interaction
from .network import LayeredNetwork
from .spec import Architecture, SpecError, parse

__all__ = ["Bias", "Conv2d", "Dense", "SoftmaxReadout", "SquaredError", "Interaction", "INTERACTIONS",
           "IMPLEMENTATIONS", "implementation", "implements", "register_interaction", "LayeredNetwork",
           "Architecture", "SpecError", "parse"]

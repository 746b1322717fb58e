"""Dense interaction: every unit of the pre layer to every unit of the post layer (layers of any shape, flattened).

    Phi_i = <W flat(s_pre), flat(s_post)>            W: (n_post, n_pre), n = prod(shape)
    field on post: W flat(s_pre)                      field on pre: W^T flat(s_post)
    dPhi_i/dW = mean_b flat(s_post)_b flat(s_pre)_b^T
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .interaction import Interaction, register_interaction


@register_interaction
@dataclass
class Dense(Interaction):
    kind = "dense"
    param_names = ("weight",)

    def param_shapes(self, pre_shape, post_shape) -> dict:
        return {"weight": (int(np.prod(post_shape)), int(np.prod(pre_shape)))}

    def fan_in(self, pre_shape) -> int:
        return int(np.prod(pre_shape))

    def synapses(self, pre_shape, post_shape) -> int:
        return int(np.prod(pre_shape)) * int(np.prod(post_shape))

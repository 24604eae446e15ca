"""Weights across the framework boundary: a torch model's `state_dict()` as JAX `params`.

The JAX models name and shape their parameters exactly as the torch models' `state_dict()`,
so conversion is a copy: no transposes, no renaming. Arrays travel as numpy arrays, so this
module needs no JAX (a `jax.Array` is accepted through numpy's array protocol).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn


def to_jax(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's weights as `{state_dict key: numpy array}`, ready for `tbptt_jax`."""
    return {name: tensor.detach().cpu().numpy().copy()
            for name, tensor in model.state_dict().items()}


def load_jax(model: nn.Module, params: Mapping[str, Any]) -> nn.Module:
    """Copies JAX `params` (numpy or jax arrays, keyed as the model's `state_dict()`) into
    `model`, cast to the model's dtype. Every key and shape is checked before anything is
    copied, so a mismatch leaves the model untouched."""
    state = model.state_dict()
    missing = [name for name in state if name not in params]
    unexpected = [name for name in params if name not in state]
    if missing or unexpected:
        raise ValueError(f"params must have the model's keys {list(state)}; missing {missing}, "
                         f"unexpected {unexpected}")
    arrays = {name: np.asarray(params[name]) for name in state}
    for name, tensor in state.items():
        if arrays[name].shape != tuple(tensor.shape):
            raise ValueError(f"params[{name!r}] must have shape {tuple(tensor.shape)}, "
                             f"got {arrays[name].shape}")
    with torch.no_grad():
        for name, tensor in state.items():
            tensor.copy_(torch.from_numpy(np.array(arrays[name])))
    return model

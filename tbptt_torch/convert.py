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

from tbptt.checks import check_param_shapes


def to_jax(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's weights as `{state_dict key: numpy array}`, ready for `tbptt_jax`."""
    return {name: tensor.detach().cpu().numpy().copy()
            for name, tensor in model.state_dict().items()}


def load_jax(model: nn.Module, params: Mapping[str, Any]) -> nn.Module:
    """Copies JAX `params` (numpy or jax arrays, keyed as the model's `state_dict()`) into
    `model`, cast to the model's dtype. Every key and shape is checked before anything is
    copied, so a mismatch leaves the model untouched."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be a dict of arrays keyed as the model's state_dict(), "
                         f"got {type(params).__name__}")
    state = model.state_dict()
    arrays = {name: np.asarray(value) for name, value in params.items()}
    check_param_shapes({name: tuple(tensor.shape) for name, tensor in state.items()},
                       {name: array.shape for name, array in arrays.items()})
    with torch.no_grad():
        for name, tensor in state.items():
            tensor.copy_(torch.from_numpy(np.array(arrays[name])))
    return model

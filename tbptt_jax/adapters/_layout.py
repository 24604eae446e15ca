"""The torch layout that every adapter converts from and to, and the checks on it.

The torch layout is the flat dict that `tbptt_torch.to_jax` returns and `tbptt_jax.models`
uses: one recurrent layer under `rnn.` with torch's names and shapes (`rnn.weight_ih_l0`
`[G*H, I]`, `rnn.weight_hh_l0` `[G*H, H]`, `rnn.bias_ih_l0` and `rnn.bias_hh_l0` `[G*H]`;
gates i, f, g, o for the LSTM, r, z, n for the GRU, G = 1 for the Elman RNN) and a linear
readout under `head.` (`head.weight` `[O, H]`, `head.bias` `[O]`). The torch carry is
`h[1, B, H]`, or `(h, c)` for the LSTM. Nothing here imports flax or equinox.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tbptt.checks import check_param_shapes

Array = jax.Array

GATES = {"elman": 1, "gru": 3, "lstm": 4}
W_IH, W_HH, B_IH, B_HH = ("rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_ih_l0",
                          "rnn.bias_hh_l0")
HEAD_W, HEAD_B = "head.weight", "head.bias"


class CellSpec(NamedTuple):
    """What a converted cell is in torch's terms."""

    kind: str  # "elman", "gru" or "lstm": the torch module it matches (nn.RNN, nn.GRU, nn.LSTM)
    input_size: int  # I
    hidden_size: int  # H


class HeadSpec(NamedTuple):
    """A linear readout `y = W h + b` in torch's terms."""

    output_size: int  # O
    use_bias: bool  # False: the library's readout has no bias, so head.bias must be zero


def torch_shapes(cell: CellSpec, head: HeadSpec | None) -> dict[str, tuple[int, ...]]:
    """The torch-layout keys and shapes of a one-layer model with this cell and readout."""
    gates_h = GATES[cell.kind] * cell.hidden_size
    shapes = {W_IH: (gates_h, cell.input_size), W_HH: (gates_h, cell.hidden_size),
              B_IH: (gates_h,), B_HH: (gates_h,)}
    if head is not None:
        shapes[HEAD_W] = (head.output_size, cell.hidden_size)
        shapes[HEAD_B] = (head.output_size,)
    return shapes


def check_torch_params(params: Mapping[str, Any], cell: CellSpec, head: HeadSpec | None
                       ) -> dict[str, Array]:
    """Checks every key and shape of a torch-layout dict; returns its arrays as JAX arrays."""
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be a dict keyed as the torch state_dict, got "
                         f"{type(params).__name__}")
    expected = torch_shapes(cell, head)
    hint = (" (the adapters convert one recurrent layer; stack adapters for more)"
            if any(name.endswith("_l1") and name not in expected for name in params) else "")
    check_param_shapes(expected, {name: jnp.shape(value) for name, value in params.items()},
                       model=f" for a one-layer {cell.kind} with input_size={cell.input_size}, "
                             f"hidden_size={cell.hidden_size}", hint=hint)
    return {name: jnp.asarray(params[name]) for name in expected}


def require_zero(name: str, value: Array, why: str) -> None:
    """Raises unless `value` (a torch-layout entry the library has no parameter for) is zero:
    an exact port exists only then, and dropping it silently would change the model."""
    largest = float(jnp.max(jnp.abs(value))) if value.size else 0.0
    if largest != 0.0:
        raise ValueError(f"{name} must be zero to convert exactly ({why}); its largest "
                         f"magnitude is {largest:.6g}")


def gate_blocks(array: Array, kind: str) -> list[Array]:
    """Splits a torch `[G*H, ...]` array into its G gate blocks `[H, ...]`, in torch's order."""
    return jnp.split(array, GATES[kind], axis=0)


def redundant_entries(cell: CellSpec, tied: tuple[int, ...], absent: tuple[int, ...] = ()
                      ) -> dict[str, np.ndarray]:
    """Masks over `rnn.bias_hh_l0`: True on the gate blocks `tied` (folded into another bias)
    and `absent` (no parameter at all) that the library does not hold on their own."""
    mask = np.zeros((GATES[cell.kind], cell.hidden_size), bool)
    mask[list(tied) + list(absent)] = True
    return {B_HH: mask.reshape(-1)}


def dense_from_torch(torch_params: dict[str, Array], head: HeadSpec) -> dict[str, Array]:
    """`head.weight [O, H]`, `head.bias [O]` as a linen/nnx `kernel [H, O]`, `bias [O]`."""
    readout = {"kernel": torch_params[HEAD_W].T}
    if head.use_bias:
        readout["bias"] = torch_params[HEAD_B]
    else:
        require_zero(HEAD_B, torch_params[HEAD_B],
                             "the readout was built with use_bias=False")
    return readout


def dense_to_torch(readout: dict[str, Array], head: HeadSpec) -> dict[str, Array]:
    """A linen/nnx `kernel [H, O]` and `bias [O]` (zeros without one) as `head.`."""
    kernel = readout["kernel"]
    bias = readout["bias"] if head.use_bias else jnp.zeros(kernel.shape[1:], kernel.dtype)
    return {HEAD_W: kernel.T, HEAD_B: bias}


def carry_from_torch(carry: Any, kind: str, hidden_size: int, *, lstm_order: str
                     ) -> Any:
    """A torch carry (`h[1, B, H]`, or `(h, c)` for the LSTM) as one cell's carry, `[B, H]`
    leaves; `lstm_order` is "hc" (torch, equinox) or "ch" (flax)."""
    if kind == "lstm":
        if not isinstance(carry, tuple) or len(carry) != 2:
            raise ValueError(f"carry must be torch's LSTM carry (h, c), got "
                             f"{type(carry).__name__}")
        h, c = (_check_torch_leaf(f"carry[{i}]", part, hidden_size)
                for i, part in enumerate(carry))
        return (h, c) if lstm_order == "hc" else (c, h)
    return _check_torch_leaf("carry", carry, hidden_size)


def carry_to_torch(carry: Any, kind: str, *, lstm_order: str) -> Any:
    """One cell's carry (`[B, H]` leaves) in torch's layout, `[1, B, H]` leaves, `(h, c)`."""
    if kind == "lstm":
        first, second = carry
        h, c = (first, second) if lstm_order == "hc" else (second, first)
        return jnp.asarray(h)[None], jnp.asarray(c)[None]
    return jnp.asarray(carry)[None]


def _check_torch_leaf(name: str, leaf: Any, hidden_size: int) -> Array:
    leaf = jnp.asarray(leaf)
    if leaf.ndim != 3 or leaf.shape[0] != 1 or leaf.shape[2] != hidden_size:
        raise ValueError(f"{name} must have torch's shape [num_layers=1, B, H={hidden_size}], "
                         f"got {leaf.shape}")
    return leaf[0]

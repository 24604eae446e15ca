"""Elman, GRU and LSTM sequence models in JAX, laid out exactly as their `tbptt_torch` twins.

A model is a small frozen description with pure functions: `init(key) -> params`,
`initial_carry(batch_size) -> carry` and `apply(params, carry, xs) -> (carry, ys)` over a
time-major chunk. `params` is a flat dict whose keys and shapes are the `state_dict()` of
the matching torch model (`rnn.weight_ih_l0`, ..., `head.weight`, `head.bias`), so weights
cross frameworks by copying. The carry has torch's layout: LSTM `(h, c)`, each
`[num_layers, B, H]`; GRU and Elman `h[num_layers, B, H]`.

`apply` runs one layer at a time over the whole chunk, as cuDNN does: the input projection
of every step is one matrix product outside the recurrence, and the recurrence is the fast
layer of `tbptt_jax._kernels` (a `lax.scan` with a hand-written backward pass); the input
projections and the readout of the whole window are `_kernels.project`. `hidden_states` is
the stack without the readout (with torch's dropout between layers), for models of one's
own around it. `step` is the plain one-step reference, differentiated by JAX, that the
tests hold `apply` to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from tbptt.checks import check_int
from tbptt_jax import _kernels

Array = jax.Array
Params = dict[str, Array]
Carry = Any  # Array h[L, B, H] (Elman, GRU) or tuple (h, c) of them (LSTM)

GATES = {"elman": 1, "gru": 3, "lstm": 4}


def _hidden(layer_carry: Any, cell: str) -> Array:
    return layer_carry[0] if cell == "lstm" else layer_carry


@dataclass(frozen=True)
class RecurrentModel:
    """A stack of `num_layers` recurrent layers (`rnn.`) and a linear readout (`head.`).

    Attributes:
      cell: "elman", "gru" or "lstm".
      input_size: I, features of each input step.
      hidden_size: H, units of each recurrent layer.
      output_size: O, features of each output step.
      num_layers: L, stacked recurrent layers.
    """

    cell: str
    input_size: int
    hidden_size: int
    output_size: int
    num_layers: int = 1

    def __post_init__(self) -> None:
        if self.cell not in GATES:
            raise ValueError(f"cell must be one of {tuple(GATES)}, got {self.cell!r}")
        for name in ("input_size", "hidden_size", "output_size", "num_layers"):
            check_int(name, getattr(self, name))

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """The `state_dict()` keys and shapes of the matching torch model, in its order."""
        gates_h = GATES[self.cell] * self.hidden_size
        shapes = {}
        for layer in range(self.num_layers):
            layer_input = self.input_size if layer == 0 else self.hidden_size
            shapes[f"rnn.weight_ih_l{layer}"] = (gates_h, layer_input)
            shapes[f"rnn.weight_hh_l{layer}"] = (gates_h, self.hidden_size)
            shapes[f"rnn.bias_ih_l{layer}"] = (gates_h,)
            shapes[f"rnn.bias_hh_l{layer}"] = (gates_h,)
        shapes["head.weight"] = (self.output_size, self.hidden_size)
        shapes["head.bias"] = (self.output_size,)
        return shapes

    def init(self, key: Array, dtype: Any = None) -> Params:
        """Fresh parameters drawn as torch draws them: every entry U(-1/sqrt(H), 1/sqrt(H)),
        in `dtype` (default: JAX's default float type, float64 under `jax_enable_x64`).

        (torch.nn.RNN/GRU/LSTM use that bound for all their weights and biases; nn.Linear's
        kaiming-uniform(a=sqrt(5)) weight and its bias reduce to 1/sqrt(fan_in) = 1/sqrt(H).)
        """
        bound = 1.0 / math.sqrt(self.hidden_size)
        shapes = self.param_shapes()
        keys = jax.random.split(key, len(shapes))
        dtype = jnp.zeros((), dtype).dtype  # None: the default float type
        return {
            name: jax.random.uniform(k, shape, dtype, minval=-bound, maxval=bound)
            for k, (name, shape) in zip(keys, shapes.items(), strict=True)
        }

    def initial_carry(self, batch_size: int, dtype: Any = None) -> Carry:
        """The zero carry: `h[L, B, H]`, or `(h, c)` for the LSTM, in `dtype` (default:
        JAX's default float type, as `init`'s, so the two agree; the trainer's `carry=None`
        takes the parameters' dtype)."""
        h = jnp.zeros((self.num_layers, batch_size, self.hidden_size), dtype)
        return (h, h) if self.cell == "lstm" else h

    def _layer_carry(self, carry: Carry, layer: int) -> Any:
        return jax.tree.map(lambda part: part[layer], carry)

    def _stack_layers(self, layer_carries: list[Any]) -> Carry:
        return jax.tree.map(lambda *parts: jnp.stack(parts), *layer_carries)

    def apply(
        self, params: Params, carry: Carry, xs: Array, resets: Array | None = None
    ) -> tuple[Carry, Array]:
        """Runs the model over a time-major chunk.

        Args:
          params: as returned by `init` (or converted from torch).
          carry: the state before the first step, see `initial_carry`.
          xs: inputs of shape `[T, B, I]`.
          resets: optional bool `[T, B]`; where true, that sequence's carry is replaced by
            zeros before that step.

        Returns:
          `(carry, ys)`: the state after the last step and outputs of shape `[T, B, O]`.
        """
        carry, hidden = self.hidden_states(params, carry, xs, resets)
        ys = _kernels.project(params["head.weight"], hidden, False)
        return carry, ys + params["head.bias"][None, None]

    def hidden_states(
        self, params: Params, carry: Carry, xs: Array, resets: Array | None = None, *,
        dropout: float = 0.0, key: Array | None = None
    ) -> tuple[Carry, Array]:
        """The recurrent layers alone, without the readout: the torch model's `.rnn`, for a
        model of one's own that reads the last layer's states (only the `rnn.` entries of
        `params` are read).

        Args:
          params, carry, xs, resets: as `apply` takes them.
          dropout: with a `key`, each layer's outputs but the last's are zeroed with this
            probability and the rest scaled by `1 / (1 - dropout)` before the next layer
            reads them: `torch.nn.LSTM(..., dropout=)` in training mode. Without a key,
            none (evaluation mode).
          key: a PRNG key for the dropout masks, e.g. the one the trainer hands `apply_fn`.

        Returns:
          `(carry, hs)`: the state after the last step and the last layer's hidden states
          `[T, B, H]`.
        """
        recurrent_layer = _kernels.layer(self.cell)
        layer_inputs = xs
        final_carries = []
        for layer in range(self.num_layers):
            if layer and key is not None and dropout > 0:
                layer_inputs = dropped(jax.random.fold_in(key, layer), layer_inputs, dropout)
            # One matrix product for the input projection of every step of the chunk (the
            # layer adds the biases).
            projected = _kernels.project(params[f"rnn.weight_ih_l{layer}"], layer_inputs,
                                         _kernels.gradients_shared(self.cell))
            layer_carry, layer_inputs = recurrent_layer(
                params[f"rnn.weight_hh_l{layer}"], params[f"rnn.bias_hh_l{layer}"],
                params[f"rnn.bias_ih_l{layer}"], projected, self._layer_carry(carry, layer),
                resets)
            final_carries.append(layer_carry)
        return self._stack_layers(final_carries), layer_inputs

    def step(
        self, params: Params, carry: Carry, x: Array, reset: Array | None = None
    ) -> tuple[Carry, Array]:
        """One time step through every layer and the readout: `x[B, I] -> y[B, O]`.

        The plain reference that `apply` must equal when looped over a chunk.
        """
        layer_input = x
        new_carries = []
        for layer in range(self.num_layers):
            layer_carry = _kernels.step(
                self.cell, params[f"rnn.weight_hh_l{layer}"], params[f"rnn.bias_hh_l{layer}"],
                params[f"rnn.bias_ih_l{layer}"], layer_input @ params[f"rnn.weight_ih_l{layer}"].T,
                self._layer_carry(carry, layer), reset)
            new_carries.append(layer_carry)
            layer_input = _hidden(layer_carry, self.cell)
        return self._stack_layers(new_carries), (
            layer_input @ params["head.weight"].T + params["head.bias"][None])


def dropped(key: Array, values: Array, rate: float) -> Array:
    """Inverted dropout, as `torch.nn.functional.dropout` in training mode: each element is
    zeroed with probability `rate`, the rest scaled by `1 / (1 - rate)`; a select, so a
    dropped NaN does not leak."""
    keep = jax.random.bernoulli(key, 1.0 - rate, values.shape)
    return jnp.where(keep, values / (1.0 - rate), jnp.zeros_like(values))


def elman(input_size: int, hidden_size: int, output_size: int, *, num_layers: int = 1
          ) -> RecurrentModel:
    """An Elman (tanh) RNN with a linear readout; the twin of `tbptt_torch.models.ElmanModel`."""
    return RecurrentModel("elman", input_size, hidden_size, output_size, num_layers)


def gru(input_size: int, hidden_size: int, output_size: int, *, num_layers: int = 1
        ) -> RecurrentModel:
    """A GRU with a linear readout; the twin of `tbptt_torch.models.GRUModel`."""
    return RecurrentModel("gru", input_size, hidden_size, output_size, num_layers)


def lstm(input_size: int, hidden_size: int, output_size: int, *, num_layers: int = 1
         ) -> RecurrentModel:
    """An LSTM with a linear readout; the twin of `tbptt_torch.models.LSTMModel`."""
    return RecurrentModel("lstm", input_size, hidden_size, output_size, num_layers)

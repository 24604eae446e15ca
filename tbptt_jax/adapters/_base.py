"""What every adapter shares: the scan of one cell over a chunk, resets, batch-major input,
and the conversion interface.

An adapter turns a library's one-step cell (`(carry, x[B, I]) -> (carry, h[B, H])`) and
optional readout into the `apply(params, carry, xs[, resets]) -> (carry, ys)` that
`tbptt_jax.tbptt_train_step` trains. A subclass says how to run one step and the readout
with a parameter tree, what the cell's initial carry is, and how its parameter tree maps
to the torch layout (`_layout`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tbptt_jax.adapters import _layout

Array = jax.Array
Params = Any
Carry = Any


class CellAdapter:
    """A library's recurrent cell and readout as a `tbptt_jax` model.

    `apply` runs the cell over a time-major chunk with `lax.scan` (the trainer's contract)
    and the readout over every step's output at once. Adapters compare by identity, so
    passing the same adapter's `apply` on every call keeps the trainer from recompiling.
    """

    def initial_carry(self, batch_size: int, dtype: Any = None) -> Carry:
        """The cell's own initial carry for `batch_size` sequences (cast to `dtype` if given);
        also what `resets` restore."""
        raise NotImplementedError

    def _step(self, params: Params, carry: Carry, x: Array) -> tuple[Carry, Array]:
        """One step of the cell: `x[B, I] -> (carry, h[B, H])`."""
        raise NotImplementedError

    def _readout(self, params: Params, hidden: Array) -> Array:
        """The readout over `[T, B, H]`, or `hidden` itself when there is none."""
        raise NotImplementedError

    def apply(self, params: Params, carry: Carry, xs: Array, resets: Array | None = None, *,
              time_major: bool = True) -> tuple[Carry, Array]:
        """Runs the cell and readout over a chunk.

        Args:
          params: the parameter tree (see the adapter's class docstring).
          carry: the state before the first step, as `initial_carry` makes it.
          xs: inputs `[T, B, I]`, or `[B, T, I]` with `time_major=False`.
          resets: optional bool `[T, B]` (`[B, T]` with `time_major=False`): where true, that
            sequence's carry is replaced by the initial carry before that step (a select,
            so a NaN in a finished sequence cannot leak into the next).
          time_major: False for batch-major `xs`, `resets` and `ys`. The trainer slices
            time on axis 0, so it needs the default; batch-major is for using the model
            outside the trainer.

        Returns:
          `(carry, ys)`: the state after the last step and the readout's outputs
          `[T, B, O]` (`[B, T, O]` with `time_major=False`; `[.., H]` without a readout).
        """
        xs = jnp.asarray(xs)
        if xs.ndim < 2:
            raise ValueError(f"xs must be [T, B, ...] (or [B, T, ...] with time_major=False), "
                             f"got shape {xs.shape}")
        if not time_major:
            xs = jnp.swapaxes(xs, 0, 1)
            resets = None if resets is None else jnp.swapaxes(jnp.asarray(resets), 0, 1)
        initial = None
        if resets is not None:
            resets = jnp.asarray(resets)
            if resets.shape != xs.shape[:2] or resets.dtype != np.bool_:
                raise ValueError(f"resets must be bool with the time and batch axes of xs, "
                                 f"{xs.shape[:2]} (time-major), got {resets.dtype} of shape "
                                 f"{resets.shape}")
            initial = jax.tree.map(lambda init, leaf: init.astype(leaf.dtype),
                                   self.initial_carry(xs.shape[1]), carry)

        def step(carry, inputs):
            x, reset = inputs
            if reset is not None:
                carry = jax.tree.map(
                    lambda leaf, init: jnp.where(
                        reset.reshape(reset.shape + (1,) * (leaf.ndim - 1)), init, leaf),
                    carry, initial)
            return self._step(params, carry, x)

        carry, hidden = jax.lax.scan(step, carry, (xs, resets))
        ys = self._readout(params, hidden)
        return carry, (ys if time_major else jnp.swapaxes(ys, 0, 1))

    # Conversion to and from the torch layout (`_layout`): subclasses supply the maps.

    def _torch_spec(self) -> tuple[_layout.CellSpec, _layout.HeadSpec | None]:
        raise NotImplementedError

    def _from_torch(self, torch_params: dict[str, Array]) -> Params:
        raise NotImplementedError

    def _to_torch(self, params: Params) -> dict[str, Array]:
        raise NotImplementedError

    def _redundant(self, cell: _layout.CellSpec) -> dict[str, np.ndarray]:
        raise NotImplementedError

    _lstm_order = "hc"

    def from_torch_layout(self, torch_params: Mapping[str, Any]) -> Params:
        """Converts torch-layout weights (`tbptt_torch.to_jax(model)`, or a `tbptt_jax.models`
        model's params; one layer) into this adapter's parameter tree.

        Raises `ValueError` naming the key if a key or shape is wrong, if the cell or readout
        has no torch twin (another activation, a residual connection, a non-linear readout),
        or if the torch weights hold a bias this library's cell lacks and it is not zero.
        """
        cell, head = self._torch_spec()
        arrays = _layout.check_torch_params(torch_params, cell, head)
        return self._from_torch(arrays)

    def to_torch_layout(self, params: Params) -> dict[str, Array]:
        """Converts this adapter's parameter tree (or a gradient of it) into the torch layout.

        A bias the library folds into one parameter (torch's `b_i* + b_h*`) goes wholly to
        `rnn.bias_ih_l0`; those entries of `rnn.bias_hh_l0` are zero (`redundant_torch_entries`
        marks them). Any split gives the same outputs; this one is what
        `from_torch_layout` maps back exactly.
        """
        return self._to_torch(params)

    def redundant_torch_entries(self) -> dict[str, np.ndarray]:
        """Bool masks over torch-layout entries this library holds no parameter of its own for:
        `{"rnn.bias_hh_l0": mask[G*H]}`, true where that bias is folded into `rnn.bias_ih_l0`
        (or absent from the cell). `to_torch_layout` sets them to zero.

        Torch trains both halves of a folded bias, so its sum moves by two gradient steps per
        update where the library's one parameter moves by one: to train a torch model the
        way the library trains the converted one, keep these entries at zero (e.g. a gradient
        hook multiplying by `~mask`).
        """
        return self._redundant(self._torch_spec()[0])

    def carry_from_torch(self, carry: Any) -> Carry:
        """A torch carry (`h[1, B, H]`, or `(h, c)` for an LSTM) as this cell's carry."""
        cell, _ = self._torch_spec()
        return _layout.carry_from_torch(carry, cell.kind, cell.hidden_size,
                                        lstm_order=self._lstm_order)

    def carry_to_torch(self, carry: Carry) -> Any:
        """This cell's carry in torch's layout: `h[1, B, H]`, or `(h, c)` for an LSTM."""
        cell, _ = self._torch_spec()
        return _layout.carry_to_torch(carry, cell.kind, lstm_order=self._lstm_order)

"""Adapters: models users already have, trained by `tbptt_jax.tbptt_train_step` as they are.

Any JAX function `apply(params, carry, xs[, resets]) -> (carry, ys)` over a time-major chunk
needs no adapter. For a library's recurrent cell (one step, which the caller scans) and
readout, `linen`, `nnx` and `equinox` build an adapter with `apply` (the scan, resets and
the readout), `initial_carry(batch_size)`, conversion of the parameters to and from the
torch layout (`from_torch_layout`, `to_torch_layout`, the flat dict of `tbptt_torch.to_jax`
and `tbptt_jax.models`) and of the carry (`carry_from_torch`, `carry_to_torch`).

flax and equinox are imported only when their adapter is built, so `tbptt_jax` imports
without them. docs/models.md has the conversion table and its traps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tbptt_jax.adapters._base import CellAdapter

if TYPE_CHECKING:
    from tbptt_jax.adapters._equinox import EquinoxAdapter
    from tbptt_jax.adapters._linen import LinenAdapter
    from tbptt_jax.adapters._nnx import NnxAdapter

__all__ = ["CellAdapter", "equinox", "linen", "nnx"]


def linen(cell: Any, *, input_size: int, readout: Any = None, carry_key: Any = None
          ) -> LinenAdapter:
    """A `flax.linen` RNN cell (e.g. `nn.LSTMCell(H)`) and optional readout (e.g.
    `nn.Dense(O)`) as a `tbptt_jax` model.

    Args:
      cell: a linen cell with the `RNNCellBase` contract: `(carry, x[B, I]) -> (carry,
        y[B, H])` and `initialize_carry(key, (B, I))`.
      input_size: I, features of each input step (linen infers shapes at `init`).
      readout: a linen module applied to the cell's outputs `[T, B, H]`; None returns them.
      carry_key: the key given to `cell.initialize_carry` (default `jax.random.key(0)`);
        the built-in cells' default `carry_init` (zeros) ignores it.

    Returns:
      A `LinenAdapter`: `init(key)`, `initial_carry(B)`, `apply`, and the conversions.
    """
    from tbptt_jax.adapters._linen import LinenAdapter

    return LinenAdapter(cell, input_size=input_size, readout=readout, carry_key=carry_key)


def nnx(cell: Any, readout: Any = None) -> NnxAdapter:
    """A `flax.nnx` RNN cell (e.g. `nnx.LSTMCell(I, H, rngs=...)`) and optional readout
    (e.g. `nnx.Linear(H, O, rngs=...)`) as a `tbptt_jax` model.

    Args:
      cell: an nnx cell with the `RNNCellBase` contract: `(carry, x[B, I]) -> (carry,
        y[B, H])`, `initialize_carry((B, I), rngs)` and an `in_features` attribute.
      readout: an nnx module applied to the cell's outputs `[T, B, H]`; None returns them.

    Returns:
      An `NnxAdapter`: `params` (the modules' weights), `modules(params)`, `init(key)`,
      `initial_carry(B)`, `apply`, and the conversions.
    """
    from tbptt_jax.adapters._nnx import NnxAdapter

    return NnxAdapter(cell, readout)


def equinox(cell: Any, readout: Any = None) -> EquinoxAdapter:
    """An Equinox cell (e.g. `eqx.nn.LSTMCell(I, H, key=...)`) and optional readout (e.g.
    `eqx.nn.Linear(H, O, key=...)`) as a `tbptt_jax` model.

    Args:
      cell: an Equinox cell, one sequence at a time: `cell(x[I], carry) -> carry`, with a
        `hidden_size` attribute; its carry is `h[H]`, or `(h, c)` for `eqx.nn.LSTMCell`
        (whose `h` the readout sees). The adapter maps it over the batch.
      readout: an Equinox module applied to each step's `h[H]`; None returns `h`.

    Returns:
      An `EquinoxAdapter`: `params` (the modules' arrays), `modules(params)`, `init(key)`,
      `initial_carry(B)`, `apply`, and the conversions.
    """
    from tbptt_jax.adapters._equinox import EquinoxAdapter

    return EquinoxAdapter(cell, readout)

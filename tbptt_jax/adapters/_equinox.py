"""The Equinox adapter: an Equinox cell and readout as a `tbptt_jax` model.

Equinox modules are pytrees that hold their weights; the adapter partitions them
(`eqx.partition(..., eqx.is_array)`) into the arrays, which are the parameters, and the
rest, which `apply` combines back. Equinox cells see one sequence at a time
(`cell(x[I], carry) -> carry`), so `apply` maps the cell over the batch (`jax.vmap`) and
the readout over time and batch. `eqx.nn.LSTMCell` and `eqx.nn.GRUCell` and an
`eqx.nn.Linear` readout also convert to and from the torch layout.

Equinox and torch: the weights keep torch's `[out, in]` layout and gate order.

- LSTMCell: `weight_ih [4H, I]`, `weight_hh [4H, H]`, one `bias = b_ih + b_hh`; gates i,
  f, g, o; carry `(h, c)` as torch's.
- GRUCell: `weight_ih [3H, I]`, `weight_hh [3H, H]`, `bias = [b_ir + b_hr, b_iz + b_hz,
  b_in]` and a separate `bias_n = b_hn`: n = tanh(W_in x + b_in + r * (W_hn h + bias_n)),
  h' = n + z * (h - n) = (1 - z) * n + z * h, as torch.
- A cell or readout built with `use_bias=False` converts only from torch biases that are
  zero (or, for a folded bias, sum to zero).
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from tbptt_jax.adapters import _layout
from tbptt_jax.adapters._base import Array, Carry, CellAdapter, Params


class EquinoxAdapter(CellAdapter):
    """An Equinox cell and optional readout; see `tbptt_jax.adapters.equinox`.

    `params` is `{"cell": <the cell's arrays>, "readout": <the readout's>}` (no "readout" key
    without a readout): each the module with its arrays kept and every other field None
    (`eqx.filter(module, eqx.is_array)`), e.g. for `GRUCell` a `GRUCell` whose `weight_ih`,
    `weight_hh`, `bias` and `bias_n` are the parameters.
    """

    def __init__(self, cell: eqx.Module, readout: eqx.Module | None = None) -> None:
        if not isinstance(cell, eqx.Module):
            raise ValueError(f"cell must be an equinox Module, got {type(cell).__name__}")
        if readout is not None and not isinstance(readout, eqx.Module):
            raise ValueError(f"readout must be an equinox Module or None, got "
                             f"{type(readout).__name__}")
        hidden_size = getattr(cell, "hidden_size", None)
        if not isinstance(hidden_size, int):
            raise ValueError(f"cell must have an int hidden_size, got {hidden_size!r}")
        self.hidden_size = hidden_size
        cell_params, self._cell_rest = eqx.partition(cell, eqx.is_array)
        # The arrays the modules held when the adapter was built.
        self.params: Params = {"cell": cell_params}
        self._readout_rest = None
        if readout is not None:
            self.params["readout"], self._readout_rest = eqx.partition(readout, eqx.is_array)
        self._cell_template, self._readout_template = cell, readout
        leaves = jax.tree.leaves(cell_params)
        self._dtype = leaves[0].dtype if leaves else jnp.float32

    def modules(self, params: Params) -> tuple[eqx.Module, eqx.Module | None]:
        """New `(cell, readout)` modules holding `params` (e.g. after training)."""
        cell = eqx.combine(params["cell"], self._cell_rest)
        readout = (None if self._readout_template is None
                   else eqx.combine(params["readout"], self._readout_rest))
        return cell, readout

    def init(self, key: Array) -> Params:
        """The arrays the modules held when the adapter was built. Equinox draws weights when
        a module is constructed, from its `key`: to draw others, build the module with
        another key. `key` is unused, kept so every adapter has `init(key)`."""
        del key
        return jax.tree.map(jnp.array, self.params)

    def initial_carry(self, batch_size: int, dtype: Any = None) -> Carry:
        """Zeros: `h[B, H]`, or `(h, c)` for `eqx.nn.LSTMCell`, in the cell's dtype."""
        h = jnp.zeros((batch_size, self.hidden_size), self._dtype if dtype is None else dtype)
        return (h, h) if isinstance(self._cell_template, eqx.nn.LSTMCell) else h

    def _step(self, params: Params, carry: Carry, x: Array) -> tuple[Carry, Array]:
        cell = eqx.combine(params["cell"], self._cell_rest)
        carry = jax.vmap(cell)(x, carry)
        # An LSTM's carry is (h, c); the readout and the next layer see h.
        return carry, (carry[0] if isinstance(carry, tuple) else carry)

    def _readout(self, params: Params, hidden: Array) -> Array:
        if self._readout_template is None:
            return hidden
        readout = eqx.combine(params["readout"], self._readout_rest)
        return jax.vmap(jax.vmap(readout))(hidden)

    def _torch_spec(self) -> tuple[_layout.CellSpec, _layout.HeadSpec | None]:
        cell = self._cell_template
        kinds = {eqx.nn.LSTMCell: "lstm", eqx.nn.GRUCell: "gru"}
        kind = kinds.get(type(cell))
        if kind is None:
            raise ValueError(f"the torch layout converts equinox.nn.LSTMCell and GRUCell; got "
                             f"cell of type {type(cell).__name__}")
        spec = _layout.CellSpec(kind, cell.input_size, cell.hidden_size)
        readout = self._readout_template
        if readout is None:
            return spec, None
        if type(readout) is not eqx.nn.Linear or not isinstance(readout.out_features, int):
            raise ValueError(f"the torch layout's readout is linear: readout must be "
                             f"equinox.nn.Linear with int out_features, got "
                             f"{type(readout).__name__}")
        return spec, _layout.HeadSpec(readout.out_features, readout.use_bias)

    def _redundant(self, cell: _layout.CellSpec) -> dict[str, np.ndarray]:
        tied = (0, 1, 2, 3) if cell.kind == "lstm" else (0, 1)
        return _layout.redundant_entries(cell, tied)

    def _from_torch(self, torch_params: dict[str, Array]) -> Params:
        cell, head = self._torch_spec()
        hidden = cell.hidden_size
        b_ih, b_hh = torch_params[_layout.B_IH], torch_params[_layout.B_HH]
        if cell.kind == "lstm":
            biases = {"bias": b_ih + b_hh}
        else:
            biases = {"bias": jnp.concatenate([b_ih[:2 * hidden] + b_hh[:2 * hidden],
                                               b_ih[2 * hidden:]]),
                      "bias_n": b_hh[2 * hidden:]}
        if not self._cell_template.use_bias:
            for name, bias in biases.items():
                _layout.require_zero(f"the torch biases that make the cell's {name}", bias,
                                     "the cell was built with use_bias=False")
            biases = {}
        cell_params = self.params["cell"]
        names = ["weight_ih", "weight_hh", *biases]
        values = [torch_params[_layout.W_IH], torch_params[_layout.W_HH], *biases.values()]
        params = {"cell": eqx.tree_at(lambda c: [getattr(c, n) for n in names], cell_params,
                                      values)}
        if head is not None:
            readout = self.params["readout"]
            if head.use_bias:
                params["readout"] = eqx.tree_at(lambda r: (r.weight, r.bias), readout,
                                                (torch_params[_layout.HEAD_W],
                                                 torch_params[_layout.HEAD_B]))
            else:
                _layout.require_zero(_layout.HEAD_B, torch_params[_layout.HEAD_B],
                                     "the readout was built with use_bias=False")
                params["readout"] = eqx.tree_at(lambda r: r.weight, readout,
                                                torch_params[_layout.HEAD_W])
        return params

    def _to_torch(self, params: Params) -> dict[str, Array]:
        cell, head = self._torch_spec()
        p = params["cell"]
        gates_h = _layout.GATES[cell.kind] * cell.hidden_size
        zeros = jnp.zeros((gates_h,), p.weight_hh.dtype)
        b_ih, b_hh = zeros, zeros
        if self._cell_template.use_bias:
            b_ih = p.bias
            if cell.kind == "gru":
                b_hh = jnp.concatenate([zeros[:2 * cell.hidden_size], p.bias_n])
        torch_params = {_layout.W_IH: p.weight_ih, _layout.W_HH: p.weight_hh,
                        _layout.B_IH: b_ih, _layout.B_HH: b_hh}
        if head is not None:
            r = params["readout"]
            torch_params[_layout.HEAD_W] = r.weight
            torch_params[_layout.HEAD_B] = (r.bias if head.use_bias
                                            else jnp.zeros(r.weight.shape[:1], r.weight.dtype))
        return torch_params

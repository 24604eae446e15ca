"""The `flax.nnx` adapter: an nnx RNN cell and readout as a `tbptt_jax` model.

nnx modules hold their weights, so the adapter splits them once (`nnx.split`) into a
graph and the parameters as a plain nested dict (`nnx.to_pure_dict`), which the trainer
and optax handle as any pytree; `apply` merges them back for each trace. Any nnx cell with
the `RNNCellBase` contract trains; the built-in `LSTMCell`, `OptimizedLSTMCell`, `GRUCell`
and `SimpleCell` (default activations) and a `Linear` readout also convert.

The nnx cells and torch (kernels `[in, out]`, the transpose of torch's blocks):

- LSTMCell: as linen's, the gate named `if_` (not `if`): `ii, if_, ig, io` (kernel) on x,
  `hi, hf, hg, ho` (kernel, bias `b_i* + b_h*`) on h. Carry `(c, h)`.
- OptimizedLSTMCell: `dense_i` (kernel `[I, 4H]`) and `dense_h` (kernel `[H, 4H]`, bias
  `b_ih + b_hh`), gates i, f, g, o along the last axis as torch's rows. Carry `(c, h)`.
- GRUCell: `dense_i` (kernel `[I, 3H]`, bias `[b_ir + b_hr, b_iz + b_hz, b_in]`) and
  `dense_h` (kernel `[H, 3H]`, no bias). Its code computes n = tanh(W_in x + b_in +
  r * (W_hn h)): there is no b_hn (its docstring shows one), so a torch GRU converts
  exactly only when b_hn is zero, and `from_torch_layout` raises otherwise.
- SimpleCell: `dense_i` (kernel, bias `b_ih + b_hh`), `dense_h` (kernel).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tbptt_jax.adapters import _layout
from tbptt_jax.adapters._base import Array, Carry, CellAdapter, Params

_LSTM_GATES = (("ii", "hi"), ("if_", "hf"), ("ig", "hg"), ("io", "ho"))


class NnxAdapter(CellAdapter):
    """An `flax.nnx` cell and optional readout; see `tbptt_jax.adapters.nnx`.

    `params` is `{"cell": <the cell's nnx.Param state as a pure dict>, "readout": <the
    readout's>}` (no "readout" key without a readout), e.g. for `GRUCell(I, H)` and
    `Linear(H, O)`: `{"cell": {"dense_i": {"kernel": [I, 3H], "bias": [3H]}, "dense_h":
    {"kernel": [H, 3H]}}, "readout": {"kernel": [H, O], "bias": [O]}}`.
    """

    _lstm_order = "ch"

    def __init__(self, cell: nnx.Module, readout: nnx.Module | None = None) -> None:
        if not isinstance(cell, nnx.Module):
            raise ValueError(f"cell must be a flax.nnx Module, got {type(cell).__name__}")
        if readout is not None and not isinstance(readout, nnx.Module):
            raise ValueError(f"readout must be a flax.nnx Module or None, got "
                             f"{type(readout).__name__}")
        input_size = getattr(cell, "in_features", None)
        if not isinstance(input_size, int):
            raise ValueError(f"cell must have an int in_features (its input size I), got "
                             f"{input_size!r}")
        self.input_size = input_size
        self._cell_type, self._readout_type = type(cell), type(readout)
        self._cell_attrs = {name: getattr(cell, name, None) for name in (
            "hidden_features", "gate_fn", "activation_fn", "residual")}
        self._readout_attrs = {name: getattr(readout, name, None) for name in (
            "out_features", "use_bias")}
        self._cell_graph, cell_params, self._cell_rest = nnx.split(cell, nnx.Param, ...)
        self._initial_cell = cell
        # The weights the modules held when the adapter was built.
        self.params: Params = {"cell": nnx.to_pure_dict(cell_params)}
        if readout is not None:
            self._readout_graph, readout_params, self._readout_rest = nnx.split(
                readout, nnx.Param, ...)
            self.params["readout"] = nnx.to_pure_dict(readout_params)
        self._has_readout = readout is not None

    def modules(self, params: Params) -> tuple[nnx.Module, nnx.Module | None]:
        """New `(cell, readout)` modules holding `params` (e.g. after training)."""
        cell = nnx.merge(self._cell_graph, params["cell"], self._cell_rest)
        readout = (nnx.merge(self._readout_graph, params["readout"], self._readout_rest)
                   if self._has_readout else None)
        return cell, readout

    def init(self, key: Array) -> Params:
        """The weights the modules held when the adapter was built. nnx draws weights when a
        module is constructed, from its `rngs`: to draw others, build the module with
        `nnx.Rngs(key)`. `key` is unused, kept so every adapter has `init(key)`."""
        del key
        return jax.tree.map(jnp.array, self.params)

    def initial_carry(self, batch_size: int, dtype: Any = None) -> Carry:
        """`cell.initialize_carry((batch_size, I))`: `[B, H]` leaves, `(c, h)` for the LSTM
        cells; zeros unless the cell was built with another `carry_init`."""
        carry = self._initial_cell.initialize_carry((batch_size, self.input_size),
                                                    rngs=nnx.Rngs(carry=0))
        return carry if dtype is None else jax.tree.map(lambda a: a.astype(dtype), carry)

    def _step(self, params: Params, carry: Carry, x: Array) -> tuple[Carry, Array]:
        cell = nnx.merge(self._cell_graph, params["cell"], self._cell_rest)
        return cell(carry, x)

    def _readout(self, params: Params, hidden: Array) -> Array:
        if not self._has_readout:
            return hidden
        return nnx.merge(self._readout_graph, params["readout"], self._readout_rest)(hidden)

    def _torch_spec(self) -> tuple[_layout.CellSpec, _layout.HeadSpec | None]:
        kinds = {nnx.LSTMCell: "lstm", nnx.OptimizedLSTMCell: "lstm", nnx.GRUCell: "gru",
                 nnx.SimpleCell: "elman"}
        kind = kinds.get(self._cell_type)
        if kind is None:
            raise ValueError(f"the torch layout converts flax.nnx LSTMCell, OptimizedLSTMCell, "
                             f"GRUCell and SimpleCell; got cell of type "
                             f"{self._cell_type.__name__}")
        attrs = self._cell_attrs
        if kind != "elman" and attrs["gate_fn"] is not nnx.sigmoid:
            raise ValueError(f"cell.gate_fn must be sigmoid for torch's {kind}, got "
                             f"{attrs['gate_fn']}")
        if attrs["activation_fn"] is not nnx.tanh:
            raise ValueError(f"cell.activation_fn must be tanh for torch's {kind}, got "
                             f"{attrs['activation_fn']}")
        if kind == "elman" and attrs["residual"]:
            raise ValueError("cell.residual must be False: torch's RNN has no residual term")
        spec = _layout.CellSpec(kind, self.input_size, attrs["hidden_features"])
        if not self._has_readout:
            return spec, None
        if self._readout_type is not nnx.Linear:
            raise ValueError(f"the torch layout's readout is linear: readout must be "
                             f"flax.nnx.Linear, got {self._readout_type.__name__}")
        attrs = self._readout_attrs
        return spec, _layout.HeadSpec(attrs["out_features"], attrs["use_bias"])

    def _redundant(self, cell: _layout.CellSpec) -> dict[str, np.ndarray]:
        if cell.kind == "gru":
            return _layout.redundant_entries(cell, tied=(0, 1), absent=(2,))
        return _layout.redundant_entries(cell, tied=(0, 1, 2, 3) if cell.kind == "lstm"
                                         else (0,))

    def _from_torch(self, torch_params: dict[str, Array]) -> Params:
        cell, head = self._torch_spec()
        kind = cell.kind
        w_ih, w_hh = torch_params[_layout.W_IH], torch_params[_layout.W_HH]
        b_ih, b_hh = torch_params[_layout.B_IH], torch_params[_layout.B_HH]
        if kind == "gru":
            hidden = cell.hidden_size
            _layout.require_zero(
                f"{_layout.B_HH}[{2 * hidden}:{3 * hidden}] (b_hn, the n gate's hidden bias)",
                b_hh[2 * hidden:], "flax.nnx.GRUCell has no b_hn: it computes n = tanh(W_in x "
                "+ b_in + r * (W_hn h)); use flax.linen.GRUCell or equinox's GRUCell, which "
                "keep it")
            bias = jnp.concatenate([b_ih[:2 * hidden] + b_hh[:2 * hidden], b_ih[2 * hidden:]])
            cell_params = {"dense_i": {"kernel": w_ih.T, "bias": bias},
                           "dense_h": {"kernel": w_hh.T}}
        elif kind == "elman" or self._cell_type is nnx.OptimizedLSTMCell:
            cell_params = {"dense_i": {"kernel": w_ih.T}, "dense_h": {"kernel": w_hh.T}}
            cell_params["dense_h" if kind == "lstm" else "dense_i"]["bias"] = b_ih + b_hh
        else:
            cell_params = {}
            blocks = zip(*(_layout.gate_blocks(torch_params[name], kind) for name in (
                _layout.W_IH, _layout.W_HH, _layout.B_IH, _layout.B_HH)), strict=True)
            for (x_name, h_name), (wi, wh, bi, bh) in zip(_LSTM_GATES, blocks, strict=True):
                cell_params[x_name] = {"kernel": wi.T}
                cell_params[h_name] = {"kernel": wh.T, "bias": bi + bh}
        params = {"cell": cell_params}
        if head is not None:
            params["readout"] = _layout.dense_from_torch(torch_params, head)
        return params

    def _to_torch(self, params: Params) -> dict[str, Array]:
        cell, head = self._torch_spec()
        p = params["cell"]
        if self._cell_type is nnx.LSTMCell:
            w_ih = jnp.concatenate([p[x_name]["kernel"].T for x_name, _ in _LSTM_GATES])
            w_hh = jnp.concatenate([p[h_name]["kernel"].T for _, h_name in _LSTM_GATES])
            b_ih = jnp.concatenate([p[h_name]["bias"] for _, h_name in _LSTM_GATES])
        else:
            w_ih, w_hh = p["dense_i"]["kernel"].T, p["dense_h"]["kernel"].T
            b_ih = p["dense_h" if cell.kind == "lstm" else "dense_i"]["bias"]
        torch_params = {_layout.W_IH: w_ih, _layout.W_HH: w_hh, _layout.B_IH: b_ih,
                        _layout.B_HH: jnp.zeros_like(b_ih)}
        if head is not None:
            torch_params.update(_layout.dense_to_torch(params["readout"], head))
        return torch_params

"""The `flax.linen` adapter: a linen RNN cell and readout as a `tbptt_jax` model.

Any linen cell with the `RNNCellBase` contract (`cell.apply(variables, carry, x[B, I]) ->
(carry, y[B, H])`, `cell.initialize_carry(key, (B, I))`) trains as it is; the built-in
`LSTMCell`, `OptimizedLSTMCell`, `GRUCell` and `SimpleCell` (with the default activations)
and a `Dense` readout also convert to and from the torch layout.

The linen cells and torch, gate by gate (W* x is `x @ kernel`, the kernel `[in, out]` the
transpose of torch's `[out, in]` block):

- LSTMCell / OptimizedLSTMCell: one `Dense` per gate, `ii, if, ig, io` (kernel only) on x
  and `hi, hf, hg, ho` (kernel and bias) on h. Bias `h*.bias = b_i* + b_h*`. Carry `(c, h)`,
  torch's is `(h, c)`.
- GRUCell: `ir, iz, in` (kernel, bias) on x, `hr, hz` (kernel) and `hn` (kernel, bias) on h:
  r = sigmoid(W_ir x + b_ir + W_hr h), z likewise, n = tanh(W_in x + b_in + r * (W_hn h +
  b_hn)), h' = (1 - z) * n + z * h, as torch. `ir.bias = b_ir + b_hr`, `iz.bias = b_iz +
  b_hz`; `in.bias = b_in` and `hn.bias = b_hn` stay apart (r multiplies only b_hn).
- SimpleCell: `i` (kernel, bias) on x, `h` (kernel) on h; `i.bias = b_ih + b_hh`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import activation

from tbptt.checks import check_int
from tbptt_jax.adapters import _layout
from tbptt_jax.adapters._base import Array, Carry, CellAdapter, Params

_LSTM_GATES = ("i", "f", "g", "o")
_GRU_GATES = ("r", "z", "n")


class LinenAdapter(CellAdapter):
    """A `flax.linen` cell and optional readout; see `tbptt_jax.adapters.linen`.

    `params` is `{"cell": <the cell's "params" collection>, "readout": <the readout's>}`
    (no "readout" key without a readout), e.g. for `LSTMCell(H)` and `Dense(O)`:
    `{"cell": {"ii": {"kernel": [I, H]}, ..., "hi": {"kernel": [H, H], "bias": [H]}, ...},
    "readout": {"kernel": [H, O], "bias": [O]}}`.
    """

    _lstm_order = "ch"

    def __init__(self, cell: nn.Module, *, input_size: int, readout: nn.Module | None = None,
                 carry_key: Array | None = None) -> None:
        if not isinstance(cell, nn.Module):
            raise ValueError(f"cell must be a flax.linen Module, got {type(cell).__name__}")
        if readout is not None and not isinstance(readout, nn.Module):
            raise ValueError(f"readout must be a flax.linen Module or None, got "
                             f"{type(readout).__name__}")
        self.cell, self.readout = cell, readout
        self.input_size = check_int("input_size", input_size)
        # initialize_carry takes a key; the built-in cells' default carry_init ignores it.
        self._carry_key = jax.random.key(0) if carry_key is None else carry_key

    def init(self, key: Array) -> Params:
        """Fresh parameters, drawn by the cell's and readout's own initializers."""
        cell_key, readout_key = jax.random.split(key)
        x = jnp.zeros((1, self.input_size))
        carry = self.cell.initialize_carry(self._carry_key, x.shape)
        params = {"cell": self.cell.init(cell_key, carry, x)["params"]}
        if self.readout is not None:
            _, hidden = jax.eval_shape(self.cell.apply, {"params": params["cell"]}, carry, x)
            params["readout"] = self.readout.init(
                readout_key, jnp.zeros(hidden.shape, hidden.dtype))["params"]
        return params

    def initial_carry(self, batch_size: int, dtype: Any = None) -> Carry:
        """`cell.initialize_carry(carry_key, (batch_size, input_size))`: `[B, H]` leaves,
        `(c, h)` for the LSTM cells."""
        carry = self.cell.initialize_carry(self._carry_key, (batch_size, self.input_size))
        return carry if dtype is None else jax.tree.map(lambda a: a.astype(dtype), carry)

    def _step(self, params: Params, carry: Carry, x: Array) -> tuple[Carry, Array]:
        return self.cell.apply({"params": params["cell"]}, carry, x)

    def _readout(self, params: Params, hidden: Array) -> Array:
        if self.readout is None:
            return hidden
        return self.readout.apply({"params": params["readout"]}, hidden)

    def _torch_spec(self) -> tuple[_layout.CellSpec, _layout.HeadSpec | None]:
        cell = self.cell
        kinds = {nn.LSTMCell: "lstm", nn.OptimizedLSTMCell: "lstm", nn.GRUCell: "gru",
                 nn.SimpleCell: "elman"}
        kind = kinds.get(type(cell))
        if kind is None:
            raise ValueError(f"the torch layout converts flax.linen LSTMCell, "
                             f"OptimizedLSTMCell, GRUCell and SimpleCell; got cell of type "
                             f"{type(cell).__name__}")
        if kind != "elman" and cell.gate_fn is not activation.sigmoid:
            raise ValueError(f"cell.gate_fn must be sigmoid for torch's {kind}, got "
                             f"{cell.gate_fn}")
        if cell.activation_fn is not activation.tanh:
            raise ValueError(f"cell.activation_fn must be tanh for torch's {kind}, got "
                             f"{cell.activation_fn}")
        if kind == "elman" and cell.residual:
            raise ValueError("cell.residual must be False: torch's RNN has no residual term")
        spec = _layout.CellSpec(kind, self.input_size, cell.features)
        if self.readout is None:
            return spec, None
        if type(self.readout) is not nn.Dense:
            raise ValueError(f"the torch layout's readout is linear: readout must be "
                             f"flax.linen.Dense, got {type(self.readout).__name__}")
        return spec, _layout.HeadSpec(self.readout.features, self.readout.use_bias)

    def _redundant(self, cell: _layout.CellSpec) -> dict[str, np.ndarray]:
        tied = {"lstm": (0, 1, 2, 3), "gru": (0, 1), "elman": (0,)}[cell.kind]
        return _layout.redundant_entries(cell, tied)

    def _from_torch(self, torch_params: dict[str, Array]) -> Params:
        cell, head = self._torch_spec()
        kind = cell.kind
        w_ih = _layout.gate_blocks(torch_params[_layout.W_IH], kind)
        w_hh = _layout.gate_blocks(torch_params[_layout.W_HH], kind)
        b_ih = _layout.gate_blocks(torch_params[_layout.B_IH], kind)
        b_hh = _layout.gate_blocks(torch_params[_layout.B_HH], kind)
        if kind == "lstm":
            cell_params = {}
            for gate, wi, wh, bi, bh in zip(_LSTM_GATES, w_ih, w_hh, b_ih, b_hh, strict=True):
                cell_params["i" + gate] = {"kernel": wi.T}
                cell_params["h" + gate] = {"kernel": wh.T, "bias": bi + bh}
        elif kind == "gru":
            (wir, wiz, win), (whr, whz, whn) = w_ih, w_hh
            (bir, biz, bin_), (bhr, bhz, bhn) = b_ih, b_hh
            cell_params = {"ir": {"kernel": wir.T, "bias": bir + bhr},
                           "iz": {"kernel": wiz.T, "bias": biz + bhz},
                           "in": {"kernel": win.T, "bias": bin_},
                           "hr": {"kernel": whr.T}, "hz": {"kernel": whz.T},
                           "hn": {"kernel": whn.T, "bias": bhn}}
        else:
            cell_params = {"i": {"kernel": w_ih[0].T, "bias": b_ih[0] + b_hh[0]},
                           "h": {"kernel": w_hh[0].T}}
        params = {"cell": cell_params}
        if head is not None:
            params["readout"] = _layout.dense_from_torch(torch_params, head)
        return params

    def _to_torch(self, params: Params) -> dict[str, Array]:
        cell, head = self._torch_spec()
        p = params["cell"]
        if cell.kind == "lstm":
            w_ih = [p["i" + gate]["kernel"].T for gate in _LSTM_GATES]
            w_hh = [p["h" + gate]["kernel"].T for gate in _LSTM_GATES]
            b_ih = [p["h" + gate]["bias"] for gate in _LSTM_GATES]
            b_hh = [jnp.zeros_like(bias) for bias in b_ih]
        elif cell.kind == "gru":
            w_ih = [p["i" + gate]["kernel"].T for gate in _GRU_GATES]
            w_hh = [p["h" + gate]["kernel"].T for gate in _GRU_GATES]
            b_ih = [p["i" + gate]["bias"] for gate in _GRU_GATES]
            b_hh = [jnp.zeros_like(b_ih[0]), jnp.zeros_like(b_ih[1]), p["hn"]["bias"]]
        else:
            w_ih, w_hh = [p["i"]["kernel"].T], [p["h"]["kernel"].T]
            b_ih, b_hh = [p["i"]["bias"]], [jnp.zeros_like(p["i"]["bias"])]
        torch_params = {_layout.W_IH: jnp.concatenate(w_ih), _layout.W_HH: jnp.concatenate(w_hh),
                        _layout.B_IH: jnp.concatenate(b_ih), _layout.B_HH: jnp.concatenate(b_hh)}
        if head is not None:
            torch_params.update(_layout.dense_to_torch(params["readout"], head))
        return torch_params


"""Checking a port of your own: a GRU forecaster written in PyTorch, ported to JAX by hand,
and checked with one call of `tbptt_parity.compare`.

`Forecaster` is an ordinary torch module (an `nn.GRU` named `gru` and an `nn.Linear` named
`readout`); `forecaster_apply` is its JAX port, reading the weights by the module's
`state_dict()` names. `wrong_forecaster_apply` is the same port with the classic GRU slip:
the reset gate multiplies `W_hn h` alone, `r * (W_hn h) + b_hn`, where torch computes
`r * (W_hn h + b_hn)`. The forward pass differs only through `b_hn`, so the outputs look
plausible and training "works"; the check finds it at the first update and names
`gru.bias_hh_l0`, the parameter whose gradient is furthest apart.

Run:

    .venv/bin/python examples/port_check.py

The same checks from the command line (exit status 1 on divergence):

    .venv/bin/tbptt parity examples/port_check.py:Forecaster \\
        examples/port_check.py:forecaster_apply
    .venv/bin/tbptt parity examples/port_check.py:Forecaster \\
        examples/port_check.py:wrong_forecaster_apply
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn

import tbptt_parity


class Forecaster(nn.Module):
    """A GRU over `[T, B, input_size]` and a linear readout to `[T, B, output_size]`."""

    def __init__(self, input_size: int = 3, hidden_size: int = 8, output_size: int = 2
                 ) -> None:
        super().__init__()
        self.gru = nn.GRU(input_size, hidden_size)
        self.readout = nn.Linear(hidden_size, output_size)

    def initial_carry(self, batch_size: int) -> torch.Tensor:
        """The zero state `h[1, B, H]`."""
        return self.readout.weight.new_zeros(1, batch_size, self.gru.hidden_size)

    def forward(self, xs: torch.Tensor, carry: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, carry = self.gru(xs, carry)
        return self.readout(hidden), carry


def _gru_apply(params: dict, carry: jax.Array, xs: jax.Array, *, reset_inside: bool
               ) -> tuple[jax.Array, jax.Array]:
    """The port: `carry` h[1, B, H], `xs` [T, B, I] -> (h[1, B, H], preds [T, B, O]).

    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr),  z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn)),  h' = (1 - z) * n + z * h
    (with `reset_inside=False`, the slip: n = tanh(W_in x + b_in + r * (W_hn h) + b_hn)).
    """
    w_ih, b_ih = params["gru.weight_ih_l0"], params["gru.bias_ih_l0"]
    w_hh, b_hh = params["gru.weight_hh_l0"], params["gru.bias_hh_l0"]
    w_hr, w_hz, w_hn = jnp.split(w_hh, 3)
    b_hr, b_hz, b_hn = jnp.split(b_hh, 3)

    # Biases as [1, H] rows, explicitly broadcast over the batch (no implicit rank promotion).
    b_ih, b_hr, b_hz, b_hn = b_ih[None], b_hr[None], b_hz[None], b_hn[None]

    def step(h, x):
        x_r, x_z, x_n = jnp.split(x @ w_ih.T + b_ih, 3, axis=-1)
        r = jax.nn.sigmoid(x_r + h @ w_hr.T + b_hr)
        z = jax.nn.sigmoid(x_z + h @ w_hz.T + b_hz)
        if reset_inside:
            n = jnp.tanh(x_n + r * (h @ w_hn.T + b_hn))
        else:
            n = jnp.tanh(x_n + r * (h @ w_hn.T) + b_hn)
        h = (1 - z) * n + z * h
        return h, h

    h, hidden = jax.lax.scan(step, carry[0], xs)
    preds = hidden @ params["readout.weight"].T + params["readout.bias"][None, None]
    return h[None], preds


def forecaster_apply(params: dict, carry: jax.Array, xs: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
    """The correct JAX port of `Forecaster`."""
    return _gru_apply(params, carry, xs, reset_inside=True)


def wrong_forecaster_apply(params: dict, carry: jax.Array, xs: jax.Array
                           ) -> tuple[jax.Array, jax.Array]:
    """The port with the reset gate outside `W_hn h + b_hn`."""
    return _gru_apply(params, carry, xs, reset_inside=False)


def main() -> int:
    torch.manual_seed(0)
    model = Forecaster()
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((40, 4, 3))  # [T, B, I]
    ys = np.tanh(np.cumsum(xs, axis=0)[..., :2] / 4)  # [T, B, O]: a running sum, squashed

    checks = {}
    for name, apply_fn in (("forecaster_apply", forecaster_apply),
                           ("wrong_forecaster_apply", wrong_forecaster_apply)):
        report = tbptt_parity.compare(model, apply_fn, xs=xs, ys=ys, k1=5, k2=8,
                                      optimizer="adam", lr=1e-2)
        print(f"== {name}\n{report}\n")
        checks[name] = report
    caught = (checks["forecaster_apply"].ok and checks["wrong_forecaster_apply"].update == 1)
    return 0 if caught else 1


if __name__ == "__main__":
    sys.exit(main())

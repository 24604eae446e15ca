"""Elman, GRU and LSTM sequence models in PyTorch, the twins of `tbptt_jax.models`.

Each is a `torch.nn.RNN/GRU/LSTM` (`.rnn`, time-major) followed by an `nn.Linear` readout
(`.head`), so `state_dict()` keys and shapes are exactly the JAX models' `params`. A window
without resets runs as one fused `nn.RNN/GRU/LSTM` call; resets split it at the steps where
some sequence restarts, and only there.
"""

from __future__ import annotations

import torch
from torch import nn

from tbptt.checks import check_int

Carry = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # h[L, B, H] or (h, c)


def _zero_rows(carry: Carry, reset: torch.Tensor) -> Carry:
    """Replaces the carry of the rows where `reset[B]` is true with zeros (a select, not a
    product, so a NaN in a finished sequence cannot leak)."""
    mask = reset.view(1, -1, 1)
    if isinstance(carry, tuple):
        return tuple(torch.where(mask, torch.zeros_like(part), part) for part in carry)
    return torch.where(mask, torch.zeros_like(carry), carry)


class RecurrentModel(nn.Module):
    """A stack of recurrent layers (`rnn`) and a linear readout (`head`) over `[T, B, I]`."""

    rnn_type: type[nn.RNNBase]

    def __init__(self, input_size: int, hidden_size: int, output_size: int,
                 num_layers: int = 1) -> None:
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size),
                            ("output_size", output_size), ("num_layers", num_layers)):
            check_int(name, value)
        self.rnn = self.rnn_type(input_size, hidden_size, num_layers)
        self.head = nn.Linear(hidden_size, output_size)

    def initial_carry(self, batch_size: int) -> Carry:
        """The zero carry: `h[L, B, H]`, or `(h, c)` for the LSTM, in the model's dtype."""
        weight = self.rnn.weight_hh_l0
        h = weight.new_zeros(self.rnn.num_layers, batch_size, self.rnn.hidden_size)
        return (h, h.clone()) if isinstance(self.rnn, nn.LSTM) else h

    def forward(self, xs: torch.Tensor, carry: Carry | None = None,
                resets: torch.Tensor | None = None) -> tuple[torch.Tensor, Carry]:
        """Runs the model over a time-major chunk.

        Args:
          xs: inputs `[T, B, I]`.
          carry: the state before the first step; None for the zero carry.
          resets: optional bool `[T, B]`; where true, that sequence's carry is replaced by
            zeros before that step.

        Returns:
          `(ys, carry)`: outputs `[T, B, O]` and the state after the last step.
        """
        if carry is None:
            carry = self.initial_carry(xs.shape[1])
        if resets is None:
            hidden, carry = self.rnn(xs, carry)
            return self.head(hidden), carry
        reset_steps = torch.nonzero(resets.any(dim=1)).flatten().tolist()
        bounds = sorted({0, *reset_steps, xs.shape[0]})
        pieces = []
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            if resets[lo].any():
                carry = _zero_rows(carry, resets[lo])
            hidden, carry = self.rnn(xs[lo:hi], carry)
            pieces.append(hidden)
        return self.head(torch.cat(pieces)), carry


class ElmanModel(RecurrentModel):
    """An Elman (tanh) RNN with a linear readout; the twin of `tbptt_jax.models.elman`."""

    rnn_type = nn.RNN


class GRUModel(RecurrentModel):
    """A GRU with a linear readout; the twin of `tbptt_jax.models.gru`."""

    rnn_type = nn.GRU


class LSTMModel(RecurrentModel):
    """An LSTM with a linear readout; the twin of `tbptt_jax.models.lstm`."""

    rnn_type = nn.LSTM

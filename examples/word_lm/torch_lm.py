"""The word-level language model in PyTorch, word_language_model's `RNNModel`, trained with
`tbptt_torch.tbptt_train_step`. Imports PyTorch and `tbptt_torch` only, never JAX.

`WordLM` keeps `RNNModel`'s modules and so its `state_dict` names (`encoder.weight`,
`rnn.weight_ih_l0`, ..., `decoder.weight`, `decoder.bias`), its initialisation and its
dropout (on the embeddings, between the recurrent layers inside `nn.LSTM`, and on the last
layer's outputs). Its `forward` returns logits `[T, B, V]` (not `RNNModel`'s flattened
log-softmax `[T*B, V]`), which `tbptt_torch.losses.cross_entropy` takes as they are, and it
declares its zero carry, `initial_carry(B)` (upstream's `init_hidden`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

import tbptt_torch
from examples.word_lm import Config, OnCall
from tbptt.data import segments

RECURRENT = {"lstm": nn.LSTM, "gru": nn.GRU, "elman": nn.RNN}


class WordLM(nn.Module):
    """Word ids `[T, B]` -> logits `[T, B, V]`: embedding, dropout, `num_layers` recurrent
    layers (dropout between them), dropout, linear decoder; the decoder may share the
    embedding's weight (`tied`, Press & Wolf 2016)."""

    def __init__(self, cell: str, vocab_size: int, embedding_size: int, hidden_size: int,
                 num_layers: int, dropout: float = 0.0, tied: bool = False) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(vocab_size, embedding_size)
        # nn.LSTM's own dropout acts between layers only: with one there is none (and torch
        # warns about a dropout it would not apply).
        self.rnn = RECURRENT[cell](embedding_size, hidden_size, num_layers,
                                   dropout=dropout if num_layers > 1 else 0.0)
        self.decoder = nn.Linear(hidden_size, vocab_size)
        if tied:
            if hidden_size != embedding_size:
                raise ValueError(f"tied: the decoder shares the embedding, so hidden_size "
                                 f"must equal embedding_size={embedding_size}, got "
                                 f"{hidden_size}")
            self.decoder.weight = self.encoder.weight
        self.cell, self.num_layers, self.hidden_size = cell, num_layers, hidden_size
        init_range = 0.1  # RNNModel.init_weights
        nn.init.uniform_(self.encoder.weight, -init_range, init_range)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -init_range, init_range)

    def forward(self, xs: torch.Tensor, carry: Any = None) -> tuple[torch.Tensor, Any]:
        embedded = self.drop(self.encoder(xs))
        hidden, carry = self.rnn(embedded, carry)
        return self.decoder(self.drop(hidden)), carry

    def initial_carry(self, batch_size: int) -> Any:
        weight = next(self.parameters())
        h = weight.new_zeros(self.num_layers, batch_size, self.hidden_size)
        return (h, h.clone()) if self.cell == "lstm" else h


def build(config: Config, vocab_size: int, *, seed: int) -> WordLM:
    """The model with weights drawn by torch from `seed`, in float32."""
    torch.manual_seed(seed)
    return WordLM(config.cell, vocab_size, config.embedding_size, config.hidden_size,
                  config.num_layers, config.dropout, config.tied)


class Trainer:
    """word_language_model's training, through `tbptt_torch`: plain SGD on each update's
    mean cross-entropy, the gradient clipped to a global norm of `config.clip` first; the
    carry streams through an epoch and starts from zeros at each epoch's start."""

    def __init__(self, model: WordLM, config: Config, *, seed: int) -> None:
        self.model, self.config = model, config
        self.optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
        # Dropout draws from torch's global generator, seeded once per run.
        torch.manual_seed(seed)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def train_epoch(self, inputs: np.ndarray, targets: np.ndarray,
                    on_call: OnCall | None = None) -> np.ndarray:
        """One pass over the streams `[T, B]` of word ids; the loss of every update."""
        self.model.train()
        carry, losses = None, []
        for xs, ys in segments(inputs, targets, length=self.config.segment_length):
            carry, call_losses = tbptt_torch.tbptt_train_step(
                self.model, self.optimizer, carry, torch.from_numpy(xs).long(),
                torch.from_numpy(ys).long(), loss_fn=tbptt_torch.losses.cross_entropy,
                k1=self.config.bptt, clip_grad_norm=self.config.clip)
            losses.append(call_losses.numpy())
            if on_call is not None:
                on_call(sum(map(len, losses)), float(losses[-1][-1]))
        return np.concatenate(losses)

    def evaluate(self, inputs: np.ndarray, targets: np.ndarray) -> float:
        """The mean cross-entropy over every token of the streams, dropout off."""
        self.model.eval()
        carry, total = None, 0.0
        with torch.no_grad():
            for xs, ys in segments(inputs, targets, length=self.config.segment_length):
                logits, carry = self.model(torch.from_numpy(xs).long(), carry)
                total += tbptt_torch.losses.cross_entropy(
                    logits, torch.from_numpy(ys).long()).double().sum().item()
        return total / targets.size


def describe() -> str:
    return f"torch {torch.__version__} with {torch.get_num_threads()} threads"

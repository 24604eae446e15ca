"""The word-level language model in JAX, the port of `torch_lm.WordLM`, trained with
`tbptt_jax.tbptt_train_step`. Imports JAX, optax and `tbptt_jax` only, never torch.

`WordLM.apply(params, carry, xs, key=None)` reads `params` by the torch model's
`state_dict` names: the embedding is a row lookup of `encoder.weight`, the recurrent stack
`tbptt_jax.models`' (its `hidden_states`, the `rnn.` entries, torch's gate order and carry
layout), the decoder `decoder.weight`/`decoder.bias` (the embedding's weight when `tied`).
Dropout acts where torch's does, and only when the trainer hands `apply` a key: each
update's key (SPEC §1) is split three ways, for the embeddings, between the layers and on
the outputs. Without a key (evaluation) there is none, as in torch's `eval()` mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import tbptt_jax
from examples.word_lm import Config, OnCall
from tbptt.data import segments
from tbptt_jax.models import RecurrentModel, dropped

Array = jax.Array


@dataclass(frozen=True)
class WordLM:
    """Word ids `[T, B]` -> logits `[T, B, V]`, as `torch_lm.WordLM`."""

    cell: str
    vocab_size: int
    embedding_size: int
    hidden_size: int
    num_layers: int
    dropout: float = 0.0
    tied: bool = False

    @property
    def rnn(self) -> RecurrentModel:
        # Its readout (head.) goes unused: only `hidden_states` runs.
        return RecurrentModel(self.cell, self.embedding_size, self.hidden_size,
                              self.vocab_size, self.num_layers)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """The torch model's `state_dict()` keys and shapes, but for a tied decoder's weight
        (the embedding's own, so one parameter, as torch's `named_parameters()` has it)."""
        shapes = {"encoder.weight": (self.vocab_size, self.embedding_size)}
        shapes |= {name: shape for name, shape in self.rnn.param_shapes().items()
                   if name.startswith("rnn.")}
        if not self.tied:
            shapes["decoder.weight"] = (self.vocab_size, self.hidden_size)
        shapes["decoder.bias"] = (self.vocab_size,)
        return shapes

    def init(self, key: Array, dtype: Any = jnp.float32) -> dict[str, Array]:
        """Weights drawn as torch draws them: the recurrent layers U(-1/sqrt(H), 1/sqrt(H)),
        the embedding and decoder weights U(-0.1, 0.1), the decoder bias zero."""
        recurrent_key, embedding_key, decoder_key = jax.random.split(key, 3)
        params = {name: value for name, value in self.rnn.init(recurrent_key, dtype).items()
                  if name.startswith("rnn.")}
        params["encoder.weight"] = jax.random.uniform(
            embedding_key, (self.vocab_size, self.embedding_size), dtype, -0.1, 0.1)
        if not self.tied:
            params["decoder.weight"] = jax.random.uniform(
                decoder_key, (self.vocab_size, self.hidden_size), dtype, -0.1, 0.1)
        params["decoder.bias"] = jnp.zeros((self.vocab_size,), dtype)
        return {name: params[name] for name in self.param_shapes()}

    def initial_carry(self, batch_size: int, dtype: Any = jnp.float32) -> Any:
        return self.rnn.initial_carry(batch_size, dtype)

    def apply(self, params: dict[str, Array], carry: Any, xs: Array, *,
              key: Array | None = None) -> tuple[Any, Array]:
        embedding_key, between_key, output_key = (
            (None, None, None) if key is None else jax.random.split(key, 3))
        embedded = self._dropout(embedding_key, params["encoder.weight"][xs])
        carry, hidden = self.rnn.hidden_states(params, carry, embedded, dropout=self.dropout,
                                               key=between_key)
        hidden = self._dropout(output_key, hidden)
        decoder = params["encoder.weight" if self.tied else "decoder.weight"]
        return carry, hidden @ decoder.T + params["decoder.bias"][None, None]

    def _dropout(self, key: Array | None, values: Array) -> Array:
        if key is None or self.dropout == 0:
            return values
        return dropped(key, values, self.dropout)


def build(config: Config, vocab_size: int) -> WordLM:
    return WordLM(config.cell, vocab_size, config.embedding_size, config.hidden_size,
                  config.num_layers, config.dropout, config.tied)


class Trainer:
    """word_language_model's training, through `tbptt_jax`: SGD on each update's mean
    cross-entropy after `clip_by_global_norm_torch(config.clip)` (torch's
    `clip_grad_norm_`, exactly); the learning rate lives in the optimizer state
    (`optax.inject_hyperparams`), so annealing it compiles nothing new. The carry streams
    through an epoch and starts from zeros at each epoch's start; update u of the run
    draws its dropout from `fold_in(key, u)`, whichever call it falls in."""

    def __init__(self, model: WordLM, params: dict[str, Any], config: Config, *,
                 seed: int) -> None:
        self.model, self.config = model, config
        self.params = jax.tree.map(jnp.asarray, dict(params))
        self.optimizer = optax.chain(tbptt_jax.optim.clip_by_global_norm_torch(config.clip),
                                     optax.inject_hyperparams(optax.sgd)(learning_rate=config.lr))
        self.opt_state = self.optimizer.init(self.params)
        self.key = jax.random.key(seed)
        self.updates_done = 0
        self._loss_sum = jax.jit(self._evaluate_segment)

    def set_lr(self, lr: float) -> None:
        hyperparams = self.opt_state[1].hyperparams
        hyperparams["learning_rate"] = jnp.asarray(lr, hyperparams["learning_rate"].dtype)

    def train_epoch(self, inputs: np.ndarray, targets: np.ndarray,
                    on_call: OnCall | None = None) -> np.ndarray:
        """One pass over the streams `[T, B]` of word ids; the loss of every update."""
        dtype = self.params["decoder.bias"].dtype
        carry, losses = self.model.initial_carry(inputs.shape[1], dtype), []
        for xs, ys in segments(inputs, targets, length=self.config.segment_length):
            self.params, self.opt_state, carry, metrics = tbptt_jax.tbptt_train_step(
                self.params, self.opt_state, carry, xs, ys, apply_fn=self.model.apply,
                loss_fn=tbptt_jax.losses.cross_entropy, optimizer=self.optimizer,
                k1=self.config.bptt, key=self.key if self.config.dropout else None,
                updates_done=self.updates_done)
            losses.append(np.asarray(metrics["loss"]))
            self.updates_done += len(losses[-1])
            if on_call is not None:
                on_call(sum(map(len, losses)), float(losses[-1][-1]))
        return np.concatenate(losses)

    def _evaluate_segment(self, params: dict[str, Array], carry: Any, xs: Array, ys: Array
                          ) -> tuple[Any, Array]:
        carry, logits = self.model.apply(params, carry, xs)
        return carry, jnp.sum(tbptt_jax.losses.cross_entropy(logits, ys))

    def evaluate(self, inputs: np.ndarray, targets: np.ndarray) -> float:
        """The mean cross-entropy over every token of the streams, dropout off."""
        dtype = self.params["decoder.bias"].dtype
        carry, total = self.model.initial_carry(inputs.shape[1], dtype), 0.0
        for xs, ys in segments(inputs, targets, length=self.config.segment_length):
            carry, loss_sum = self._loss_sum(self.params, carry, xs, ys)
            total += float(loss_sum)
        return total / targets.size


def describe() -> str:
    return f"JAX {jax.__version__} on {jax.devices()[0].platform}"

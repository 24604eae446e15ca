"""The JAX port checked against the torch model by `tbptt_parity.compare`: dropout off,
float64, word_language_model's optimizer (SGD after clipping the gradient's global norm to
0.25), on the real corpus's token ids as they are. Needs JAX and PyTorch.

`compare` takes clipping through its optimizer pair: JAX gets
`optax.chain(clip_by_global_norm_torch(clip), optax.sgd(lr))`, torch `ClippedSGD`, which
scales each update by `clip_grad_norm_`'s factor without overwriting `p.grad`, so that both
sides record the raw gradient (compare checks it) and apply the clipped one.

    .venv/bin/python -m examples.word_lm --parity
"""

from __future__ import annotations

from collections.abc import Iterable

import optax
import torch

import tbptt_parity
from examples.word_lm import Config, corpus, jax_lm, streams, torch_lm
from tbptt_jax.optim import clip_by_global_norm_torch
from tbptt_parity import OptimizerPair

# Small enough to run in seconds, large enough for the clip to act on every update.
PARITY = Config(vocab_size=200, embedding_size=8, hidden_size=12, dropout=0.0, batch_size=4,
                bptt=7, lr=20.0)
UPDATES = 25


class ClippedSGD(torch.optim.SGD):
    """word_language_model's update, `clip_grad_norm_(params, max_norm)` then
    `p.data.add_(p.grad, alpha=-lr)`, leaving `p.grad` the raw gradient."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, max_norm: float
                 ) -> None:
        super().__init__(params, lr=lr)
        self.max_norm = max_norm

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 (torch's signature)
        params = [p for group in self.param_groups for p in group["params"]
                  if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(p.grad) for p in params]))
        # clip_grad_norm_'s factor, max_norm / (norm + 1e-6) capped at 1.
        scale = torch.clamp(self.max_norm / (norm + 1e-6), max=1.0)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad * scale, alpha=-group["lr"])


def optimizers(config: Config) -> OptimizerPair:
    return OptimizerPair(
        optax.chain(clip_by_global_norm_torch(config.clip), optax.sgd(config.lr)),
        lambda params: ClippedSGD(params, config.lr, config.clip))


def check(config: Config = PARITY, updates: int = UPDATES, *, cell: str = "lstm"
          ) -> tbptt_parity.Report:
    """The report of `compare` over the first `updates` updates of the corpus."""
    words = corpus.load(config.vocab_size)
    data = streams(words.train, words.valid, config)
    model = torch_lm.build(config, len(words.words), seed=0)
    port = jax_lm.build(config, len(words.words))
    return tbptt_parity.compare(
        model, port.apply, xs=data.train_inputs, ys=data.train_targets, k1=config.bptt,
        loss_fn="cross_entropy", optimizer=optimizers(config), updates=updates,
        dtype="float64", rtol=1e-10, carry=model.initial_carry(config.batch_size))

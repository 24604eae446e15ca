"""pytorch/examples' word_language_model through the trainers unchanged.

Its `RNNModel` (embedding -> 2-layer LSTM -> decoder -> log-softmax, predictions flattened
to `[t * B, V]`) and its `train()` loop come from tests/fixtures/word_language_model.py,
which holds them as upstream writes them. `train()` is TBPTT(bptt, bptt) with the batch
mean of `nn.NLLLoss` per chunk, a short last chunk, `clip_grad_norm_(..., 0.25)` between
backward and update and the manual SGD step `p.data.add_(p.grad, alpha=-lr)`: in
`tbptt_torch.tbptt_train_step` terms k1 = k2 = bptt, reduction="mean", tail="partial",
`torch.optim.SGD(lr)` and `clip_grad_norm=0.25`. Its JAX port (the same `state_dict`
names) trains on the same integer token ids through `tbptt_jax.tbptt_train_step`.

Every exact test here runs with dropout off (`RNNModel(..., dropout=0.0)`): dropout draws
differ between a loop and a trainer, and between frameworks.
"""

from __future__ import annotations

import copy
import re

import jax
import numpy as np
import optax
import pytest
import torch

import tbptt_jax
import tbptt_torch
from tbptt_jax.optim import TORCH_CLIP_EPS, clip_by_global_norm_torch
from tbptt_parity import compare
from tbptt_parity._harness import assert_parity, run_jax, run_torch
from tests.fixtures import word_language_model as wlm

EXACT = 1e-10
BPTT, BATCH = 5, 4
STEPS = 20 * BPTT + 3  # 21 updates, the last one of 3 steps


def make_model() -> torch.nn.Module:
    """main.py's model from its defaults (a small one), dropout off, in float64."""
    torch.manual_seed(0)
    args = wlm.args
    return wlm.RNNModel(args.model, wlm.ntokens, args.emsize, args.nhid, args.nlayers,
                        dropout=0.0, tie_weights=args.tied).double()


def token_stream(steps: int = STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-word pairs `(xs[T, B], ys[T, B])` (int64 ids) from `batchify`'s B streams."""
    stream = torch.from_numpy(np.random.default_rng(0).integers(
        0, wlm.ntokens, (steps + 1, BATCH)))
    return stream[:-1], stream[1:]


def nll_of_flat(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """RNNModel's `[t * B, V]` log-probabilities as the `[t, B]` terms of `nn.NLLLoss`."""
    return tbptt_torch.losses.nll(log_probs.view(*targets.shape, -1), targets)


def run_train_loop(model, xs, ys, monkeypatch):
    """word_language_model's `train()` on `model`: per update its loss and the parameters
    after it (the loop exposes neither; its `criterion` is wrapped to see them)."""
    losses, params = [], []

    def criterion(output, targets):
        if losses:  # each call follows the previous update
            params.append(copy.deepcopy(model.state_dict()))
        loss = torch.nn.NLLLoss()(output, targets)
        losses.append(loss.item())
        return loss

    monkeypatch.setattr(wlm, "criterion", criterion)
    monkeypatch.setattr(wlm.args, "bptt", None)  # restored after the test, as the next two
    monkeypatch.setattr(wlm.args, "batch_size", None)
    wlm.loop(model, None, xs, ys, BPTT)
    params.append(copy.deepcopy(model.state_dict()))
    return np.array(losses), params


def run_trainer(model, xs, ys, loss_fn=nll_of_flat, clip_grad_norm=0.25):
    """The same training through `tbptt_torch.tbptt_train_step`, settings as the loop's."""
    params = []
    _, losses = tbptt_torch.tbptt_train_step(
        model, torch.optim.SGD(model.parameters(), lr=wlm.lr), model.init_hidden(BATCH), xs,
        ys, loss_fn=loss_fn, k1=BPTT, reduction="mean", tail="partial",
        clip_grad_norm=clip_grad_norm,
        on_update=lambda u, loss, m: params.append(copy.deepcopy(m.state_dict())))
    return losses.numpy(), params


def largest_gap(a: list[dict], b: list[dict]) -> float:
    return max(float((x[name] - y[name]).abs().max() / y[name].abs().max())
               for x, y in zip(a, b, strict=True) for name in y)


def test_rnn_model_trains_through_the_torch_trainer_as_its_own_train_loop(monkeypatch):
    """RNNModel, unchanged, with only a loss_fn that reshapes its `[t * B, V]` output:
    21 updates of word_language_model's `train()`, the last of 3 steps, each loss and every
    parameter after each update equal to 1e-10 (float64, dropout off)."""
    initial = make_model()
    xs, ys = token_stream()
    loop_losses, loop_params = run_train_loop(copy.deepcopy(initial), xs, ys, monkeypatch)
    trainer_losses, trainer_params = run_trainer(copy.deepcopy(initial), xs, ys)

    assert len(loop_losses) == len(trainer_losses) == 21
    np.testing.assert_allclose(trainer_losses, loop_losses, rtol=EXACT, atol=0)
    assert largest_gap(trainer_params, loop_params) <= EXACT
    # Clipping is at work: without it the trainer parts from the loop.
    unclipped_losses, _ = run_trainer(copy.deepcopy(initial), xs, ys, clip_grad_norm=None)
    assert np.abs(unclipped_losses - loop_losses).max() > 1e-2


# -- the JAX port ---------------------------------------------------------------------------

WORD_LSTM = tbptt_jax.models.lstm(wlm.args.emsize, wlm.args.nhid, wlm.ntokens,
                                  num_layers=wlm.args.nlayers)


def rnn_model_apply(params: dict, carry: tuple, tokens: jax.Array) -> tuple[tuple, jax.Array]:
    """RNNModel in JAX, reading its `state_dict` names: `encoder.weight` looked up by the
    token ids `[t, B]`, the stacked LSTM of `tbptt_jax.models.lstm` (`rnn.*`), `decoder.*`
    as its readout; log-probabilities `[t, B, V]` (no dropout)."""
    lstm_params = {name.replace("decoder.", "head."): value for name, value in params.items()
                   if name != "encoder.weight"}
    carry, logits = WORD_LSTM.apply(lstm_params, carry, params["encoder.weight"][tokens])
    return carry, jax.nn.log_softmax(logits, axis=-1)


def clipped(grads: dict[str, np.ndarray], max_norm: float) -> dict[str, np.ndarray]:
    """JAX's recorded gradients (`[U, ...]` per name, taken before the optax chain) scaled
    as `clip_grad_norm_` scales torch's in place, so the two compare."""
    norms = np.sqrt(sum(np.sum(g.reshape(len(g), -1) ** 2, axis=1) for g in grads.values()))
    scale = np.minimum(max_norm / (norms + TORCH_CLIP_EPS), 1.0)
    return {name: g * scale.reshape(-1, *[1] * (g.ndim - 1)) for name, g in grads.items()}


def test_the_jax_port_trains_on_token_ids_as_the_torch_trainer():
    """The port of RNNModel, from its weights, on the same int64 token ids: the losses,
    every gradient and every parameter of 21 updates (clipped SGD, as `train()`) equal the
    torch trainer's to 1e-10 (float64, dropout off)."""
    model = make_model()
    xs, ys = token_stream()
    params = {name: jax.numpy.asarray(value) for name, value in tbptt_torch.to_jax(model).items()}
    carry = tuple(jax.numpy.asarray(part.numpy()) for part in model.init_hidden(BATCH))
    jax_run = run_jax(params, carry, xs.numpy(), ys.numpy(), apply_fn=rnn_model_apply,
                      loss_fn=tbptt_jax.losses.nll, k1=BPTT,
                      optimizer=optax.chain(clip_by_global_norm_torch(0.25), optax.sgd(wlm.lr)))
    torch_run = run_torch(model, torch.optim.SGD(model.parameters(), lr=wlm.lr),
                          model.init_hidden(BATCH), xs.numpy(), ys.numpy(), loss_fn=nll_of_flat,
                          k1=BPTT,
                          clip_grad_norm=0.25)

    assert len(torch_run.losses) == 21
    gaps = assert_parity(jax_run._replace(grads=clipped(jax_run.grads, 0.25)), torch_run, EXACT)
    assert max(gaps.values()) <= EXACT


def test_parity_compare_takes_the_token_ids_as_they_are():
    """`tbptt_parity.compare` on RNNModel and its port, given int64 token ids and class ids
    straight from torch: OK over 21 updates in float64 (dropout off)."""
    model = make_model()
    xs, ys = token_stream()
    report = compare(model, rnn_model_apply, xs=xs, ys=ys, k1=BPTT,
                     loss_fn=(tbptt_jax.losses.nll, nll_of_flat), optimizer="sgd", lr=1.0,
                     carry=model.init_hidden(BATCH))
    assert report.ok, report.format()
    assert report.updates == 21
    assert max(report.largest_gaps().values()) <= EXACT


# -- k2 > k1: windows of flattened predictions cut to their loss steps ---------------------

def flat_apply(params: dict, carry: tuple, tokens: jax.Array) -> tuple[tuple, jax.Array]:
    """The port with RNNModel's own layout: log-probabilities `[t * B, V]`."""
    carry, log_probs = rnn_model_apply(params, carry, tokens)
    return carry, log_probs.reshape(-1, wlm.ntokens)


def jax_nll_of_flat(log_probs: jax.Array, targets: jax.Array) -> jax.Array:
    return tbptt_jax.losses.nll(log_probs.reshape(*targets.shape, -1), targets)


def test_flattened_predictions_train_with_k2_above_k1_in_both_frameworks():
    """TBPTT(5, 8): each window's first 3 steps are overlap, whose predictions the trainers
    drop. RNNModel's `[t * B, V]` (rows step by step) is cut by steps, not rows, as the
    port's `[t, B, V]` is: torch on RNNModel, the port in `[t, B, V]` and the port in
    `[t * B, V]` train alike over 21 updates to 1e-10 (float64, dropout off, clipped SGD)."""
    model = make_model()
    xs, ys = token_stream()
    params = {name: jax.numpy.asarray(value) for name, value in tbptt_torch.to_jax(model).items()}
    carry = tuple(jax.numpy.asarray(part.numpy()) for part in model.init_hidden(BATCH))
    optimizer = optax.chain(clip_by_global_norm_torch(0.25), optax.sgd(wlm.lr))
    runs = [run_jax(params, carry, xs.numpy(), ys.numpy(), apply_fn=apply_fn, loss_fn=loss_fn,
                    k1=BPTT, k2=8, optimizer=optimizer)
            for apply_fn, loss_fn in ((rnn_model_apply, tbptt_jax.losses.nll),
                                      (flat_apply, jax_nll_of_flat))]
    torch_run = run_torch(model, torch.optim.SGD(model.parameters(), lr=wlm.lr),
                          model.init_hidden(BATCH), xs.numpy(), ys.numpy(), loss_fn=nll_of_flat,
                          k1=BPTT, k2=8, clip_grad_norm=0.25)

    assert len(torch_run.losses) == 21
    for jax_run in runs:
        gaps = assert_parity(jax_run._replace(grads=clipped(jax_run.grads, 0.25)), torch_run,
                             EXACT)
        assert max(gaps.values()) <= EXACT


class BatchMajorRNNModel(wlm.RNNModel):
    """RNNModel with its predictions batch-major, `[B, t, V]`: neither layout a trainer can
    cut by steps."""

    def forward(self, input, hidden):
        log_probs, hidden = super().forward(input, hidden)
        return log_probs.view(*input.shape, -1).transpose(0, 1), hidden


def test_predictions_neither_time_major_nor_flattened_are_refused_in_both_frameworks():
    """Before, a window was cut by its first axis whatever it held; now any other layout
    is a ValueError saying which two are read (dropout off)."""
    expected = ("the model's predictions must be [t, B, ...], or [t * B, ...] flattened "
                "time-major, for a model call over t = 5 steps of B = 4 sequences; got "
                "shape (4, 5, 10)")
    torch.manual_seed(0)
    model = BatchMajorRNNModel("LSTM", wlm.ntokens, 3, 4, 2, dropout=0.0).double()
    xs, ys = token_stream(12)
    with pytest.raises(ValueError, match=re.escape(expected)):
        tbptt_torch.tbptt_train_step(model, torch.optim.SGD(model.parameters(), lr=1.0),
                                     model.init_hidden(BATCH), xs, ys, k1=5,
                                     loss_fn=lambda lp, y: tbptt_torch.losses.nll(
                                         lp.transpose(0, 1), y))
    params = {name: jax.numpy.asarray(value) for name, value in tbptt_torch.to_jax(model).items()}

    def batch_major_apply(params, carry, tokens):
        carry, log_probs = rnn_model_apply(params, carry, tokens)
        return carry, log_probs.transpose(1, 0, 2)

    sgd = optax.sgd(1.0)
    with pytest.raises(ValueError, match=re.escape(expected)):
        tbptt_jax.tbptt_train_step(
            params, sgd.init(params), tuple(jax.numpy.asarray(p.numpy())
                                            for p in model.init_hidden(BATCH)),
            xs.numpy(), ys.numpy(), apply_fn=batch_major_apply, optimizer=sgd, k1=5,
            loss_fn=lambda lp, y: tbptt_jax.losses.nll(lp.transpose(1, 0, 2), y))

"""The audit's reference: the gradient of every update of `tbptt_torch.tbptt_train_step`,
trained from the loop's starting weights on the loop's data with the TBPTT it is judged by.

The loop's model is handed to the trainer as it is, behind a thin adapter that reads its
predictions as `[t, B, ...]` (a model may return them flattened, as word_language_model's
`RNNModel` does) and gives the trainer the zero carry to start from. The loss of each update
is the loop's per-term loss with SPEC's weights (a mean or a sum, over the terms a mask keeps),
trained with `reduction="sum"`. Update u of the reference starts from the weights the loop had
before its own update u, so each update's gradient is compared on its own, whatever optimizer
or learning rate the loop uses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tbptt.schedule import plan
from tbptt_torch._trainer import tbptt_train_step
from tbptt_torch.audit._losses import Loss
from tbptt_torch.audit._trace import in_steps
from tbptt_torch.audit._verdict import Tbptt


class _Adapter(nn.Module):
    """The loop's model as `tbptt_train_step` takes it: `forward(xs, carry) -> (preds[t, B,
    ...], carry)` and `initial_carry(batch_size)`."""

    def __init__(self, model: nn.Module, initial_carry: Callable[[int], Any]) -> None:
        super().__init__()
        self.model = model
        self._initial_carry = initial_carry

    def initial_carry(self, batch_size: int) -> Any:
        return self._initial_carry(batch_size)

    def forward(self, xs: torch.Tensor, carry: Any) -> tuple[torch.Tensor, Any]:
        preds, carry = self.model(xs, carry)
        return in_steps(preds, xs.shape[0], xs.shape[1])(preds), carry


def reference_gradients(model: nn.Module, initial_carry: Callable[[int], Any],
                        xs: torch.Tensor, ys: torch.Tensor, semantics: Tbptt, loss: Loss,
                        mask: torch.Tensor | None, loop_weights: list[dict[str, torch.Tensor]],
                        lr: float) -> list[dict[str, torch.Tensor]]:
    """The gradient of every update of `tbptt_train_step` on `model` (which it trains).

    `loop_weights[u]` are the loop's weights after its update u + 1: the reference's update
    u + 2 starts from them. `mask` weighs the loss terms `[T, B]` (None: all 1).
    """
    schedule = plan(xs.shape[0], semantics.k1, semantics.k2, tail=semantics.tail or "partial")
    terms = torch.ones(xs.shape[:2], dtype=torch.float64) if mask is None else mask
    weights = iter([semantics.term_weights(terms[u.loss_start:u.loss_stop])
                    for u in schedule.updates])
    params = dict(model.named_parameters())
    grads: list[dict[str, torch.Tensor]] = []

    def loss_fn(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # The trainer calls it once per update, in order: the next update's term weights.
        return loss.fn(preds, targets) * next(weights)

    def record(update: int, _: torch.Tensor, __: nn.Module) -> None:
        grads.append({name: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                      for name, p in params.items()})
        if update < len(loop_weights):
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(loop_weights[update][name])

    tbptt_train_step(_Adapter(model, initial_carry), torch.optim.SGD(model.parameters(), lr=lr),
                     None, xs, ys, loss_fn=loss_fn, k1=semantics.k1, k2=semantics.k2,
                     reduction="sum", tail=semantics.tail or "partial", on_update=record,
                     clip_grad_norm=semantics.clip_grad_norm)
    return grads

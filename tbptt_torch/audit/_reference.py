"""The audit's reference: the gradient of every update of `tbptt_torch.tbptt_train_step`,
trained from the loop's starting weights on the loop's data with the TBPTT it is judged by.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tbptt_torch import losses
from tbptt_torch._trainer import tbptt_train_step
from tbptt_torch.audit._verdict import Tbptt


def reference_gradients(factory: Callable[[], nn.Module], initial: dict[str, torch.Tensor],
                         xs: torch.Tensor, ys: torch.Tensor, semantics: Tbptt, lr: float
                         ) -> list[dict[str, torch.Tensor]]:
    """The gradient of every update of `tbptt_train_step` from the same weights."""
    model = factory().double()
    model.load_state_dict(initial)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scale = semantics.loss_scale(xs.shape[1])
    grads: list[dict[str, torch.Tensor]] = []

    def record(_: int, __: torch.Tensor, trained: nn.Module) -> None:
        grads.append({name: p.grad.detach().clone() for name, p in trained.named_parameters()})

    tbptt_train_step(model, optimizer, None, xs, ys,
                     loss_fn=lambda p, t: losses.mse(p, t) * scale, k1=semantics.k1,
                     k2=semantics.k2, reduction=semantics.reduction,
                     tail=semantics.tail or "partial", on_update=record)
    return grads

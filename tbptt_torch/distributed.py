"""Data-parallel TBPTT with `torch.nn.parallel.DistributedDataParallel` (DDP).

Each rank (one process per device, started by `torchrun`) trains the same model on its
own rows of the batch and keeps its own carry for those rows from one call to the next;
`tbptt_torch.tbptt_train_step` takes the DDP-wrapped model as it takes a plain one, and
DDP all-reduces the gradient during each update's `backward()`. What makes the result the
full batch's, update by update:

- `reduction="mean"`: DDP averages the ranks' gradients. With equal rows per rank that is
  the gradient of the mean over the whole batch; with unequal rows it is not (a rank's
  mean would weigh more per row), so `rank_rows` insists on equal rows.
- `reduction="sum"`: the full batch's gradient is the *sum* of the ranks' gradients, which
  DDP's average divides by the world size. `data_parallel(model, reduction="sum")`
  registers a communication hook that sums instead.

The trainer may call the model more than once before one `backward()` (a window is split
at the carry hand-off, and the model splits it at reset steps). DDP allows that with its
defaults: each parameter's gradient is accumulated once per backward whatever the number
of calls, and every parameter is used in every window. The losses a rank returns are
those of its own rows; `reduce_losses` gives the full batch's.
"""

# No `from __future__ import annotations` here: DDP checks a communication hook's
# annotations as objects (`bucket: dist.GradBucket`), and strings fail that check.
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tbptt.checks import REDUCTIONS, check_choice, check_int


class DataParallelModel(DistributedDataParallel):
    """DDP that still answers the trainer's `initial_carry(batch_size)` for its module,
    which a bare `DistributedDataParallel` hides (then pass the carry explicitly)."""

    @property
    def initial_carry(self) -> Any:
        return self.module.initial_carry


def data_parallel(model: nn.Module, *, reduction: str = "mean", **ddp_options: Any
                  ) -> DataParallelModel:
    """Wraps `model` in DDP so that each update applies the full batch's gradient.

    Args:
      model: the model, on this rank's device; DDP copies rank 0's parameters to every
        rank when it wraps it, so all ranks start from the same weights.
      reduction: the `reduction` the trainer is called with: "mean" keeps DDP's average of
        the ranks' gradients, "sum" replaces it by their sum.
      **ddp_options: passed to `DistributedDataParallel` (e.g. `device_ids=[local_rank]`
        on a GPU).

    Returns:
      The wrapped model: pass it to `tbptt_train_step` and build the optimizer over its
      parameters. Needs `torch.distributed.init_process_group` first.
    """
    check_choice("reduction", reduction, REDUCTIONS)
    if not dist.is_initialized():
        raise RuntimeError("data_parallel needs torch.distributed.init_process_group() first "
                           "(torchrun sets the environment it reads)")
    wrapped = DataParallelModel(model, **ddp_options)
    if reduction == "sum":
        wrapped.register_comm_hook(None, _sum_gradients)
    return wrapped


def _sum_gradients(process_group: dist.ProcessGroup | None, bucket: dist.GradBucket
                   ) -> torch.futures.Future[torch.Tensor]:
    """DDP's all-reduce without its division by the world size."""
    group = process_group if process_group is not None else dist.group.WORLD
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda future: future.value()[0])


def rank_rows(batch_size: int, rank: int | None = None, world_size: int | None = None
              ) -> slice:
    """The rows of a global batch of `batch_size` sequences that rank `rank` trains on.

    Equal contiguous shares: rank r takes rows `[r * B / W, (r + 1) * B / W)`. A rank must
    keep the same rows from one call to the next, since its carry belongs to them.
    """
    batch_size = check_int("batch_size", batch_size)
    rank = dist.get_rank() if rank is None else check_int("rank", rank, minimum=0)
    world_size = dist.get_world_size() if world_size is None else check_int("world_size",
                                                                            world_size)
    if rank >= world_size:
        raise ValueError(f"rank must be in [0, world_size = {world_size}), got {rank}")
    if batch_size % world_size:
        raise ValueError(f"batch_size must be a multiple of the world size {world_size} (equal "
                         f"rows per rank make DDP's averaged gradient the batch's), got "
                         f"{batch_size}")
    share = batch_size // world_size
    return slice(rank * share, (rank + 1) * share)


def reduce_losses(losses: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The full batch's per-update losses `[U]` from each rank's `[U]` (every rank calls).

    "mean" averages the ranks' losses (equal rows per rank), "sum" adds them. A skipped
    update's NaN (with `on_nonfinite="skip"`) stays NaN.
    """
    check_choice("reduction", reduction, REDUCTIONS)
    total = losses.detach().clone()
    dist.all_reduce(total)
    return total / dist.get_world_size() if reduction == "mean" else total

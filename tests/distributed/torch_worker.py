"""Runs PyTorch training cases under DDP, as one rank of a `torchrun` job, and saves them.

    torchrun --standalone --nproc_per_node 2 torch_worker.py OUT

Each rank joins the job (gloo, from the environment torchrun sets), trains every case of
`torch_cases.CASES` on its own rows of the batch (checkpointed after the second call under
`OUT/checkpoints/` and resumed from it), and writes `OUT/rank<r>.pkl`: per case, what
`torch_cases.train` returns.
"""

from __future__ import annotations

import gc
import pickle
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch_cases


def main() -> int:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = {name: torch_cases.train(name, dist.get_world_size(),
                                       checkpoint_dir=out / "checkpoints" / name)
               for name in torch_cases.CASES}
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"rank{dist.get_rank()}.pkl", "wb") as file:
        pickle.dump({"world_size": dist.get_world_size(), "results": results}, file)
    # The DDP wrappers of the cases (two per case: before the checkpoint and after the
    # resume) must be gone before the process group: with torch 2.13, a process that wrapped
    # DDP more than once and left a wrapper to interpreter exit aborted there ~1 time in 4
    # ("terminate called without an active exception"), after its results were written.
    gc.collect()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

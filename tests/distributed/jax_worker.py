"""Runs JAX training cases data parallel, in a process of its own, and saves the results.

    python jax_worker.py OUT --devices 4 --cases "k2=k1,sum,float32;k2>k1,mean,float32"
    python jax_worker.py OUT --devices 2 --process-id 0 --num-processes 2 --port 12345

The number of CPU devices must be set before jax is imported, which is why this runs as
a subprocess of the tests. With several processes, each joins the others through
`jax.distributed.initialize` (CPU collectives over gloo) and feeds only its own rows of
the batch. Each case runs on its own kind of mesh (`jax_cases.make_mesh`), under
`jax.set_mesh` where the case says so. Every run is checkpointed after its second call and
resumed from what is restored (under `OUT/checkpoints/`). Each process writes
`OUT/process<i>.pkl`: per case, what `jax_cases.train` returns, the errors that a batch of
6 sequences and a checkpoint of a state that differs between processes meet, and whether
the LSTM ran its compiled kernels (`TBPTT_JAX_NATIVE=0` turns them off).
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
from contextlib import nullcontext
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, required=True, help="CPU devices per process")
    parser.add_argument("--cases", default=None, help="';'-separated names of jax_cases.CASES")
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--port", type=int, default=None, help="the coordinator's port")
    args = parser.parse_args()

    os.environ["JAX_NUM_CPU_DEVICES"] = str(args.devices)
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_numpy_rank_promotion", "raise")
    if args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"localhost:{args.port}", num_processes=args.num_processes,
                                   process_id=args.process_id, initialization_timeout=60)

    import jax_cases
    import numpy as np

    from tbptt_jax import _native, checkpoint, sharding

    names = list(jax_cases.CASES) if args.cases is None else args.cases.split(";")
    results = {}
    for name in names:
        mesh = jax_cases.make_mesh(name)
        with jax.set_mesh(mesh) if jax_cases.CASES[name].get("set_mesh") else nullcontext():
            results[name] = jax_cases.train(name, mesh, local=args.num_processes > 1,
                                            checkpoint_dir=args.out / "checkpoints" / name)
    try:
        sharding.shard_batch(sharding.data_mesh(), *[np.zeros((2, 6, 1))] * 2)
        uneven = None
    except ValueError as error:
        uneven = str(error)
    try:  # a state that differs between processes is refused, not saved in part
        checkpoint.save(args.out / "differing", 1, checkpoint.TrainState(
            {"w": np.full(2, float(args.process_id))}, ()))
        differing = None
    except ValueError as error:
        differing = str(error)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / f"process{args.process_id}.pkl", "wb") as file:
        pickle.dump({"devices": len(jax.devices()), "results": results,
                     "uneven batch": uneven, "compiled kernels": _native.available(),
                     "differing state": differing}, file)
    if args.num_processes > 1:
        jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

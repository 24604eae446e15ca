"""A/B of the JAX model kernels: an older `tbptt_jax/models.py` (with the `_kernels.py` and
compiled kernels of the same revision, where it had them) against the current ones and
torch's fused trainer, on one configuration, in one process (the protocol of NOTES.md).

Each implementation runs one call of its trainer (all updates of a T-step sequence, Adam,
MSE) from the same weights and data; after a first (compiling) call the three run in turn
`--repeats` times, and the minimum process CPU time and wall time of each are printed.
Both frameworks are pinned to one thread (unless `--all-threads`), so CPU time measures
work even on a machine other jobs share; but XLA's CPU runtime keeps helper threads busy
beside the one that computes (its CPU time is about twice its wall time, with these flags
too), so on an idle machine the minimum wall time is the steadier figure.

    .venv/bin/python benchmarks/kernel_ab.py --baseline c12db3f lstm 16 128 32 1000 50
    .venv/bin/python benchmarks/kernel_ab.py --all-threads --baseline HEAD gru 64 512 32 500 50
    (cell, input size, hidden size, batch, T, k1; --layers N)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

# One thread each unless `--all-threads` (read here: JAX reads XLA_FLAGS when it starts);
# imported as a module (the tests), nothing is changed.
if __name__ == "__main__" and "--all-threads" not in sys.argv:
    os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"

import jax  # noqa: E402  (after XLA_FLAGS, which JAX reads when its backend starts)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402

import tbptt_jax  # noqa: E402
import tbptt_torch  # noqa: E402

TORCH_MODELS = {"elman": tbptt_torch.models.ElmanModel, "gru": tbptt_torch.models.GRUModel,
                "lstm": tbptt_torch.models.LSTMModel}


def _git_show(revision: str, path: str) -> str | None:
    shown = subprocess.run(["git", "show", f"{revision}:{path}"], capture_output=True, text=True)
    return shown.stdout if shown.returncode == 0 else None


def _load_source(name: str, source: str, directory: str):
    path = os.path.join(directory, f"{name}.py")
    with open(path, "w") as file:
        file.write(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_models_at(revision: str):
    """`tbptt_jax/models.py` as it was at a git revision, imported as its own module, with
    the `tbptt_jax/_kernels.py` of that revision if it had one, and its compiled kernels
    (`_native.py` and `csrc/lstm.cc`, registered with XLA under names of their own) if it
    had them."""
    source = _git_show(revision, "tbptt_jax/models.py")
    if source is None:
        raise SystemExit(f"no tbptt_jax/models.py at {revision}")
    directory = tempfile.mkdtemp()
    kernels = _git_show(revision, "tbptt_jax/_kernels.py")
    native = _git_show(revision, "tbptt_jax/_native.py")
    native_source = _git_show(revision, "tbptt_jax/csrc/lstm.cc")
    if kernels is not None and native is not None and native_source is not None:
        os.makedirs(os.path.join(directory, "csrc"))
        with open(os.path.join(directory, "csrc", "lstm.cc"), "w") as file:
            file.write(native_source)
        _load_source("native_baseline",
                     native.replace('"tbptt_lstm_', '"tbptt_baseline_lstm_'), directory)
        kernels = kernels.replace("from tbptt_jax import _native",
                                  "import native_baseline as _native")
    if kernels is not None:
        _load_source("kernels_baseline", kernels, directory)
        source = source.replace("from tbptt_jax import _kernels",
                                "import kernels_baseline as _kernels")
    return _load_source("models_baseline", source, directory)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="git revision of the older models")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--all-threads", action="store_true",
                        help="both frameworks on every core, as the suite runs them")
    parser.add_argument("cell", choices=sorted(TORCH_MODELS))
    parser.add_argument("sizes", type=int, nargs=5, metavar="I H B T K")
    args = parser.parse_args(argv)
    input_size, hidden, batch, steps, k1 = args.sizes
    torch.set_num_threads(os.cpu_count() if args.all_threads else 1)

    torch.manual_seed(0)
    torch_model = TORCH_MODELS[args.cell](input_size, hidden, input_size, num_layers=args.layers)
    params = {k: jnp.asarray(v) for k, v in tbptt_torch.to_jax(torch_model).items()}
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((steps, batch, input_size), dtype=np.float32)
    ys = rng.standard_normal((steps, batch, input_size), dtype=np.float32)
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(params)

    def jax_call(model):
        carry = model.initial_carry(batch)
        return lambda: jax.block_until_ready(tbptt_jax.tbptt_train_step(
            params, opt_state, carry, jnp.asarray(xs), jnp.asarray(ys), apply_fn=model.apply,
            loss_fn=tbptt_jax.losses.mse, optimizer=optimizer, k1=k1, on_nonfinite="skip"))

    baseline = load_models_at(args.baseline)
    torch_optimizer = torch.optim.Adam(torch_model.parameters(), 1e-3)
    calls = {
        f"jax@{args.baseline}": jax_call(getattr(baseline, args.cell)(
            input_size, hidden, input_size, num_layers=args.layers)),
        "jax": jax_call(getattr(tbptt_jax.models, args.cell)(
            input_size, hidden, input_size, num_layers=args.layers)),
        "torch-fused": lambda: tbptt_torch.tbptt_train_step(
            torch_model, torch_optimizer, None, torch.from_numpy(xs), torch.from_numpy(ys),
            loss_fn=tbptt_torch.losses.mse, k1=k1),
    }
    first = {}
    for name, call in calls.items():
        start = time.perf_counter()
        call()
        first[name] = time.perf_counter() - start
    best_cpu = dict.fromkeys(calls, float("inf"))
    best_wall = dict.fromkeys(calls, float("inf"))
    for _ in range(args.repeats):
        for name, call in calls.items():
            start_cpu, start_wall = time.process_time(), time.perf_counter()
            call()
            best_cpu[name] = min(best_cpu[name], time.process_time() - start_cpu)
            best_wall[name] = min(best_wall[name], time.perf_counter() - start_wall)
    print(f"{args.cell} I{input_size} H{hidden} B{batch} T{steps} K{k1} layers {args.layers}, "
          f"minimum of {args.repeats}, "
          + ("all threads:" if args.all_threads
             else "one thread each (XLA's helper threads count in CPU):"))
    for name in calls:
        print(f"  {name:20s} CPU {best_cpu[name] * 1e3:7.1f} ms, wall {best_wall[name] * 1e3:7.1f}"
              f" ms  (first call {first[name]:.1f} s)  torch-fused / it: CPU "
              f"{best_cpu['torch-fused'] / best_cpu[name]:.2f}, wall "
              f"{best_wall['torch-fused'] / best_wall[name]:.2f}")


if __name__ == "__main__":
    main()

"""What two safety checks cost per trainer call, against the call they guard.

- The class-id check (a loss that declares `class_axis`): word_language_model's `RNNModel`
  (2 LSTM layers) and its JAX port, one call over the whole `[T, B]`, k1 = 35, timed with
  `tbptt_torch.losses.nll` / `tbptt_jax.losses.nll` (which opt in) against the same loss
  without the declaration; and the check alone.
- torch's `undo_nonfinite_steps` (a copy of the parameters and the optimizer state before
  each step): the bundled LSTM with Adam, on and off.

Medians of interleaved repeats, float32, CPU, torch on one thread. Writes
`<out>/<name>.json` and `<out>/<name>.md`. Run from the checkout:

    .venv/bin/python -m benchmarks.check_costs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

import tbptt_jax
import tbptt_torch
from benchmarks import suite
from tbptt.checks import check_class_ids, takes_class_ids
from tbptt_jax import _trainer
from tests.fixtures.word_language_model import RNNModel

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# T, B, V, embedding and hidden size, repeats
CLASS_ID_CASES = ((35, 20, 10_000, 200, 200, 7), (2000, 64, 1000, 64, 64, 3))
# hidden size, T, B, k1, repeats
UNDO_CASES = ((64, 1000, 16, 50, 7), (512, 500, 16, 50, 5))
K1 = 35


def _medians(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Each call's median time over `repeats` rounds, the calls interleaved in each round."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _jax_port(model: RNNModel) -> Callable[..., Any]:
    """`RNNModel`'s JAX twin, reading its `state_dict` names (dropout off)."""
    lstm = tbptt_jax.models.lstm(model.encoder.embedding_dim, model.nhid, model.ntoken,
                                 num_layers=model.nlayers)

    def apply(params, carry, tokens):
        inner = {name.replace("decoder.", "head."): value for name, value in params.items()
                 if name != "encoder.weight"}
        carry, logits = lstm.apply(inner, carry, params["encoder.weight"][tokens])
        return carry, jax.nn.log_softmax(logits, -1)
    return apply


def class_id_check(steps: int, batch: int, vocab: int, embedding: int, hidden: int,
                   repeats: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    xs, ys = rng.integers(0, vocab, (steps, batch)), rng.integers(0, vocab, (steps, batch))
    torch.manual_seed(0)
    model = RNNModel("LSTM", vocab, embedding, hidden, 2, dropout=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch_xs, torch_ys = torch.from_numpy(xs), torch.from_numpy(ys)

    def torch_call(loss_fn):
        return lambda: tbptt_torch.tbptt_train_step(
            model, optimizer, model.init_hidden(batch), torch_xs, torch_ys, loss_fn=loss_fn,
            k1=K1)

    # RNNModel's predictions are [t * B, V]: the loss views them as [t, B, V]. The same loss
    # with and without the declaration that its targets are class ids (the check or none).
    def flat_nll(logp, y):
        return tbptt_torch.losses.nll(logp.view(*y.shape, -1), y)

    def undeclared_jax(logp, y):
        return tbptt_jax.losses.nll(logp, y)

    params = {name: jnp.asarray(value) for name, value in tbptt_torch.to_jax(model).items()}
    apply, sgd = _jax_port(model), optax.sgd(0.1)
    opt_state = sgd.init(params)
    carry = tuple(jnp.zeros((2, batch, hidden), jnp.float32) for _ in range(2))
    jax_xs, jax_ys = jnp.asarray(xs, jnp.int32), jnp.asarray(ys, jnp.int32)

    def jax_call(loss_fn):
        return lambda: tbptt_jax.tbptt_train_step(params, opt_state, carry, jax_xs, jax_ys,
                                                  apply_fn=apply, loss_fn=loss_fn,
                                                  optimizer=sgd, k1=K1)

    config = tbptt_jax.trainer(apply, tbptt_jax.losses.nll, sgd, k1=K1).step.keywords["config"]
    state = _trainer._state_of(config, params, opt_state, carry, jax_xs, None, None, 0)
    calls = {"jax_with": jax_call(tbptt_jax.losses.nll), "jax_without": jax_call(undeclared_jax),
             "torch_with": torch_call(takes_class_ids(partial(flat_nll))),
             "torch_without": torch_call(flat_nll)}
    for call in calls.values():  # compile, and the one-step trace the check keeps
        jax.block_until_ready(call())
    checks = _medians({
        "numpy_check": lambda: check_class_ids("ys", ys, vocab),
        "jax_check": lambda: _trainer._check_class_ids(config, state, jax_xs, jax_ys, False,
                                                       None)}, 50)
    return {"T": steps, "B": batch, "V": vocab, "embedding": embedding, "hidden": hidden,
            **checks, **_medians(calls, repeats)}


def undo_copy(hidden: int, steps: int, batch: int, k1: int, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = tbptt_torch.models.LSTMModel(16, hidden, 16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    xs = torch.randn(steps, batch, 16)
    ys = torch.roll(xs, 3, 0)

    def call(undo):
        return lambda: tbptt_torch.tbptt_train_step(
            model, optimizer, None, xs, ys, loss_fn=tbptt_torch.losses.mse, k1=k1,
            undo_nonfinite_steps=undo)[1]

    return {"hidden": hidden, "T": steps, "B": batch, "k1": k1,
            **_medians({"undo_on": call(True), "undo_off": call(False)}, repeats)}


def render(results: dict[str, Any]) -> str:
    machine = results["environment"]["machine"]
    lines = [f"# What two checks cost per call ({machine['cpu']}, {machine['logical_cores']} "
             f"cores)", "", "Written by `python -m benchmarks.check_costs`; medians, float32, "
             "torch on one thread.", "", "## The class-id check (word_language_model's "
             f"RNNModel, 2 LSTM layers, one call over [T, B], k1 = {K1})", "",
             "| T, B, V (embedding, hidden) | check, numpy | check, JAX | torch call with / "
             "without | JAX call with / without | check / call |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in results["class_ids"]:
        share = max(row["numpy_check"] / row["torch_with"], row["jax_check"] / row["jax_with"])
        lines.append(
            f"| {row['T']}, {row['B']}, {row['V']} ({row['embedding']}, {row['hidden']}) | "
            f"{row['numpy_check'] * 1e6:.0f} us | {row['jax_check'] * 1e3:.2f} ms | "
            f"{row['torch_with']:.3f} / {row['torch_without']:.3f} s | "
            f"{row['jax_with']:.3f} / {row['jax_without']:.3f} s | {share:.2%} |")
    lines += ["", "## torch's undo_nonfinite_steps (LSTM, Adam)", "",
              "| hidden, T, B, k1 | undo on | undo off | on / off |", "|---|---:|---:|---:|"]
    for row in results["undo"]:
        lines.append(f"| {row['hidden']}, {row['T']}, {row['B']}, {row['k1']} | "
                     f"{row['undo_on']:.3f} s | {row['undo_off']:.3f} s | "
                     f"{row['undo_on'] / row['undo_off']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="output folder")
    parser.add_argument("--name", default="check-costs", help="results file stem")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {"environment": suite.environment("cpu"),
               "class_ids": [class_id_check(*case) for case in CLASS_ID_CASES],
               "undo": [undo_copy(*case) for case in UNDO_CASES]}
    suite.write_results(results, args.out, args.name)
    (args.out / f"{args.name}.md").write_text(render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

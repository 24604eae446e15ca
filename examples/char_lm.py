"""A character-level LSTM language model trained with TBPTT, in JAX and in PyTorch side by side.

The text is the Python standard library's own source: the public top-level modules of
`sysconfig.get_paths()["stdlib"]` in sorted order, so nothing is downloaded and the data is
the same on every run of a given Python. Characters outside printable ASCII (tabs,
non-ASCII) share one symbol. The text is cut into B parallel contiguous streams and fed
time-major, one-hot, to the next-character task with cross-entropy.

Both frameworks train the same LSTM from the same initial weights (drawn by torch, carried
to JAX with `tbptt_torch.to_jax`), on the same data, with the same Adam settings, in
float32. The stream is fed a segment at a time: each call of `tbptt_train_step` runs a few
TBPTT updates and returns the carry that the next call continues from. The script prints
the per-update losses of both frameworks side by side, their largest difference, each
framework's wall time and a sample of text from the trained JAX model. It exits with
status 1 if the frameworks' losses differ by more than float32 rounding explains (see
`check_parity`).

Run (the defaults take well under a minute on a 2-core CPU):

    .venv/bin/python examples/char_lm.py
    .venv/bin/python examples/char_lm.py --help
"""

from __future__ import annotations

import argparse
import math
import sys
import sysconfig
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
import optax
import torch

import tbptt_jax
import tbptt_torch

# Newline and the 95 printable ASCII characters; every other character is OTHER.
ALPHABET = "\n" + "".join(chr(code) for code in range(32, 127))
OTHER = len(ALPHABET)
VOCAB_SIZE = len(ALPHABET) + 1
CODES = {char: code for code, char in enumerate(ALPHABET)}
OTHER_SHOWN_AS = "\N{REPLACEMENT CHARACTER}"

# Adam's hyperparameters, shared by optax.adam and torch.optim.Adam (their defaults too).
BETAS = (0.9, 0.999)
EPS = 1e-8

# How close the two runs' final losses (mean of the last 10 updates) must be; see check_parity.
FINAL_RTOL = 1e-2


class Corpus(NamedTuple):
    text: str
    files: list[Path]  # the standard-library modules the text was read from, in order


class Run(NamedTuple):
    """What one framework's training produced."""

    losses: np.ndarray  # shape=[U]: the loss of every update, in nats per character
    seconds: list[float]  # wall time of every call of tbptt_train_step


def load_corpus(num_chars: int) -> Corpus:
    """The first `num_chars` characters of the standard library's public top-level modules,
    concatenated in sorted file-name order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    pieces, files, length = [], [], 0
    for path in sorted(stdlib.glob("[!_]*.py")):
        if length >= num_chars:
            break
        pieces.append(path.read_text(encoding="utf-8"))
        files.append(path)
        length += len(pieces[-1])
    if length < num_chars:
        raise ValueError(f"the standard library at {stdlib} holds {length} characters of "
                         f"source, fewer than the {num_chars} asked for")
    return Corpus("".join(pieces)[:num_chars], files)


def encode(text: str) -> np.ndarray:
    """Character codes `[N]` (int32) of `text`."""
    return np.array([CODES.get(char, OTHER) for char in text], dtype=np.int32)


def decode(codes: Sequence[int]) -> str:
    return "".join(ALPHABET[code] if code < OTHER else OTHER_SHOWN_AS for code in codes)


def make_streams(codes: np.ndarray, batch_size: int, steps: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Cuts the text into `batch_size` contiguous streams, time-major.

    Stream b is the text's b-th slice of `steps + 1` characters. Returns `(inputs,
    targets)`, both character codes of shape `[steps, batch_size]`: the target of each
    step is the input of the next.
    """
    needed = batch_size * (steps + 1)
    if codes.shape[0] < needed:
        raise ValueError(f"{batch_size} streams of {steps} steps need {needed} characters, "
                         f"got {codes.shape[0]}")
    streams = codes[:needed].reshape(batch_size, steps + 1).T
    return streams[:-1], streams[1:]


def one_hot(codes: np.ndarray) -> np.ndarray:
    """`[...]` character codes -> `[..., VOCAB_SIZE]` float32 one-hot vectors."""
    return np.eye(VOCAB_SIZE, dtype=np.float32)[codes]


def segments(inputs: np.ndarray, targets: np.ndarray, length: int
             ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Consecutive `(xs[length, B, VOCAB_SIZE], ys[length, B])` pieces of the streams."""
    for start in range(0, inputs.shape[0], length):
        yield one_hot(inputs[start:start + length]), targets[start:start + length]


def train_jax(model: tbptt_jax.models.RecurrentModel, params: dict, inputs: np.ndarray,
              targets: np.ndarray, *, k1: int, k2: int, segment_length: int, lr: float
              ) -> tuple[dict, Run]:
    """Trains `params` with `tbptt_jax.tbptt_train_step`, one call per segment."""
    # One optimizer object for every call: a new one would be a new program to compile.
    optimizer = optax.adam(lr, b1=BETAS[0], b2=BETAS[1], eps=EPS)
    opt_state = optimizer.init(params)
    carry = model.initial_carry(inputs.shape[1])
    losses, seconds = [], []
    for xs, ys in segments(inputs, targets, segment_length):
        start = time.perf_counter()
        # The returned carry (an OverlapCarry when k2 > k1) continues the streams next call.
        params, opt_state, carry, metrics = tbptt_jax.tbptt_train_step(
            params, opt_state, carry, xs, ys, apply_fn=model.apply,
            loss_fn=tbptt_jax.losses.cross_entropy, optimizer=optimizer, k1=k1, k2=k2)
        # JAX dispatches asynchronously: wait for the results before reading the clock.
        jax.block_until_ready((params, opt_state, carry, metrics))
        seconds.append(time.perf_counter() - start)
        losses.append(np.asarray(metrics["loss"]))
    return params, Run(np.concatenate(losses), seconds)


def train_torch(model: tbptt_torch.models.RecurrentModel, inputs: np.ndarray,
                targets: np.ndarray, *, k1: int, k2: int, segment_length: int, lr: float
                ) -> Run:
    """Trains `model` in place with `tbptt_torch.tbptt_train_step`, one call per segment."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=BETAS, eps=EPS)
    carry = None  # the model's zero carry
    losses, seconds = [], []
    for xs, ys in segments(inputs, targets, segment_length):
        start = time.perf_counter()
        carry, segment_losses = tbptt_torch.tbptt_train_step(
            model, optimizer, carry, torch.from_numpy(xs), torch.from_numpy(ys),
            loss_fn=tbptt_torch.losses.cross_entropy, k1=k1, k2=k2)
        seconds.append(time.perf_counter() - start)
        losses.append(segment_losses.numpy())
    return Run(np.concatenate(losses), seconds)


def sample(model: tbptt_jax.models.RecurrentModel, params: dict, prompt: str, length: int,
           *, temperature: float, seed: int) -> str:
    """`prompt` followed by `length` characters drawn one at a time from the model."""
    apply = jax.jit(model.apply)
    carry, logits = apply(params, model.initial_carry(1), one_hot(encode(prompt)[:, None]))
    key = jax.random.key(seed)
    codes = []
    for _ in range(length):
        key, draw = jax.random.split(key)
        code = int(jax.random.categorical(draw, logits[-1, 0] / temperature))
        codes.append(code)
        carry, logits = apply(params, carry, one_hot(np.array([[code]])))
    return prompt + decode(codes)


def loss_table(runs: dict[str, np.ndarray], every: int) -> str:
    """Every `every`-th update's losses (and the last), side by side, with bits/char."""
    names = list(runs)
    header = f"{'update':>6}" + "".join(f"{name + ' loss':>13}" for name in names)
    if len(names) == 2:
        header += f"{'abs diff':>11}{'rel diff':>11}"
    lines = [header + f"{'bits/char':>11}"]
    count = len(runs[names[0]])
    for u in sorted({*range(0, count, every), count - 1}):
        losses = [float(runs[name][u]) for name in names]
        line = f"{u + 1:>6}" + "".join(f"{loss:>13.6f}" for loss in losses)
        if len(names) == 2:
            diff = abs(losses[0] - losses[1])
            line += f"{diff:>11.1e}{diff / abs(losses[1]):>11.1e}"
        lines.append(line + f"{losses[0] / math.log(2):>11.3f}")
    return "\n".join(lines)


def timing(name: str, seconds: list[float], compiling_calls: int) -> str:
    """One framework's wall time, the calls that compiled apart from the rest."""
    def calls(first: int, last: int) -> str:
        return f"call {first}" if first == last else f"calls {first}-{last}"

    parts = []
    if compiling_calls:
        compiling = sum(seconds[:compiling_calls])
        parts.append(f"{calls(1, compiling_calls)} (compile + run) {compiling:.2f} s")
    rest = seconds[compiling_calls:]
    if rest:
        parts.append(f"{calls(compiling_calls + 1, len(seconds))} {sum(rest):.2f} s "
                     f"({sum(rest) / len(rest):.3f} s/call)")
    return f"{name:<6}{sum(seconds):7.2f} s   " + "; ".join(parts)


def check_parity(jax_losses: np.ndarray, torch_losses: np.ndarray, *, checked_updates: int,
                 rtol: float) -> bool:
    """Prints how far the frameworks' losses are apart; True if within the tolerances.

    Both frameworks compute the same function in float32, but XLA and ATen round in their
    own order, so the first update's losses already differ by ~1e-7 relative. Training
    amplifies such differences, as it does any perturbation, the more so the larger the
    model and the learning rate: over hundreds of updates they can grow past 1e-3 without
    anything being wrong. So each of the first `checked_updates` updates must agree to
    `rtol` (over the first 50, the configurations we measured stayed within 1.5e-5, while
    restarting each call from a zero carry, the classic streaming mistake, differs by 2e-2
    at the first update of the second call); they span several calls, so the carry handed
    from call to call is checked too. Afterwards the two runs must still reach the same
    loss: the means of their last 10 updates within FINAL_RTOL.
    """
    diff = np.abs(jax_losses - torch_losses)
    rel = diff / np.abs(torch_losses)
    checked = rel[:checked_updates]
    jax_final, torch_final = jax_losses[-10:].mean(), torch_losses[-10:].mean()
    final_rel = abs(jax_final - torch_final) / torch_final
    print(f"\nJAX vs torch over all {len(rel)} updates: largest abs diff {diff.max():.2e}, "
          f"largest rel diff {rel.max():.2e} (update {int(np.argmax(rel)) + 1})")
    print(f"  updates 1-{len(checked)}: largest rel diff {checked.max():.2e} "
          f"(update {int(np.argmax(checked)) + 1}), tolerance {rtol:.0e}")
    print(f"  mean loss of the last 10 updates: {jax_final:.4f} vs {torch_final:.4f}, "
          f"rel diff {final_rel:.2e}, tolerance {FINAL_RTOL:.0e}")
    if checked.max() <= rtol and final_rel <= FINAL_RTOL:
        print("OK: the two frameworks trained the same model")
        return True
    print("FAIL: the frameworks' losses differ by more than the tolerance", file=sys.stderr)
    return False


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a character-level LSTM on the Python standard library's source "
                    "with TBPTT(k1, k2), in JAX and PyTorch from the same initial weights, "
                    "and compare their per-update losses.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--framework", choices=("both", "jax", "torch"), default="both",
                        help="which framework(s) to train; the losses are compared with both")
    parser.add_argument("--hidden", type=int, default=128, help="LSTM hidden size H")
    parser.add_argument("--layers", type=int, default=1, help="stacked LSTM layers")
    parser.add_argument("--k1", type=int, default=50, help="steps between updates")
    parser.add_argument("--k2", type=int, default=None,
                        help="steps each update backpropagates through (>= k1; default k1)")
    parser.add_argument("--batch", type=int, default=32, help="parallel streams B")
    parser.add_argument("--chars", type=int, default=330_000,
                        help="characters of text to read; the streams use whole calls of it")
    parser.add_argument("--updates-per-call", type=int, default=10,
                        help="TBPTT updates per call of tbptt_train_step (a call feeds "
                             "k1 * updates-per-call steps of every stream)")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the initial weights and of the sampling")
    parser.add_argument("--rtol", type=float, default=1e-4,
                        help="largest relative difference of the frameworks' losses allowed "
                             "in each of the first --checked-updates updates")
    parser.add_argument("--checked-updates", type=int, default=50,
                        help="updates held to --rtol; float32 rounding differences grow with "
                             "training, so later ones are only reported")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch.set_num_threads: at this model size a second thread "
                             "gains little, and on a busy machine torch's OpenMP threads "
                             "wait on each other (we saw small ops run about 100x slower)")
    parser.add_argument("--print-every", type=int, default=20, help="rows of the loss table")
    parser.add_argument("--prompt", default="def ", help="text the sample starts from")
    parser.add_argument("--sample-length", type=int, default=300, help="characters to sample")
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="sampling temperature (> 0; lower is greedier)")
    args = parser.parse_args(argv)
    for name in ("hidden", "layers", "k1", "batch", "chars", "updates_per_call",
                 "checked_updates", "torch_threads", "print_every", "sample_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.k2 is None:
        args.k2 = args.k1
    if args.k2 < args.k1:
        parser.error(f"--k2 must be >= --k1 = {args.k1}, got {args.k2}")
    if args.temperature <= 0:
        parser.error(f"--temperature must be > 0, got {args.temperature}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    segment_length = args.k1 * args.updates_per_call
    calls = (args.chars // args.batch - 1) // segment_length
    if calls < 1:
        print(f"--chars {args.chars} is too few for one call: {args.batch} streams of "
              f"{segment_length} steps need {args.batch * (segment_length + 1)} characters",
              file=sys.stderr)
        return 2
    steps = calls * segment_length

    corpus = load_corpus(args.chars)
    inputs, targets = make_streams(encode(corpus.text), args.batch, steps)
    used = args.batch * (steps + 1)
    print(f"text      {used:,} characters of {len(corpus.files)} modules of "
          f"{corpus.files[0].parent} ({corpus.files[0].name} .. {corpus.files[-1].name}), "
          f"Python {sys.version.split()[0]}")
    print(f"data      {args.batch} streams x {steps} steps, vocabulary {VOCAB_SIZE}, "
          f"{calls} calls x {args.updates_per_call} updates = {calls * args.updates_per_call} "
          f"updates of TBPTT(k1={args.k1}, k2={args.k2})")

    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(args.seed)
    torch_model = tbptt_torch.models.LSTMModel(VOCAB_SIZE, args.hidden, VOCAB_SIZE,
                                               num_layers=args.layers)
    jax_model = tbptt_jax.models.lstm(VOCAB_SIZE, args.hidden, VOCAB_SIZE,
                                      num_layers=args.layers)
    # The same initial weights for both: a copy of torch's, keyed as its state_dict().
    initial_params = tbptt_torch.to_jax(torch_model)
    print(f"model     LSTM, {args.layers} layer(s) of {args.hidden}, "
          f"{sum(p.size for p in initial_params.values()):,} parameters, float32; "
          f"Adam lr={args.lr}, betas={BETAS}, eps={EPS}")
    print(f"devices   JAX {jax.__version__} on {jax.devices()[0].platform}, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads")

    train = dict(k1=args.k1, k2=args.k2, segment_length=segment_length, lr=args.lr)
    runs: dict[str, Run] = {}
    if args.framework in ("both", "jax"):
        params, runs["jax"] = train_jax(jax_model, initial_params, inputs, targets, **train)
    if args.framework in ("both", "torch"):
        runs["torch"] = train_torch(torch_model, inputs, targets, **train)
    if "jax" not in runs:  # sample with the JAX model all the same, from torch's weights
        params = tbptt_torch.to_jax(torch_model)

    print()
    print(loss_table({name: run.losses for name, run in runs.items()}, args.print_every))
    print()
    for name, run in runs.items():
        first, last = run.losses[:10].mean(), run.losses[-10:].mean()
        print(f"{name:<6}mean loss of the first 10 updates {first:.4f} "
              f"({first / math.log(2):.3f} bits/char), of the last 10 {last:.4f} "
              f"({last / math.log(2):.3f} bits/char)")

    print("\nwall time")
    # With k2 > k1 the second call compiles too: it is the first to carry an overlap in.
    jax_compiling_calls = 1 if args.k2 == args.k1 else 2
    for name, run in runs.items():
        print(timing(name, run.seconds, jax_compiling_calls if name == "jax" else 0))

    source = "JAX" if "jax" in runs else "torch (weights moved to JAX)"
    print(f"\nsample from the trained {source} model (temperature {args.temperature}, "
          f"seed {args.seed}):")
    print(sample(jax_model, params, args.prompt, args.sample_length,
                 temperature=args.temperature, seed=args.seed))

    if len(runs) < 2:
        return 0
    return 0 if check_parity(runs["jax"].losses, runs["torch"].losses,
                             checked_updates=args.checked_updates, rtol=args.rtol) else 1


if __name__ == "__main__":
    sys.exit(main())

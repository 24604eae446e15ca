"""Text for the character-level language model of `tbptt train`, framework-free (numpy).

The default corpus ships with Python: the public top-level modules of its standard library
(`sysconfig.get_paths()["stdlib"]`) in sorted order, so nothing is downloaded and the data
is the same on every run of a given Python; `read_corpus` takes a file of one's own
instead. The alphabet is fixed: newline and the 95 printable ASCII characters, every other
character (tabs, non-ASCII) sharing one more symbol, so any text encodes. The text is cut
into B parallel contiguous streams (`streams` reads as much as a run needs; `tbptt.data`
cuts them) and fed time-major, one-hot, to the next-character task.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from tbptt.data import batchify, next_step_pairs, segments

# Newline and the 95 printable ASCII characters; every other character is OTHER.
ALPHABET = "\n" + "".join(chr(code) for code in range(32, 127))
OTHER = len(ALPHABET)
VOCAB_SIZE = len(ALPHABET) + 1
CODES = {char: code for code, char in enumerate(ALPHABET)}
OTHER_SHOWN_AS = "\N{REPLACEMENT CHARACTER}"
# Characters of the standard library read when a run says neither how many nor how long.
DEFAULT_STDLIB_CHARS = 330_000


class Corpus(NamedTuple):
    text: str
    files: list[Path]  # the files the text was read from, in order

    def name(self) -> str:
        """The file's name, or "the Python standard library"."""
        return self.files[0].name if len(self.files) == 1 else "the Python standard library"

    def describe(self) -> str:
        """Where the text came from, in a few words."""
        if len(self.files) == 1:
            return str(self.files[0])
        return (f"{len(self.files)} modules of {self.files[0].parent} ({self.files[0].name} .. "
                f"{self.files[-1].name})")


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


def read_corpus(path: str | Path, num_chars: int | None = None) -> Corpus:
    """The text of the file at `path` (UTF-8; undecodable bytes become OTHER), or its first
    `num_chars` characters."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--text must name a file, got {str(path)!r}")
    text = path.read_text(encoding="utf-8", errors="replace")
    if num_chars is not None:
        if len(text) < num_chars:
            raise ValueError(f"{path} holds {len(text)} characters, fewer than the "
                             f"{num_chars} asked for")
        text = text[:num_chars]
    return Corpus(text, [path])


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
    return next_step_pairs(batchify(codes[:needed], batch_size))


def one_hot(codes: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
    """`[...]` character codes -> `[..., VOCAB_SIZE]` one-hot vectors of `dtype`."""
    return np.eye(VOCAB_SIZE, dtype=dtype)[codes]


def one_hot_segments(inputs: np.ndarray, targets: np.ndarray, length: int,
                     dtype: Any = np.float32) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Consecutive `(xs[length, B, VOCAB_SIZE], ys[length, B])` pieces of the streams (the
    last may be shorter)."""
    for xs, ys in segments(inputs, targets, length=length):
        yield one_hot(xs, dtype), ys


class Streams(NamedTuple):
    """The text of a run cut into streams: `updates` updates of k1 steps, in `calls` calls."""

    corpus: Corpus
    inputs: np.ndarray  # shape=[steps, B], int32: character codes
    targets: np.ndarray  # shape=[steps, B], int32: the character after each input
    updates: int
    calls: int
    characters: int  # of the text the streams hold: B * (steps + 1)


def streams(path: str | Path | None, *, batch_size: int, k1: int, updates_per_call: int,
            updates: int | None = None, num_chars: int | None = None) -> Streams:
    """The streams of a run over the file at `path` (None: the standard library).

    With `updates`, the run is that many updates long and reads the characters it needs
    (or `num_chars`); without, it reads `num_chars` (default: all of a file, or
    `DEFAULT_STDLIB_CHARS` of the standard library) and makes as many whole calls of
    `updates_per_call` updates as they give.
    """
    segment_length = k1 * updates_per_call
    if updates is not None:
        steps = updates * k1
        num_chars = num_chars or batch_size * (steps + 1)
    elif num_chars is None and path is None:
        num_chars = DEFAULT_STDLIB_CHARS
    corpus = load_corpus(num_chars) if path is None else read_corpus(path, num_chars)
    if updates is None:
        calls = (len(corpus.text) // batch_size - 1) // segment_length
        if calls < 1:
            raise ValueError(f"{len(corpus.text)} characters are too few for one call: "
                             f"{batch_size} streams of {segment_length} steps need "
                             f"{batch_size * (segment_length + 1)}")
        steps = calls * segment_length
    inputs, targets = make_streams(encode(corpus.text), batch_size, steps)
    updates = steps // k1
    return Streams(corpus, inputs, targets, updates, -(-updates // updates_per_call),
                   batch_size * (steps + 1))

"""The word-level corpus, framework-free: English prose that ships with Python, the
docstrings of its standard library's public top-level modules.

word_language_model reads Wikitext-2's train/valid/test files, one sentence per line, each
line's words followed by `<eos>`. Here the text is every docstring (module, class and
function, read with `ast`, nothing imported or downloaded) of `sysconfig`'s `stdlib`
`[!_]*.py` in sorted order; each docstring line is lower-cased, cut into words, numbers and
single punctuation marks, and ended with `<eos>`. The vocabulary is capped: the
`vocab_size - 1` most frequent tokens of the training part (ties broken alphabetically)
and `<unk>` for every other token. The last `valid_fraction` of the token stream is the
validation part, so the two never share a docstring line's context.
"""

from __future__ import annotations

import ast
import collections
import re
import sysconfig
from pathlib import Path
from typing import NamedTuple

import numpy as np

from tbptt.checks import check_int

UNKNOWN = "<unk>"
END_OF_LINE = "<eos>"
TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)?|[0-9]+|[^\sa-z0-9]")


class Corpus(NamedTuple):
    words: list[str]  # the vocabulary: id -> word, UNKNOWN last
    train: np.ndarray  # shape=[N_train], int32 word ids
    valid: np.ndarray  # shape=[N_valid], int32 word ids
    files: int  # stdlib modules read

    @property
    def unknown_rate(self) -> float:
        """The share of training tokens outside the capped vocabulary."""
        return float(np.mean(self.train == len(self.words) - 1))


def docstrings(stdlib: Path | None = None) -> tuple[list[str], int]:
    """Every docstring of the standard library's public top-level modules, in file order
    and, within a file, in `ast.walk` order; and how many files were read."""
    stdlib = Path(sysconfig.get_paths()["stdlib"]) if stdlib is None else stdlib
    files = sorted(stdlib.glob("[!_]*.py"))
    found = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef)):
                text = ast.get_docstring(node)
                if text:
                    found.append(text)
    return found, len(files)


def tokenize(text: str) -> list[str]:
    """Each non-blank line's tokens, then `<eos>`."""
    tokens = []
    for line in text.splitlines():
        words = TOKEN.findall(line.lower())
        if words:
            tokens += [*words, END_OF_LINE]
    return tokens


def load(vocab_size: int, valid_fraction: float = 0.1) -> Corpus:
    """The corpus with a vocabulary of `vocab_size` words, `<unk>` included."""
    vocab_size = check_int("vocab_size", vocab_size, minimum=2)
    if not 0 < valid_fraction < 1:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction!r}")
    texts, files = docstrings()
    tokens = [token for text in texts for token in tokenize(text)]
    split = round(len(tokens) * (1 - valid_fraction))
    counts = collections.Counter(tokens[:split])
    ranked = sorted(counts, key=lambda word: (-counts[word], word))[:vocab_size - 1]
    words = [*ranked, UNKNOWN]
    ids = {word: index for index, word in enumerate(words)}
    stream = np.array([ids.get(token, len(words) - 1) for token in tokens], np.int32)
    return Corpus(words, stream[:split], stream[split:], files)

"""The README's Python examples, as programs a test can run and check.

Each ```python block of README.md is an `Example`, named after the `## ` or `### `
section it stands in. A `print(...)` line may state its output in a comment, on the same
line or on comment lines right below it; `check_output` holds what the program printed to
those comments: words exactly, numbers to `RTOL`, and numbers the comment gives as
rounding-level (below `TINY` in magnitude, such as a float32 round-off) only to stay that
small, since round-off differs from CPU to CPU. An exact 0 stays exact.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
RTOL = 1e-3
TINY = 1e-5
NUMBER = re.compile(r"-?\d+\.?\d*(?:e[-+]?\d+)?")


@dataclass(frozen=True)
class Example:
    section: str
    source: str

    def expected_output(self) -> list[str]:
        """The outputs the comments of the example's print lines state, in order."""
        expected: list[str] = []
        lines = self.source.splitlines()
        for i, line in enumerate(lines):
            if not line.lstrip().startswith("print("):
                continue
            comment = line.partition("  # ")[2]
            below = []
            for after in lines[i + 1:]:
                if not after.lstrip().startswith("# "):
                    break
                below.append(after.lstrip()[2:])
            if comment or below:
                expected.append(" ".join(filter(None, [comment, *below])))
        return expected


def examples(path: Path = README) -> list[Example]:
    found = []
    for section in re.split(r"^###? ", path.read_text(), flags=re.M)[1:]:
        title = section.splitlines()[0].strip()
        found += [Example(title, source)
                  for source in re.findall(r"```python\n(.*?)```", section, flags=re.S)]
    return found


def example(section: str) -> Example:
    """The one example of the README section titled `section`."""
    (found,) = [e for e in examples() if e.section == section]
    return found


def _same_number(expected: str, actual: str) -> bool:
    want, got = float(expected), float(actual)
    if want == 0:
        return got == 0
    if abs(want) < TINY:
        return abs(got) < TINY
    return math.isclose(got, want, rel_tol=RTOL)


def check_output(example: Example, printed: str) -> None:
    """Raises AssertionError unless `printed` holds every output the comments state."""
    lines = [line for line in printed.splitlines() if line.strip()]
    expected = example.expected_output()
    assert len(lines) >= len(expected), (
        f"README '{example.section}': expected {len(expected)} printed lines, got:\n{printed}")
    for want, got in zip(expected, lines[-len(expected):], strict=True):
        want_words, got_words = NUMBER.split(want), NUMBER.split(got)
        want_numbers, got_numbers = NUMBER.findall(want), NUMBER.findall(got)
        same = (want_words == got_words and len(want_numbers) == len(got_numbers)
                and all(map(_same_number, want_numbers, got_numbers)))
        assert same, f"README '{example.section}': the comment says {want!r}, printed {got!r}"

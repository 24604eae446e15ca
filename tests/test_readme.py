"""Every Python example of README.md runs as printed and prints what its comments say."""

from __future__ import annotations

import subprocess
import sys

import pytest
from readme_examples import README, check_output, examples

EXAMPLES = examples()


def test_the_readme_has_its_examples():
    assert {e.section for e in EXAMPLES} >= {"Quick start: JAX", "Quick start: PyTorch"}


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.section for e in EXAMPLES])
def test_a_readme_example_prints_what_it_says(example):
    done = subprocess.run([sys.executable, "-c", example.source], cwd=README.parent,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    check_output(example, done.stdout)


def test_a_wrong_comment_is_caught():
    example = next(e for e in EXAMPLES if e.section == "Quick start: PyTorch")
    with pytest.raises(AssertionError, match="the comment says"):
        check_output(example, "torch.Size([50])\ntensor(0.9755) tensor(0.4956)\n")
    with pytest.raises(AssertionError, match="the comment says"):
        check_output(example, "torch.Size([49])\ntensor(0.9655) tensor(0.4956)\n")

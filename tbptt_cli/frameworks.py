"""Which of JAX and PyTorch a command can use here, and the one line it prints when one it
needs is missing.

`pip install "tbptt[jax]"` and `pip install "tbptt[torch]"` each install the `tbptt`
command with one framework. A subcommand asks `missing(...)` before it imports anything of a
framework, so one that needs the absent framework exits with status 2 and a line saying
what to install, never with an import traceback.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

# What each framework's extra installs, as imported; a framework is usable when all import.
MODULES = {"jax": ("jax", "optax"), "torch": ("torch",)}
NAMES = {"jax": "JAX", "torch": "PyTorch"}


def import_error(framework: str) -> ImportError | None:
    """Why `framework` ("jax" or "torch") cannot be imported here, or None if it can."""
    for module in MODULES[framework]:
        try:
            importlib.import_module(module)
        except ImportError as error:  # not installed, or installed and broken
            return error
    return None


def missing(needs: Sequence[str]) -> str | None:
    """None if every framework of `needs` imports; otherwise what is missing and how to
    install it, e.g. `needs PyTorch, which cannot be imported here (No module named
    'torch'); pip install "tbptt[torch]"`."""
    errors = {name: error for name in needs if (error := import_error(name)) is not None}
    if not errors:
        return None
    wanted = " and ".join(NAMES[name] for name in needs)
    absent = " and ".join(NAMES[name] for name in errors)
    which = "which cannot" if len(needs) == 1 else f"and {absent} cannot"
    extra = next(iter(errors)) if len(errors) == 1 else "all"
    reasons = "; ".join(str(error) for error in errors.values())
    return (f"needs {wanted}, {which} be imported here ({reasons}); "
            f'pip install "tbptt[{extra}]"')

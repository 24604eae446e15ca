"""Loading what a command line names: `path/to/file.py:NAME` or `package.module:NAME`, and
data as `FILE.py:NAME` or `FILE.npz`.

`tbptt audit` and `tbptt parity` (and `tbptt_parity.load_object`) take the user's loop,
model, port and data this way, and load them alike: a file is run as `python FILE` would
run it, with its own folder first on `sys.path` (so a module beside it imports), once per
path, under a module name of its own (so pickling and dataclasses inside it work); and
every way the load can fail (no such file, no such name, an error while the user's code
runs) is one `ValueError` naming the spec, what was expected and what happened.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np


def load_object(spec: str, *, what: str = "NAME") -> Any:
    """The object `spec` names, `"path/to/file.py:NAME"` or `"package.module:NAME"`.

    `what` says what NAME should be, for the messages ("FUNCTION", "NAME").
    """
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ValueError(f"expected FILE.py:{what} or MODULE:{what}, got {spec!r}")
    if where.endswith(".py") or Path(where).is_file():
        module = _load_file(spec, Path(where))
    else:
        try:
            module = importlib.import_module(where)
        except Exception as error:  # the user's module may fail in any way while it runs
            raise ValueError(f"{spec!r}: cannot import {where}: {_described(error)}"
                             ) from error
    try:
        return getattr(module, name)
    except AttributeError:
        raise ValueError(f"{spec!r}: {where} defines no {name!r}") from None


def _load_file(spec: str, path: Path) -> Any:
    if not path.is_file():
        raise ValueError(f"{spec!r}: no file {path}")
    path = path.resolve()
    module_name = f"_tbptt_user_{path.stem}_{abs(hash(str(path)))}"
    module = sys.modules.get(module_name)
    if module is not None:
        return module
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"{spec!r}: {path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    folder = str(path.parent)
    sys.path.insert(0, folder)  # the file's own imports, as `python FILE` finds them
    try:
        module_spec.loader.exec_module(module)
    except BaseException as error:
        del sys.modules[module_name]
        if not isinstance(error, Exception):
            raise
        raise ValueError(f"{spec!r}: running {path.name} raised {_described(error)}"
                         ) from error
    finally:
        sys.path.remove(folder)
    return module


def _described(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def load_data(spec: str, *, option: str = "data") -> tuple[Any, Any]:
    """`(xs, ys)` from `FILE.npz` (holding the arrays `xs` and `ys`) or from `FILE.py:NAME`
    (a callable of no arguments returning the pair); `option` names the argument in errors."""
    if spec.endswith(".npz"):
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"{option} {spec!r}: no file {path}")
        try:
            with np.load(path) as arrays:
                missing = [key for key in ("xs", "ys") if key not in arrays.files]
                if missing:
                    raise ValueError(f"{option} {spec!r} must hold the arrays xs and ys, has "
                                     f"{sorted(arrays.files)}")
                return arrays["xs"], arrays["ys"]
        except (OSError, EOFError) as error:  # not an npz file numpy can read
            raise ValueError(f"{option} {spec!r}: cannot read it as .npz: "
                             f"{_described(error)}") from error
    data = load_object(spec)
    if not callable(data):
        raise ValueError(f"{option} {spec!r} must name a callable returning (xs, ys), got "
                         f"{type(data).__name__}")
    try:
        result = data()
    except Exception as error:  # the user's code may fail in any way
        raise ValueError(f"{option} {spec!r}: calling it raised {_described(error)}"
                         ) from error
    if not (isinstance(result, tuple) and len(result) == 2):
        raise ValueError(f"{option} {spec!r} must return a pair (xs, ys), got "
                         f"{type(result).__name__}")
    return result

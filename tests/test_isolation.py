"""The packages stand on floors, and each framework package works without the other.

Floors, one direction only: the framework-free core `tbptt` at the ground; `tbptt_jax` and
`tbptt_torch` on it, never importing each other; `tbptt_parity` above both; the
applications (`tbptt_cli`) and `benchmarks` on top, the command reaching the benchmarks and
never the reverse. The sources are read: every import, at any depth of a module's code,
must go down (or stay in its own package), and no module of either framework package, nor
the core, imports the other framework.

In a fresh interpreter, a `sys.meta_path` finder makes the other framework unimportable
(an `ImportError`, as when it is not installed); `tbptt_jax` must then import and train one
TBPTT call without torch, and `tbptt_torch` without jax.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BLOCKER = """
import importlib.abc
import sys

BLOCKED = {blocked!r}


class Unimportable(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked for this test")
        return None


sys.meta_path.insert(0, Unimportable())
for name in BLOCKED:
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"the blocker let {{name}} through")
"""

JAX_WITHOUT_TORCH = """
import jax
import jax.numpy as jnp
import numpy as np
import optax

import tbptt
import tbptt_jax

jax.config.update("jax_enable_x64", True)
model = tbptt_jax.models.elman(2, 3, 1)
params = model.init(jax.random.PRNGKey(0), jnp.float64)
optimizer = optax.sgd(0.1)
xs = jnp.asarray(np.random.default_rng(0).normal(size=(4, 2, 2)))
ys = jnp.asarray(np.random.default_rng(1).normal(size=(4, 2, 1)))
new_params, _, carry, metrics = tbptt_jax.tbptt_train_step(
    params, optimizer.init(params), model.initial_carry(2, jnp.float64), xs, ys,
    apply_fn=model.apply, loss_fn=tbptt_jax.losses.mse, optimizer=optimizer, k1=2)
assert metrics["loss"].shape == (2,) and bool(jnp.all(jnp.isfinite(metrics["loss"])))
assert carry.shape == (1, 2, 3)
assert any(not np.array_equal(new_params[k], params[k]) for k in params)
print("trained", sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
"""

TORCH_WITHOUT_JAX = """
import torch

import tbptt
import tbptt_torch

torch.manual_seed(0)
model = tbptt_torch.models.ElmanModel(2, 3, 1).double()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
before = {k: v.clone() for k, v in model.state_dict().items()}
xs = torch.randn(4, 2, 2, dtype=torch.float64)
ys = torch.randn(4, 2, 1, dtype=torch.float64)
carry, losses = tbptt_torch.tbptt_train_step(model, optimizer, None, xs, ys,
                                             loss_fn=tbptt_torch.losses.mse, k1=2)
assert losses.shape == (2,) and bool(torch.isfinite(losses).all())
assert tuple(carry.shape) == (1, 2, 3)
assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
params = tbptt_torch.to_jax(model)
tbptt_torch.load_jax(model, params)
print("trained", sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
"""


@pytest.mark.parametrize(("blocked", "script"), [
    pytest.param(("torch",), JAX_WITHOUT_TORCH, id="tbptt_jax-without-torch"),
    pytest.param(("jax", "jaxlib", "optax"), TORCH_WITHOUT_JAX, id="tbptt_torch-without-jax"),
])
def test_a_package_imports_and_trains_with_the_other_framework_unimportable(blocked, script):
    source = textwrap.dedent(BLOCKER.format(blocked=set(blocked))) + textwrap.dedent(script)
    result = subprocess.run([sys.executable, "-c", source], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "trained []"


OTHER_FRAMEWORK = {
    "tbptt_jax": {"torch"},
    "tbptt_torch": {"jax", "jaxlib", "optax", "flax", "equinox"},
    "tbptt": {"torch", "jax", "jaxlib", "optax", "flax", "equinox"},
}


def imported_roots(path: Path) -> set[str]:
    """Top-level names of every module a source file imports, at any depth of its code."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(
                node.func, "id", None)) in {"import_module", "__import__"} and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            roots.add(node.args[0].value.split(".")[0])
    return roots


@pytest.mark.parametrize("package", list(OTHER_FRAMEWORK))
def test_no_source_of_a_package_imports_the_other_framework(package):
    sources = sorted((ROOT / package).rglob("*.py"))
    assert sources, f"no sources found for {package}"
    for path in sources:
        forbidden = imported_roots(path) & OTHER_FRAMEWORK[package]
        assert not forbidden, f"{path.relative_to(ROOT)} imports {sorted(forbidden)}"


FLOORS = {"tbptt": 0, "tbptt_jax": 1, "tbptt_torch": 1, "tbptt_parity": 2, "tbptt_cli": 3,
          "benchmarks": 3}
# Imports between packages of one floor that are allowed (one direction, so no circle).
ACROSS = {("tbptt_cli", "benchmarks")}


def upward_imports(package: str) -> list[str]:
    """`path imports name` for every import of `package`'s sources that does not go down."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in sorted(imported_roots(path) & FLOORS.keys() - {package}):
            if FLOORS[name] >= FLOORS[package] and (package, name) not in ACROSS:
                found.append(f"{path.relative_to(ROOT)} imports {name}")
    return found


@pytest.mark.parametrize("package", list(FLOORS))
def test_no_package_imports_one_on_its_own_floor_or_above(package):
    assert upward_imports(package) == []


def test_the_floor_scan_sees_an_upward_import(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "tbptt").mkdir()
    (tmp_path / "tbptt" / "schedule.py").write_text("import numpy\nfrom tbptt import checks\n")
    assert upward_imports("tbptt") == []
    (tmp_path / "tbptt" / "text.py").write_text("def f():\n    from tbptt_cli import text\n")
    assert upward_imports("tbptt") == ["tbptt/text.py imports tbptt_cli"]
    (tmp_path / "tbptt_jax").mkdir()
    (tmp_path / "tbptt_jax" / "x.py").write_text("import tbptt_torch.models\n")
    assert upward_imports("tbptt_jax") == ["tbptt_jax/x.py imports tbptt_torch"]


def test_the_import_scan_sees_every_form_of_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import os.path\nfrom torch import nn\nimport importlib\n"
                      "def f():\n    import jax.numpy as jnp\n"
                      "    return importlib.import_module('optax')\n"
                      "from . import sibling\n")
    assert imported_roots(sample) == {"os", "torch", "importlib", "jax", "optax"}

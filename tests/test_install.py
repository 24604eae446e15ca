"""What users install is what is tested: the wheel, in a virtualenv of its own, away from
the checkout.

The wheel is built from a copy of the source tree as git sees it (tracked files and new
ones not ignored), so a file that exists only in this working tree cannot hide a gap. It
must hold every module and data file of the source packages. Then, for each extra that
matters (JAX only, torch only, all), it is installed into a fresh virtualenv (pip's cache
makes that a matter of seconds) and run from a folder outside the source tree with no
source path on `PYTHONPATH`: every public module imports from the installed location,
the README's quick starts print what the README says, `tbptt --help` and a tiny
`tbptt train` run (with the one framework installed, on that one, without matplotlib so
without its PNG), every command that needs the framework not installed says so in one line
with exit status 2, and the compiled CPU kernels build from the installed C++ source.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
from readme_examples import check_output, example

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tbptt", "tbptt_jax", "tbptt_torch", "tbptt_parity", "tbptt_cli")
# Package files a wheel must carry besides modules: the kernels' source, typing markers.
DATA_SUFFIXES = (".py", ".cc", "py.typed")
# The packages each extra is for (the core works with any).
EXTRAS = {
    "jax": {"tbptt", "tbptt_jax", "tbptt_cli"},
    "torch": {"tbptt", "tbptt_torch", "tbptt_cli"},
    "all": set(PACKAGES),
}
# A tiny `tbptt train`, otherwise with the defaults (progress bar, sample, --out).
TINY_TRAIN = ["--hidden", "8", "--k1", "5", "--batch", "2", "--chars", "200",
              "--updates-per-call", "4"]
# What each one-framework install must refuse: the command, and what its one line says.
REFUSED = {
    "jax": {("train",): "--framework both needs JAX and PyTorch, and PyTorch cannot be "
                        "imported here (No module named 'torch')",
            ("train", "--framework", "torch"): "--framework torch needs PyTorch",
            ("parity", "port.py:Model", "port.py:apply"): "tbptt parity: error: needs JAX "
                                                          "and PyTorch, and PyTorch cannot",
            ("audit", "loops.py:loop"): "tbptt audit: needs PyTorch, which cannot"},
    "torch": {("train",): "--framework both needs JAX and PyTorch, and JAX cannot be "
                          "imported here (No module named 'jax')",
              ("train", "--framework", "jax"): "--framework jax needs JAX",
              ("parity", "port.py:Model", "port.py:apply"): "tbptt parity: error: needs JAX "
                                                            "and PyTorch, and JAX cannot"},
}


def _source_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    return [name for name in listed if (ROOT / name).is_file()]


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built by pip from a clean copy of the source tree."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"
    for name in _source_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w",
                    str(base / "dist"), str(source)], check=True, capture_output=True,
                   timeout=300)
    (built,) = (base / "dist").glob("tbptt-*.whl")
    return built


def test_the_wheel_holds_every_module_and_data_file_of_the_packages(wheel):
    expected = {name for name in _source_files()
                if name.split("/")[0] in PACKAGES and name.endswith(DATA_SUFFIXES)}
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
    shipped = {name for name in names if ".dist-info/" not in name}
    assert expected - shipped == set(), "the wheel lacks these files of the source tree"
    assert shipped - expected == set(), "the wheel holds files that are not in the packages"
    assert {"tbptt_jax/csrc/lstm.cc", "tbptt_jax/adapters/__init__.py"} <= shipped
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    text = metadata.decode()
    assert "Description-Content-Type: text/markdown" in text
    assert (ROOT / "README.md").read_text().strip() in text
    assert "Classifier: Typing :: Typed" in text and "License-Expression: Apache-2.0" in text


CHECK_MODULES = """
import importlib, importlib.metadata, json, sys
from pathlib import Path

packages = set(json.loads(sys.argv[1]))
site = Path(sys.argv[2]).resolve()
imported = []
for file in importlib.metadata.files("tbptt"):
    parts = file.with_suffix("").parts
    if file.suffix != ".py" or parts[0] not in packages:
        continue
    if parts[-1] == "__init__":
        parts = parts[:-1]
    if any(part.startswith("_") for part in parts):
        continue
    name = ".".join(parts)
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().is_relative_to(site), (name, module.__file__)
    imported.append(name)
print(json.dumps(sorted(imported)))
"""

CHECK_KERNELS = """
import sys
from pathlib import Path

from tbptt_jax import _native

assert _native.available(), "the compiled kernels did not build"
assert Path(_native.SOURCE).resolve().is_relative_to(Path(sys.argv[1]).resolve())
print(sorted(path.name for path in _native.cache_dir().glob("*.so")))
"""


def _installed(wheel: Path, extra: str, where: Path) -> Path:
    """A fresh virtualenv holding the wheel with `extra`; returns its Python."""
    venv.EnvBuilder(with_pip=True).create(where)
    python = where / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-c",
                    str(ROOT / "constraints.txt"), f"{wheel}[{extra}]"], check=True,
                   capture_output=True, timeout=900)
    return python


@pytest.mark.parametrize("extra", list(EXTRAS))
def test_the_installed_wheel_works_away_from_the_checkout(wheel, extra, tmp_path):
    python = _installed(wheel, extra, tmp_path / "venv")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    site = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip())
    environment = {name: value for name, value in os.environ.items()
                   if name not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    environment["TBPTT_CACHE_DIR"] = str(tmp_path / "kernel-cache")

    def run(what: str, *arguments: str) -> subprocess.CompletedProcess:
        done = subprocess.run(arguments, cwd=elsewhere, env=environment, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, f"{what} failed ([{extra}]):\n{done.stderr[-3000:]}"
        return done

    imported = json.loads(run("importing the public modules", str(python), "-c",
                              CHECK_MODULES, json.dumps(sorted(EXTRAS[extra])),
                              str(site)).stdout)
    assert {"tbptt", "tbptt.schedule", "tbptt.checks"} <= set(imported)
    assert ("tbptt_jax" in imported) == (extra != "torch")
    assert ("tbptt_torch" in imported) == (extra != "jax")

    for framework, section in (("jax", "Quick start: JAX"), ("torch", "Quick start: PyTorch")):
        if f"tbptt_{framework}" in EXTRAS[extra]:
            quick_start = example(section)
            check_output(quick_start, run(section, str(python), "-c", quick_start.source).stdout)

    if extra != "torch":
        built = run("building the kernels", str(python), "-c", CHECK_KERNELS, str(site)).stdout
        assert built.startswith("['tbptt_lstm-"), built

    tbptt = str(python.parent / "tbptt")
    assert "train" in run("tbptt --help", tbptt, "--help").stdout
    if extra == "all":
        trained = run("tbptt train", tbptt, "train", *TINY_TRAIN, "--sample-length", "0",
                      "--no-progress", "--out", str(tmp_path / "run")).stdout
        assert "OK: the two frameworks trained the same model" in trained
        assert (tmp_path / "run" / "loss_curve.png").is_file()
        assert (tmp_path / "run" / "train_log.json").is_file()
        return

    trained = run(f"tbptt train --framework {extra}", tbptt, "train", "--framework", extra,
                  *TINY_TRAIN).stdout
    log = json.loads((elsewhere / "tbptt-train" / "train_log.json").read_text())
    assert list(log["runs"]) == [extra] and len(log["runs"][extra]["losses"]) == 16
    assert log["sample"].startswith("def ") and len(log["sample"]) == 4 + 300
    assert ("(no loss_curve.png: No module named 'matplotlib'; pip install \"tbptt[plot]\")"
            in trained)
    for command, message in REFUSED[extra].items():
        done = subprocess.run([tbptt, *command], cwd=elsewhere, env=environment,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 2 and done.stdout == "", (command, done.stderr[-3000:])
        assert len(done.stderr.splitlines()) == 1 and message in done.stderr, (command,
                                                                                done.stderr)

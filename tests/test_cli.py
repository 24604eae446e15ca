"""The `tbptt` command's `train` and `parity` subcommands: complete help, a tiny training run
whose JSON log and PNG hold what was printed, each framework training alone with the other
unimportable (and every command that needs the missing one saying so in one line, status
2), a port check that passes a correct port and fails a wrong one naming update 1 and the
parameter, loads the user's files as Python runs them (siblings import; any failure a
one-line error, status 2), checks a token model on token ids, and the progress bar."""

import argparse
import io
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import tqdm.std
from test_isolation import BLOCKER, imported_roots

import tbptt_parity
from tbptt.loading import load_object
from tbptt_cli import cli
from tbptt_cli.commands import parity, train
from tbptt_cli.progress import Progress

ROOT = Path(__file__).resolve().parents[1]
PORT = ROOT / "examples" / "port_check.py"
TOKENS = ROOT / "tests" / "fixtures" / "token_port.py"


def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("name", ["train", "parity"])
def test_help_describes_the_command_and_every_option(name):
    subparser = subcommand_parsers()[name]
    text = subparser.format_help()
    module = {"train": train, "parity": parity}[name]
    assert module.__doc__.strip().splitlines()[0] in text
    for action in subparser._actions:
        assert action.help, f"{action.dest} has no help"
        for option in action.option_strings or [action.metavar]:
            assert option in text
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            assert "default" in action.help, f"{action.dest} does not say its default"


def test_the_command_lists_its_subcommands_and_imports_no_framework_for_help():
    code = ("import sys\nfrom tbptt_cli import cli\ntext = cli.build_parser().format_help()\n"
            "print(sorted(m for m in ('jax', 'torch') if m in sys.modules))\nprint(text)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    imported, _, text = result.stdout.partition("\n")
    assert imported == "[]"
    assert "train" in text and "parity" in text


def test_the_parity_command_offers_the_optimizers_and_losses_compare_knows():
    options = {a.dest: a for a in subcommand_parsers()["parity"]._actions}
    assert tuple(options["optimizer"].choices) == tuple(tbptt_parity.OPTIMIZERS)
    assert tuple(options["loss"].choices) == tuple(tbptt_parity.LOSSES)


def test_train_writes_a_json_log_and_a_png_that_hold_the_run(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 3)
    out = tmp_path / "run"
    status = cli.main(["train", "--text", str(corpus), "--cell", "gru", "--hidden", "8",
                       "--batch", "2", "--k1", "4", "--k2", "6", "--updates", "6",
                       "--updates-per-call", "3", "--dtype", "float64", "--print-every", "5",
                       "--sample-length", "5", "--out", str(out)])
    printed, progress = capsys.readouterr()
    assert status == 0, printed
    log = json.loads((out / train.LOG_NAME).read_text())

    assert log["data"] == {"source": str(corpus), "characters": 2 * (6 * 4 + 1),
                           "streams": 2, "steps": 24, "vocabulary": 97, "calls": 2,
                           "updates": 6}
    assert log["config"]["k2"] == 6 and log["model"]["cell"] == "gru"
    assert log["model"]["parameters"] == 3 * 8 * (97 + 8 + 2) + 97 * 8 + 97
    jax_losses, torch_losses = (np.array(log["runs"][n]["losses"]) for n in ("jax", "torch"))
    assert jax_losses.shape == (6,) and len(log["runs"]["jax"]["call_seconds"]) == 2
    assert log["runs"]["jax"]["compiling_calls"] == 2  # k2 > k1: the second call compiles too
    # float64: the frameworks agree to rounding, and the log's parity block says so.
    np.testing.assert_allclose(jax_losses, torch_losses, rtol=1e-12)
    assert log["parity"]["ok"] and log["parity"]["largest_rel_diff"] < 1e-12
    assert math.isclose(log["parity"]["final_jax"], jax_losses[-6:].mean())
    # The table printed is the log's numbers: updates 1, 6 (every 5th and the last).
    for u in (1, 6):
        assert (f"{u:>6}{jax_losses[u - 1]:>13.6f}{torch_losses[u - 1]:>13.6f}"
                in printed)
    assert log["sample"].startswith("def ") and len(log["sample"]) == 4 + 5
    assert f"wrote {out / train.LOG_NAME} and {out / train.PLOT_NAME}" in printed
    assert progress == ""  # the progress bar is drawn on a terminal only

    image = matplotlib.image.imread(out / train.PLOT_NAME)
    assert image.shape[:2] == (round(6.5 * 110), 8 * 110)  # two panels: losses, difference


def test_train_with_one_framework_plots_one_curve(tmp_path, capsys):
    out = tmp_path / "run"
    status = cli.main(["train", "--framework", "torch", "--hidden", "8", "--batch", "2",
                       "--k1", "5", "--updates", "4", "--updates-per-call", "2",
                       "--sample-length", "0", "--no-progress", "--out", str(out)])
    printed, progress = capsys.readouterr()
    assert status == 0 and progress == ""
    log = json.loads((out / train.LOG_NAME).read_text())
    assert list(log["runs"]) == ["torch"] and log["parity"] is None and log["sample"] is None
    assert len(log["runs"]["torch"]["losses"]) == 4
    assert "jax loss" not in printed and "torch loss" in printed
    assert matplotlib.image.imread(out / train.PLOT_NAME).shape[:2] == (round(4.5 * 110), 880)


def test_train_splits_the_batch_over_two_jax_devices_with_the_same_updates(tmp_path):
    # A fresh process: the number of CPU devices is fixed when JAX's backends start.
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 4)
    out = tmp_path / "run"
    arguments = ["train", "--text", str(corpus), "--hidden", "8", "--batch", "4", "--k1", "4",
                 "--updates", "6", "--updates-per-call", "3", "--dtype", "float64",
                 "--sample-length", "5", "--no-progress", "--jax-devices", "2",
                 "--out", str(out)]
    done = subprocess.run([sys.executable, "-m", "tbptt_cli", *arguments], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "on cpu (2 devices, the batch split over them)" in done.stdout
    log = json.loads((out / train.LOG_NAME).read_text())
    assert log["config"]["jax_devices"] == 2
    jax_losses, torch_losses = (np.array(log["runs"][n]["losses"]) for n in ("jax", "torch"))
    assert jax_losses.shape == (6,) and np.ptp(jax_losses) > 0
    # float64: the split batch trains the same updates as torch's whole one, to rounding.
    np.testing.assert_allclose(jax_losses, torch_losses, rtol=1e-12)
    assert log["sample"].startswith("def ")


@pytest.mark.parametrize(("arguments", "message"), [
    (["--k1", "5", "--k2", "4"], "k2 must be >= k1 (k1=5), got k2=4"),
    (["--k1", "0"], "k1 must be a positive int, got 0"),
    (["--batch", "3", "--jax-devices", "2"],
     "--batch must split evenly over --jax-devices = 2, got 3"),
    (["--jax-devices", "0"], "--jax-devices must be a positive int, got 0"),
    (["--batch", "0"], "--batch must be a positive int, got 0"),
    (["--updates", "0"], "--updates must be a positive int, got 0"),
    (["--sample-length", "-1"], "--sample-length must be an int >= 0, got -1"),
    (["--lr", "0"], "--lr must be > 0, got 0.0"),
    (["--prompt", ""], "--prompt must hold one character or more to sample from, got ''"),
    (["--text", "/nonexistent/corpus.txt"], "--text must name a file"),
    (["--chars", "100", "--batch", "4"], "100 characters are too few for one call"),
])
def test_train_rejects_bad_options_with_status_2(arguments, message, capsys):
    assert cli.main(["train", "--no-progress", *arguments]) == 2
    assert message in capsys.readouterr().err


RUN_COMMANDS = """
import contextlib, io, json, sys

from tbptt_cli import cli

results = {}
for name, argv in json.loads(sys.argv[1]).items():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(argv)
    results[name] = {"status": status, "out": out.getvalue(), "err": err.getvalue()}
results["imported"] = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps(results))
"""
TINY_RUN = ["--cell", "gru", "--hidden", "8", "--batch", "2", "--k1", "5", "--updates", "4",
            "--updates-per-call", "2", "--dtype", "float64", "--sample-length", "5"]
PORT_SPECS = [f"{PORT}:Forecaster", f"{PORT}:forecaster_apply"]
AUDIT = ["audit", f"{ROOT / 'examples' / 'audit_loops.py'}:per_step_loop", "--k1", "4",
         "--reduction", "sum", "--tail", "drop"]


@pytest.mark.parametrize(("framework", "blocked", "refused"), [
    pytest.param("jax", ("torch", "matplotlib"), {
        "train": "--framework both needs JAX and PyTorch, and PyTorch cannot be imported here "
                 "(torch is blocked for this test); pip install \"tbptt[torch]\", or train "
                 "with --framework jax",
        "train --framework torch": "--framework torch needs PyTorch, which cannot be imported",
        "parity": "tbptt parity: error: needs JAX and PyTorch, and PyTorch cannot be imported",
        "audit": "tbptt audit: needs PyTorch, which cannot be imported here",
    }, id="jax-without-torch-and-matplotlib"),
    pytest.param("torch", ("jax", "jaxlib", "optax"), {
        "train": "--framework both needs JAX and PyTorch, and JAX cannot be imported here "
                 "(jax is blocked for this test); pip install \"tbptt[jax]\", or train "
                 "with --framework torch",
        "train --framework jax": "--framework jax needs JAX, which cannot be imported",
        "parity": "tbptt parity: error: needs JAX and PyTorch, and JAX cannot be imported",
    }, id="torch-without-jax"),
])
def test_train_runs_on_one_framework_and_commands_needing_the_other_say_so(
        framework, blocked, refused, tmp_path, capsys):
    out = tmp_path / "alone"
    commands = {"train alone": ["train", "--framework", framework, *TINY_RUN, "--no-progress",
                                "--out", str(out)],
                "train": ["train", *TINY_RUN], "parity": ["parity", *PORT_SPECS],
                "audit": AUDIT}
    other = "torch" if framework == "jax" else "jax"
    commands[f"train --framework {other}"] = ["train", "--framework", other, *TINY_RUN]
    source = textwrap.dedent(BLOCKER.format(blocked=set(blocked))) + RUN_COMMANDS
    done = subprocess.run([sys.executable, "-c", source, json.dumps(commands)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    assert results.pop("imported") == []

    for name, message in refused.items():
        result = results.pop(name)
        assert result["status"] == 2 and result["out"] == "", (name, result)
        assert len(result["err"].splitlines()) == 1 and message in result["err"], (name, result)
    if framework == "torch":  # the audit needs torch only
        assert results.pop("audit")["status"] == 0

    alone = results.pop("train alone")
    assert alone["status"] == 0, alone
    assert results == {}
    log = json.loads((out / train.LOG_NAME).read_text())
    assert list(log["runs"]) == [framework] and log["parity"] is None
    assert log["sample"].startswith("def ") and len(log["sample"]) == 9
    if framework == "jax":  # no matplotlib either, as after pip install "tbptt[jax]"
        assert (f"wrote {out / train.LOG_NAME} (no {train.PLOT_NAME}: matplotlib is blocked for "
                f"this test; pip install \"tbptt[plot]\")") in alone["out"]
        assert not (out / train.PLOT_NAME).exists()
    # The same run with both frameworks importable: JAX's run is the same (its weights are
    # JAX's draw either way); torch alone draws its own, so its losses are another run's.
    both = tmp_path / "both"
    assert cli.main(["train", *TINY_RUN, "--no-progress", "--out", str(both)]) == 0
    capsys.readouterr()
    runs = json.loads((both / train.LOG_NAME).read_text())["runs"]
    alone_losses = np.array(log["runs"][framework]["losses"])
    if framework == "jax":
        np.testing.assert_allclose(alone_losses, runs["jax"]["losses"], rtol=1e-12)
    else:
        assert abs(alone_losses[0] - runs["torch"]["losses"][0]) > 1e-3


def test_only_the_framework_halves_of_the_model_import_a_framework():
    """The rest of the command needs neither; `audit` and `parity` import what they need
    inside run(), once they have checked it is installed."""
    jax_names, torch_names = {"jax", "jaxlib", "optax", "tbptt_jax"}, {"torch", "tbptt_torch"}
    allowed = {"char_lm/_jax.py": jax_names, "char_lm/_torch.py": torch_names,
               "commands/audit.py": {"tbptt_torch"}, "commands/parity.py": {"tbptt_parity"}}
    package = ROOT / "tbptt_cli"
    for path in sorted(package.rglob("*.py")):
        name = path.relative_to(package).as_posix()
        found = imported_roots(path) & (jax_names | torch_names | {"tbptt_parity"})
        assert found <= allowed.get(name, set()), f"tbptt_cli/{name} imports {sorted(found)}"
    assert set(allowed) <= {p.relative_to(package).as_posix() for p in package.rglob("*.py")}


def test_parity_passes_a_correct_port(capsys):
    status = cli.main(["parity", f"{PORT}:Forecaster", f"{PORT}:forecaster_apply",
                       "--steps", "10", "--batch", "2", "--optimizer", "adam", "--lr", "0.01"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "data    xs [10, 2, 3], ys [10, 2, 2], random (seed 0)" in printed
    assert "OK: the port agrees with torch over all 2 updates to 1e-10" in printed


def test_parity_fails_a_wrong_port_naming_update_1_and_the_parameter(capsys):
    status = cli.main(["parity", f"{PORT}:Forecaster", f"{PORT}:wrong_forecaster_apply",
                       "--steps", "10", "--batch", "2"])
    printed = capsys.readouterr().out
    assert status == 1
    assert "DIVERGED at update 1: the gradient of 'gru.bias_hh_l0' differs by" in printed
    rows = [line for line in printed.splitlines() if line.startswith("     1 ")]
    assert len(rows) == 1 and rows[0].endswith("gru.bias_hh_l0")
    assert not any(line.startswith("     2 ") for line in printed.splitlines())


def test_parity_takes_data_from_a_file_of_ones_own(tmp_path, capsys):
    data = tmp_path / "my_data.py"
    data.write_text("import numpy as np\n\ndef sequences():\n"
                    "    rng = np.random.default_rng(3)\n"
                    "    return rng.normal(size=(6, 2, 3)), rng.integers(0, 2, (6, 2))\n")
    status = cli.main(["parity", f"{PORT}:Forecaster", f"{PORT}:forecaster_apply",
                       "--data", f"{data}:sequences", "--loss", "cross_entropy", "--k1", "3",
                       "--dtype", "float32"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert f"data    xs [6, 2, 3], ys [6, 2] from {data}:sequences" in printed
    assert "tolerance 1e-05 relative (scale: trajectory)" in printed


@pytest.mark.parametrize(("specs", "message"), [
    (["nofile.py:Forecaster", f"{PORT}:forecaster_apply"], "no file nofile.py"),
    ([f"{PORT}:Missing", f"{PORT}:forecaster_apply"], "defines no 'Missing'"),
    ([f"{PORT}", f"{PORT}:forecaster_apply"], "expected FILE.py:NAME or MODULE:NAME"),
    (["no_such_module_xyz:f", f"{PORT}:forecaster_apply"], "cannot import no_such_module_xyz"),
])
def test_parity_names_a_bad_port_spec_with_status_2(specs, message, capsys):
    assert cli.main(["parity", *specs]) == 2
    assert message in capsys.readouterr().err


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def test_parity_runs_a_file_as_python_does_so_its_sibling_modules_import(tmp_path, capsys):
    write(tmp_path / "sizes.py", "HIDDEN = 6\n")
    port = write(tmp_path / "my_port.py", """\
        import sizes
        from examples.port_check import Forecaster, forecaster_apply


        def model():
            return Forecaster(hidden_size=sizes.HIDDEN)
        """)
    status = cli.main(["parity", f"{port}:model", f"{port}:forecaster_apply", "--steps", "10",
                       "--batch", "2"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "(Forecaster, 212 parameters)" in printed  # 3 * 6 * (3 + 6 + 2) + 6 * 2 + 2


@pytest.mark.parametrize(("source", "specs", "message"), [
    ("import no_such_module_for_tbptt\n", ("model", "apply"),
     "running {name} raised ModuleNotFoundError: No module named 'no_such_module_for_tbptt'"),
    ("def model():\n    raise RuntimeError('no weights here')\n\napply = print\n",
     ("model", "apply"), "{spec}:model': calling it raised RuntimeError: no weights here"),
    ("from examples.port_check import Forecaster, forecaster_apply\n\n"
     "def data():\n    raise OSError('the disk is gone')\n",
     ("Forecaster", "forecaster_apply", "--data", "data"),
     "--data '{spec}:data': calling it raised OSError: the disk is gone"),
], ids=["import-error", "factory-raises", "data-raises"])
def test_parity_says_what_failed_in_ones_own_module_with_status_2(tmp_path, capsys, source,
                                                                    specs, message):
    module = write(tmp_path / "broken_port.py", source)
    torch_spec, jax_spec, *data = specs
    arguments = [f"{module}:{torch_spec}", f"{module}:{jax_spec}"]
    if data:
        arguments += [data[0], f"{module}:{data[1]}"]
    assert cli.main(["parity", *arguments]) == 2
    error = capsys.readouterr().err
    assert message.format(name=module.name, spec=module) in error
    assert len(error.strip().splitlines()) == 1 and "Traceback" not in error


def test_parity_random_data_calls_forward_with_a_carry(tmp_path, capsys):
    port = write(tmp_path / "strict_port.py", """\
        from examples.port_check import Forecaster, forecaster_apply


        class Strict(Forecaster):
            def forward(self, xs, carry):  # no default carry, as the docs allow
                return super().forward(xs, carry)
        """)
    status = cli.main(["parity", f"{port}:Strict", f"{port}:forecaster_apply", "--steps", "10",
                       "--batch", "2"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "data    xs [10, 2, 3], ys [10, 2, 2], random (seed 0)" in printed


def test_parity_checks_a_token_model_on_random_token_ids(capsys):
    status = cli.main(["parity", f"{TOKENS}:TokenForecaster",
                       f"{TOKENS}:token_forecaster_apply", "--loss", "cross_entropy",
                       "--steps", "12", "--batch", "3", "--k1", "4"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "data    xs [12, 3] token ids, ys [12, 3], random (seed 0)" in printed
    assert "OK: the port agrees with torch over all 3 updates to 1e-10" in printed
    xs, _ = tbptt_parity.random_data(load_object(f"{TOKENS}:TokenForecaster")(), steps=5,
                                     batch_size=2, vocab_size=4, loss_fn="cross_entropy")
    assert xs.shape == (5, 2) and xs.dtype.kind == "i" and xs.max() < 4


def test_parity_reads_token_data_from_an_npz_file(tmp_path, capsys):
    rng = np.random.default_rng(0)
    data = tmp_path / "tokens.npz"
    np.savez(data, xs=rng.integers(0, 7, (9, 2)), ys=rng.integers(0, 7, (9, 2)))
    status = cli.main(["parity", f"{TOKENS}:TokenForecaster",
                       f"{TOKENS}:token_forecaster_apply", "--loss", "cross_entropy",
                       "--data", str(data), "--k1", "3"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert f"data    xs [9, 2] token ids, ys [9, 2] from {data}" in printed
    np.savez(data, inputs=np.zeros((9, 2)))
    assert cli.main(["parity", f"{TOKENS}:TokenForecaster",
                     f"{TOKENS}:token_forecaster_apply", "--data", str(data)]) == 2
    assert "must hold the arrays xs and ys, has ['inputs']" in capsys.readouterr().err


class Terminal(io.StringIO):
    def isatty(self):
        return True


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_shows_the_loss_and_rates_timed_from_the_first_report(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(tqdm.std, "time", clock)  # tqdm's clock, read when a bar starts
    stream = Terminal()
    progress = Progress("jax", 20, steps_per_update=50, stream=stream)
    for done in range(2, 21, 2):
        clock.now += 30.0 if done == 2 else 0.5  # the first call compiles
        progress.update(done, loss=1.0 / done)
    progress.close()
    frames = stream.getvalue().split("\r")
    assert frames[1].startswith("jax  :  10%|") and frames[1].endswith(
        " 2/20 [00:00<?, ?update/s, loss 0.5000]")
    # 18 updates in 4.5 s after the first report: 4 updates/s, 200 steps/s; the 30 s
    # before it are not counted.
    assert frames[-1].startswith("jax  : 100%|") and frames[-1].endswith(
        " 20/20 [00:04<00:00,  4.00update/s, loss 0.0500, 200 steps/s]\n")


def test_progress_draws_nothing_off_a_terminal():
    stream = io.StringIO()
    progress = Progress("torch", 4, steps_per_update=5, stream=stream)
    for done in range(1, 5):
        progress.update(done, loss=2.0)
    progress.close()
    assert stream.getvalue() == ""

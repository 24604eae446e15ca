"""Renders a results file of the benchmark suite: a markdown report and PNG plots.

Everything here is computed from the JSON that `benchmarks.suite` wrote, never typed by
hand: the per-configuration table (time per call and per update, sequence-steps per
second, first call and compile time, peak memory, GFLOP/s, time relative to JAX, and how
far each implementation's losses were from JAX's), the targets of `TARGETS` with pass or
fail, the streamed-memory check, and three plots.

    python -m benchmarks.report benchmarks/results/cpu.json   # writes cpu.md, cpu-*.png
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

MIB = 2 ** 20

# (name, threshold): the targets of issue 3, checked by `evaluate_targets`.
TARGETS = {
    "fused": ("torch-fused time / jax time >= 1.0", 1.0),
    "fused-S": ("torch-fused time / jax time >= 5 on S", 5.0),
    "hand-S": ("torch-hand time / jax time >= 20 on S", 20.0),
    "matmul-L": ("L-LSTM: jax reaches >= 70% of the measured matrix-product rate", 0.7),
    "compile-M": ("compile time of the M step <= 5 s", 5.0),
    "compile-recipe": ("compile time of TBPTT(2, 100) <= 3x that of TBPTT(100, 100) (recipe)",
                       3.0),
    "memory": ("streamed peak memory of the long run within 1.1x of the short run", 1.1),
}


class Target(NamedTuple):
    """One target checked on one benchmark (or framework, for memory)."""

    key: str  # of TARGETS
    subject: str  # what it was checked on, e.g. "S lstm" or "torch"
    value: float | None  # the measured figure; None when it could not be measured
    threshold: float
    passed: bool | None  # None when value is None
    # For a time ratio: its lowest and highest value over the rounds of timed calls (each
    # round times every implementation once, back to back), a measure of the run's noise.
    spread: tuple[float, float] | None = None


def _impl(benchmark: dict[str, Any], name: str) -> dict[str, Any] | None:
    entry = benchmark["implementations"].get(name)
    return entry if entry is not None and entry.get("status") == "ok" else None


def time_ratio(benchmark: dict[str, Any], name: str, reference: str = "jax") -> float | None:
    """Median time of `name` over that of `reference` (> 1: the reference is faster)."""
    entry, ref = _impl(benchmark, name), _impl(benchmark, reference)
    if entry is None or ref is None:
        return None
    return entry["median_s"] / ref["median_s"]


def round_ratios(benchmark: dict[str, Any], name: str, reference: str = "jax"
                 ) -> list[float] | None:
    """`time_ratio` within each round of timed calls: `name`'s time over the reference's
    time of the same round."""
    entry, ref = _impl(benchmark, name), _impl(benchmark, reference)
    if entry is None or ref is None or not entry.get("times_s") or \
            len(entry["times_s"]) != len(ref.get("times_s", ())):
        return None
    return [mine / theirs for mine, theirs in zip(entry["times_s"], ref["times_s"], strict=True)]


def _at_least(key: str, subject: str, value: float | None,
              rounds: list[float] | None = None) -> Target:
    threshold = TARGETS[key][1]
    return Target(key, subject, value, threshold, None if value is None else value >= threshold,
                  None if not rounds else (min(rounds), max(rounds)))


def _at_most(key: str, subject: str, value: float | None) -> Target:
    threshold = TARGETS[key][1]
    return Target(key, subject, value, threshold, None if value is None else value <= threshold)


def evaluate_targets(results: dict[str, Any]) -> list[Target]:
    """Every target of `TARGETS` on every benchmark it concerns, from a results dict."""
    targets = []
    matmul = (results.get("matmul") or {}).get("best_gflops")
    for benchmark in results["benchmarks"]:
        subject = f"{benchmark['config']} {benchmark['cell']}"
        fused = time_ratio(benchmark, "torch-fused")
        fused_rounds = round_ratios(benchmark, "torch-fused")
        targets.append(_at_least("fused", subject, fused, fused_rounds))
        if benchmark["config"] == "S":
            targets.append(_at_least("fused-S", subject, fused, fused_rounds))
            targets.append(_at_least("hand-S", subject, time_ratio(benchmark, "torch-hand"),
                                     round_ratios(benchmark, "torch-hand")))
        jax_entry = _impl(benchmark, "jax")
        if benchmark["config"] == "L" and benchmark["cell"] == "lstm":
            share = None if jax_entry is None or not matmul else jax_entry["gflops"] / matmul
            targets.append(_at_least("matmul-L", subject, share))
        if benchmark["config"] == "M":
            targets.append(_at_most("compile-M", subject,
                                    None if jax_entry is None else jax_entry["compile_s"]))
        if benchmark["config"] == "recipe":
            yardstick = next((_impl(other, "jax") for other in results["benchmarks"]
                              if other["config"] == "recipe-k2"
                              and other["cell"] == benchmark["cell"]), None)
            targets.append(_at_most("compile-recipe", subject, None
                                    if jax_entry is None or yardstick is None
                                    else jax_entry["compile_s"] / yardstick["compile_s"]))
    memory = results.get("memory_scaling")
    if memory:
        for framework, ratio in memory["ratio"].items():
            targets.append(_at_most("memory", framework, ratio))
    return targets


# --- markdown ---------------------------------------------------------------------------

def _lstm_kernels(results: dict[str, Any]) -> str:
    kind = results.get("kernels", {}).get("jax_lstm", "pure JAX")
    if kind == "compiled":
        return ("the compiled CPU kernels (`tbptt_jax/csrc/lstm.cc`, built with -march=native; "
                "on a GPU the pure-JAX loops)")
    return "pure JAX (the compiled kernels unavailable or turned off)"


def _fmt(value: float | None) -> str:
    """A figure for a table: three significant digits, thousands separated, tiny ones in
    scientific notation."""
    if value is None:
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 0.01 or value == 0:
        return f"{value:.3g}"
    return f"{value:.2e}"


def _diff(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1e}"


def _verdict(passed: bool | None) -> str:
    return {True: "pass", False: "**FAIL**", None: "n/a"}[passed]


def _peak_mib(entry: dict[str, Any]) -> str:
    memory = entry.get("peak_memory") or {}
    device = memory.get("device_peak_bytes")
    host = memory.get("host_peak_growth_bytes")
    if device is not None:
        return _fmt(device / MIB)
    return _fmt(None if host is None else host / MIB)


def render_markdown(results: dict[str, Any], name: str) -> str:
    """The report of one results dict as markdown."""
    settings, machine = results["settings"], results["machine"]
    versions, threads = results["versions"], results["threads"]
    lines = [
        f"# Benchmark results: {name}",
        "",
        f"Written by `benchmarks/report.py` from `{name}.json` ({results['created']}); "
        f"command `{' '.join(results['command']) or 'run_suite'}`.",
        "",
        f"- machine: {machine['cpu']}, {machine['physical_cores']} physical / "
        f"{machine['logical_cores']} logical cores, {machine['platform']}"
        + (f", GPU {machine['gpu']}" if machine.get("gpu") else ""),
        f"- versions: Python {versions['python']}, JAX {versions['jax']} (jaxlib "
        f"{versions['jaxlib']}), optax {versions['optax']}, torch {versions['torch']}, "
        f"Ignite {versions['pytorch-ignite']}, numpy {versions['numpy']}, tbptt "
        f"{versions['tbptt']}",
        f"- threads: torch {threads['torch_intra_op']} intra-op / {threads['torch_interop']} "
        f"inter-op; JAX (XLA's own pool) {threads['jax_cpu']}"
        + (f"; jax-dp over {machine['jax_cpu_devices']} CPU devices"
           if machine.get("jax_cpu_devices", 1) > 1 and settings["device"] == "cpu" else ""),
        f"- JAX's LSTM loops: {_lstm_kernels(results)}",
        f"- settings: {settings['device']}, {settings['dtype']}, {settings['optimizer']}, "
        f"reduction {settings['reduction']}, tail {settings['tail']}; first call, "
        f"{settings['warmup']} warm-up call(s), then {settings['repeats']} timed calls each, "
        "interleaved; medians",
    ]
    matmul = results.get("matmul")
    if matmul:
        rates = ", ".join(f"{k} {_fmt(v)}" for k, v in matmul["gflops"].items())
        lines.append(f"- float32 matrix product {matmul['size']}^3: {rates} GFLOP/s; best "
                     f"{_fmt(matmul['best_gflops'])}")
    lines += [
        "",
        "A call trains on the whole T-step sequence of B sequences: all its U updates. "
        "steps/s = T*B / time per call; compile = first call - median call; peak memory = "
        "the growth of peak RSS during one call (device memory on CUDA); time/jax > 1 means "
        "JAX is faster; loss diff = largest relative difference of the first call's "
        "per-update losses from JAX's (the same weights and data: the same work).",
        "",
    ]
    for benchmark in results["benchmarks"]:
        spec = benchmark["spec"]
        full = settings.get("full_steps", {}).get(benchmark["config"])
        scaled = "" if full in (None, spec["steps"]) else f" (scaled from T={full})"
        lines += [
            f"## {benchmark['config']} {benchmark['cell']}",
            "",
            f"I={spec['input_size']} H={spec['hidden_size']} O={spec['output_size']} "
            f"layers={spec['num_layers']} B={spec['batch']} T={spec['steps']}{scaled} "
            f"k1={spec['k1']} k2={spec['k2']}, {spec['task']}; U={benchmark['updates']} "
            f"updates, {_fmt(benchmark['flops_per_call'] / 1e9)} GFLOP per call. "
            f"{spec['about']}.",
            "",
            "| implementation | ms/call | ms/update | steps/s | first call s | compile s "
            "| peak MiB | GFLOP/s | time/jax | loss diff |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        notes = []
        for impl, entry in benchmark["implementations"].items():
            if entry["status"] != "ok":
                detail = entry.get("reason") or f"{entry.get('stage')}: {entry.get('error')}"
                notes.append(f"- {impl}: {entry['status']} ({detail.splitlines()[0][:300]})")
                continue
            lines.append(
                f"| {impl} | {_fmt(entry['median_s'] * 1e3)} | {_fmt(entry['update_s'] * 1e3)} "
                f"| {_fmt(entry['steps_per_s'])} | {_fmt(entry['first_call_s'])} "
                f"| {_fmt(entry['compile_s'])} | {_peak_mib(entry)} | {_fmt(entry['gflops'])} "
                f"| {_fmt(time_ratio(benchmark, impl))} | {_diff(entry['loss_max_rel_diff'])} |")
            if "compiled_graphs" in entry:
                unsupported = "; ".join(entry["unsupported"]) or "nothing"
                notes.append(f"- {impl} (allow_rnn={entry['allow_rnn']}): "
                             f"{entry['compiled_graphs']} graph(s) compiled, "
                             f"{entry['graph_breaks']} graph break(s); dynamo refused: "
                             f"{unsupported}")
        lines += ["", *notes, ""] if notes else [""]
    lines += _targets_markdown(results)
    lines += _memory_markdown(results.get("memory_scaling"))
    return "\n".join(lines).rstrip() + "\n"


def _targets_markdown(results: dict[str, Any]) -> list[str]:
    lines = ["## Targets", "",
             "measured: the ratio of the medians; per round: the lowest and highest ratio "
             "within one round of the timed calls, how far this run's figure moves.", "",
             "| target | on | measured | per round | threshold | result |",
             "| --- | --- | ---: | ---: | ---: | --- |"]
    for target in evaluate_targets(results):
        spread = "" if target.spread is None else \
            f"{_fmt(target.spread[0])}-{_fmt(target.spread[1])}"
        lines.append(f"| {TARGETS[target.key][0]} | {target.subject} | {_fmt(target.value)} "
                     f"| {spread} | {_fmt(target.threshold)} | {_verdict(target.passed)} |")
    return lines + [""]


def _memory_markdown(memory: dict[str, Any] | None) -> list[str]:
    if not memory:
        return []
    config = memory["config"]
    lines = ["## Streamed memory", "",
             f"{config['cell']} I={config['input_size']} H={config['hidden_size']} "
             f"B={config['batch']} k1=k2={config['k1']}, fed {config['segment']} steps per "
             "call with the carry handed on; each run in a fresh process, peak RSS "
             "(`VmHWM`).", "",
             "| framework | steps | peak RSS MiB | device peak MiB | seconds | long/short |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for framework, runs in memory["runs"].items():
        for steps, run in runs.items():
            if run["status"] != "ok":
                lines.append(f"| {framework} | {steps} | failed | | | |")
                continue
            device = run.get("device_peak_bytes")
            ratio = memory["ratio"][framework] if int(steps) == max(memory["steps"]) else None
            lines.append(f"| {framework} | {int(steps):,} | {_fmt(run['peak_rss_bytes'] / MIB)} "
                         f"| {_fmt(None if device is None else device / MIB)} "
                         f"| {_fmt(run['seconds'])} | {'' if ratio is None else _fmt(ratio)} |")
    return lines + [""]


# --- plots ------------------------------------------------------------------------------

def render_plots(results: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    """`<name>-throughput.png` (steps/s), `<name>-ratio.png` (time relative to JAX) and,
    with a memory check, `<name>-memory.png` (RSS through the streams)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benchmarks = results["benchmarks"]
    cells = list(dict.fromkeys(b["cell"] for b in benchmarks))
    configs = list(dict.fromkeys(b["config"] for b in benchmarks))
    impls = list(dict.fromkeys(i for b in benchmarks for i in b["implementations"]))
    written = []

    def bars(filename: str, value, ylabel: str, reference_line: float | None) -> None:
        figure, axes = plt.subplots(1, len(cells), figsize=(5 * len(cells), 4.2), squeeze=False)
        width = 0.8 / max(1, len(impls))
        for ax, cell in zip(axes[0], cells, strict=True):
            for k, impl in enumerate(impls):
                xs, ys = [], []
                for c, config in enumerate(configs):
                    for b in benchmarks:
                        if b["config"] == config and b["cell"] == cell:
                            v = value(b, impl)
                            if v is not None:
                                xs.append(c + (k - (len(impls) - 1) / 2) * width)
                                ys.append(v)
                ax.bar(xs, ys, width, label=impl)
            if reference_line is not None:
                ax.axhline(reference_line, color="black", linewidth=0.8)
            ax.set_yscale("log")
            ax.set_xticks(range(len(configs)), configs, rotation=30)
            ax.set_title(cell)
            ax.set_ylabel(ylabel)
        axes[0][-1].legend(fontsize=8)
        figure.suptitle(f"{name}: {results['settings']['device']}, {results['settings']['dtype']}")
        figure.tight_layout()
        path = out_dir / filename
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)

    def steps_per_s(benchmark, impl):
        entry = _impl(benchmark, impl)
        return None if entry is None else entry["steps_per_s"]

    if benchmarks:  # a run of the memory check alone has none
        bars(f"{name}-throughput.png", steps_per_s, "sequence-steps per second (T*B/s)", None)
        bars(f"{name}-ratio.png", time_ratio, "time / jax time", 1.0)

    memory = results.get("memory_scaling")
    if memory:
        figure, ax = plt.subplots(figsize=(6, 4))
        for framework, runs in memory["runs"].items():
            for steps, run in runs.items():
                if run["status"] == "ok":
                    samples = list(zip(*run["rss_samples"], strict=True))
                    ax.plot(samples[0], [v / MIB for v in samples[1]], marker=".",
                            label=f"{framework}, T={int(steps):,}")
        ax.set_xscale("log")
        ax.set_xlabel("steps streamed")
        ax.set_ylabel("RSS (MiB)")
        ax.set_title("streamed TBPTT: memory through the stream")
        ax.legend(fontsize=8)
        figure.tight_layout()
        path = out_dir / f"{name}-memory.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written


def render(results_path: Path) -> list[Path]:
    """Writes `<stem>.md` and the plots beside the results file; returns their paths."""
    results_path = Path(results_path)
    results = json.loads(results_path.read_text())
    name = results_path.stem
    markdown = results_path.with_suffix(".md")
    markdown.write_text(render_markdown(results, name))
    return [markdown, *render_plots(results, results_path.parent, name)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+", help="results JSON file(s)")
    args = parser.parse_args(argv)
    for path in args.results:
        for written in render(path):
            print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What `tbptt train` prints about its runs, and the check that the two frameworks trained the
same model. numpy only: the runs arrive as `tbptt_cli.char_lm.Run`s.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

# How close the two runs' final losses (mean of the last 10 updates) must be; see
# `parity_check`.
FINAL_RTOL = 1e-2


def jax_compiling_calls(overlap: bool) -> int:
    """JAX calls that compile: the first, and with k2 > k1 the second too (the first to
    carry an overlap in)."""
    return 2 if overlap else 1


def loss_table(runs: dict[str, Any], every: int) -> str:
    """Every `every`-th update's losses (and the last), side by side, with bits/char."""
    names = list(runs)
    header = f"{'update':>6}" + "".join(f"{name + ' loss':>13}" for name in names)
    if len(names) == 2:
        header += f"{'abs diff':>11}{'rel diff':>11}"
    lines = [header + f"{'bits/char':>11}"]
    count = len(runs[names[0]])
    for u in sorted({*range(0, count, every), count - 1}):
        losses = [float(runs[name][u]) for name in names]
        line = f"{u + 1:>6}" + "".join(f"{loss:>13.6f}" for loss in losses)
        if len(names) == 2:
            diff = abs(losses[0] - losses[1])
            line += f"{diff:>11.1e}{diff / abs(losses[1]):>11.1e}"
        lines.append(line + f"{losses[0] / math.log(2):>11.3f}")
    return "\n".join(lines)


def first_and_last(name: str, losses: np.ndarray) -> str:
    """The mean loss of the first and of the last 10 updates, in nats and bits/char."""
    first, last = losses[:10].mean(), losses[-10:].mean()
    return (f"{name:<6}mean loss of the first 10 updates {first:.4f} "
            f"({first / math.log(2):.3f} bits/char), of the last 10 {last:.4f} "
            f"({last / math.log(2):.3f} bits/char)")


def timing(name: str, seconds: list[float], compiling_calls: int) -> str:
    """One framework's wall time, the calls that compiled apart from the rest."""
    def calls(first: int, last: int) -> str:
        return f"call {first}" if first == last else f"calls {first}-{last}"

    compiling_calls = min(compiling_calls, len(seconds))
    parts = []
    if compiling_calls:
        compiling = sum(seconds[:compiling_calls])
        parts.append(f"{calls(1, compiling_calls)} (compile + run) {compiling:.2f} s")
    rest = seconds[compiling_calls:]
    if rest:
        parts.append(f"{calls(compiling_calls + 1, len(seconds))} {sum(rest):.2f} s "
                     f"({sum(rest) / len(rest):.3f} s/call)")
    return f"{name:<6}{sum(seconds):7.2f} s   " + "; ".join(parts)


def parity_check(jax_losses: Any, torch_losses: Any, *, checked_updates: int, rtol: float
                 ) -> dict[str, Any]:
    """How far the frameworks' losses are apart, and whether within the tolerances.

    Both frameworks compute the same function, but XLA and ATen round float32 in their own
    order, so the first update's losses already differ by ~1e-7 relative. Training
    amplifies such differences, as it does any perturbation, the more so the larger the
    model and the learning rate: over hundreds of updates they can grow past 1e-3 without
    anything being wrong. So each of the first `checked_updates` updates must agree to
    `rtol` (over the first 50, the configurations we measured stayed within 1.5e-5, while
    restarting each call from a zero carry, the classic streaming mistake, differs by ~2e-2
    at the first update of the second call); they span several calls, so the carry handed
    from call to call is checked too. Afterwards the two runs must still reach the same
    loss: the means of their last 10 updates within FINAL_RTOL.
    """
    jax_losses, torch_losses = np.asarray(jax_losses), np.asarray(torch_losses)
    diff = np.abs(jax_losses - torch_losses)
    rel = diff / np.abs(torch_losses)
    checked = rel[:checked_updates]
    jax_final, torch_final = float(jax_losses[-10:].mean()), float(torch_losses[-10:].mean())
    final_rel = abs(jax_final - torch_final) / torch_final
    return {"updates": len(rel), "largest_abs_diff": float(diff.max()),
            "largest_rel_diff": float(rel.max()), "at_update": int(np.argmax(rel)) + 1,
            "checked_updates": len(checked), "checked_rel_diff": float(checked.max()),
            "checked_at_update": int(np.argmax(checked)) + 1, "rtol": rtol,
            "final_jax": jax_final, "final_torch": torch_final, "final_rel_diff": final_rel,
            "final_rtol": FINAL_RTOL,
            "ok": bool(checked.max() <= rtol and final_rel <= FINAL_RTOL)}


def print_parity(parity: dict[str, Any]) -> None:
    """The parity check's numbers on stdout, and its verdict: OK on stdout, FAIL on stderr."""
    print(f"\nJAX vs torch over all {parity['updates']} updates: largest abs diff "
          f"{parity['largest_abs_diff']:.2e}, largest rel diff "
          f"{parity['largest_rel_diff']:.2e} (update {parity['at_update']})")
    print(f"  updates 1-{parity['checked_updates']}: largest rel diff "
          f"{parity['checked_rel_diff']:.2e} (update {parity['checked_at_update']}), "
          f"tolerance {parity['rtol']:.0e}")
    print(f"  mean loss of the last 10 updates: {parity['final_jax']:.4f} vs "
          f"{parity['final_torch']:.4f}, rel diff {parity['final_rel_diff']:.2e}, "
          f"tolerance {parity['final_rtol']:.0e}")
    if parity["ok"]:
        print("OK: the two frameworks trained the same model")
    else:
        print("FAIL: the frameworks' losses differ by more than the tolerance",
              file=sys.stderr)

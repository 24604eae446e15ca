"""The JSON log of a `tbptt train` run: everything needed to redraw its picture or compare it
with another run, in one file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tbptt_cli.char_lm import Run

LOG_NAME = "train_log.json"


def write_log(path: Path, *, config: dict[str, Any], versions: dict[str, Any],
              data: dict[str, Any], model: dict[str, Any], runs: dict[str, Run],
              compiling_calls: dict[str, int], parity: dict[str, Any] | None,
              sample: str | None) -> None:
    """Writes the log to `path`: the command line, `config` (every option), the `versions`
    of the software and machine, the `data` and `model`, per framework every update's loss
    and every call's wall time (`compiling_calls` of them compiled), the `parity` check
    (None with one framework) and the `sample`."""
    log = {
        "argv": sys.argv,
        "config": config,
        "versions": versions,
        "data": data,
        "model": model,
        "runs": {name: {"losses": [float(loss) for loss in run.losses],
                        "call_seconds": run.seconds,
                        "compiling_calls": compiling_calls[name],
                        "seconds": sum(run.seconds)}
                 for name, run in runs.items()},
        "parity": parity,
        "sample": sample,
    }
    path.write_text(json.dumps(log, indent=2) + "\n")

"""The main job: a character-level LSTM trained with TBPTT on the Python standard library's
source, in JAX and PyTorch side by side from the same initial weights.

This is `tbptt train` (tbptt_cli/commands/train.py, which says what it does) as a script: the
same options and output, except that it writes its JSON log and loss-curve PNG only when
given `--out DIR`. It exits with status 1 if the frameworks' losses differ by more than
float32 rounding explains.

Run (the defaults take well under a minute on a 2-core CPU):

    .venv/bin/python examples/char_lm.py
    .venv/bin/python examples/char_lm.py --help
"""

from __future__ import annotations

import sys

from tbptt_cli.commands.train import main

if __name__ == "__main__":
    sys.exit(main(prog="char_lm.py"))

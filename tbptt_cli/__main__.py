"""`python -m tbptt_cli`: the `tbptt` command."""

import sys

from tbptt_cli.cli import main

sys.exit(main())

"""The subcommands of the `tbptt` command, one module each (see `tbptt_cli.cli`)."""

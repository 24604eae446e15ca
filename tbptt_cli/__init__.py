"""The applications on top of the library: the `tbptt` command and what it runs.

The top floor: the command line (`cli`, one module of `commands` per subcommand), the
character-level language model that `tbptt train` trains in both frameworks (`char_lm`,
on the text of `text`), and its progress display. It builds on every package below it
(`tbptt`, `tbptt_jax`, `tbptt_torch`, `tbptt_parity`), and none of them imports it.
"""

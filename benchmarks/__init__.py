"""Benchmarks of the JAX and PyTorch TBPTT trainers: the suite (`suite`), its report
(`report`) and the streamed-memory check (`memory`). Run them with `tbptt bench`."""

"""The parity layer, where JAX and PyTorch meet: train a torch module and its JAX port from
the same weights on the same data and report where their training parts.

`tbptt_parity._harness` holds the machinery the parity tests use (`parity_tests.harness`
re-exports it).
"""

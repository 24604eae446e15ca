"""Test-wide JAX settings: float64 available for the exact parity tests, and implicit rank
promotion an error, so a silent broadcasting bug fails loudly (as equinox's tests do).

Strict dtype promotion stays off: optax itself mixes Python floats with int32 step counts.
"""

import importlib.util

if importlib.util.find_spec("jax") is not None:
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_numpy_rank_promotion", "raise")

if importlib.util.find_spec("torch") is not None:
    import torch

    # pytest -n 2 runs two workers on two cores: a second torch thread per worker only
    # oversubscribes the cores (measured: a 3 s job took 246 s on a busy 2-core machine).
    torch.set_num_threads(1)

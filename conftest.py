"""Test-wide JAX settings: float64 available for the exact parity tests, and implicit rank
promotion an error, so a silent broadcasting bug fails loudly (as equinox's tests do).

Strict dtype promotion stays off: optax itself mixes Python floats with int32 step counts.
"""

import importlib.util

if importlib.util.find_spec("jax") is not None:
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_numpy_rank_promotion", "raise")

"""Test-wide JAX settings: float64 available for the exact parity tests, and implicit rank
promotion an error, so a silent broadcasting bug fails loudly (as equinox's tests do).

Strict dtype promotion stays off: optax itself mixes Python floats with int32 step counts.

JAX's compiled programs are dropped after each test module. Every program XLA keeps holds
about 140 memory mappings, a worker of the full suite compiles hundreds of configurations,
and Linux allows a process 65,530 mappings (vm.max_map_count): past that, XLA's next compile
cannot map memory and the worker dies with a segmentation fault.
"""

import gc
import importlib.util

import pytest

if importlib.util.find_spec("jax") is not None:
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_numpy_rank_promotion", "raise")

    @pytest.fixture(autouse=True, scope="module")
    def _release_compiled_programs():
        yield
        jax.clear_caches()
        gc.collect()

if importlib.util.find_spec("torch") is not None:
    import torch

    # pytest -n 2 runs two workers on two cores: a second torch thread per worker only
    # oversubscribes the cores (measured: a 3 s job took 246 s on a busy 2-core machine).
    torch.set_num_threads(1)

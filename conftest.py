"""Test-wide JAX settings: float64 available for the exact parity tests, and implicit rank
promotion an error, so a silent broadcasting bug fails loudly (as equinox's tests do).

Strict dtype promotion stays off: optax itself mixes Python floats with int32 step counts.

JAX's compiled programs are dropped after any test that leaves the process holding more
than half the memory mappings Linux allows it (vm.max_map_count, 65,530 by default): each
program XLA keeps holds about 140, a worker of the full suite (or one module of the slow
parity matrix) compiles hundreds, and past the limit XLA's next compile cannot map memory
and the worker dies with a segmentation fault. Counting the mappings costs 1-25 ms a test.
"""

import gc
import importlib.util

import pytest

if importlib.util.find_spec("jax") is not None:
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_numpy_rank_promotion", "raise")

    def _mappings() -> int:
        with open("/proc/self/maps", "rb") as maps:
            return maps.read().count(b"\n")

    try:
        with open("/proc/sys/vm/max_map_count") as limit:
            MAPPINGS_KEPT = int(limit.read()) // 2
    except OSError:  # not Linux: no such limit to keep under
        MAPPINGS_KEPT = None

    @pytest.fixture(autouse=True)
    def _release_compiled_programs():
        yield
        if MAPPINGS_KEPT is not None and _mappings() > MAPPINGS_KEPT:
            jax.clear_caches()
            gc.collect()

if importlib.util.find_spec("torch") is not None:
    import torch

    # pytest -n 2 runs two workers on two cores: a second torch thread per worker only
    # oversubscribes the cores (measured: a 3 s job took 246 s on a busy 2-core machine).
    torch.set_num_threads(1)

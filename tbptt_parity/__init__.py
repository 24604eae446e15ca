"""The parity layer, where JAX and PyTorch meet: check that a JAX port of a torch model trains
as the torch model does.

`compare(torch_model, apply_fn, xs=..., ys=..., k1=...)` copies the module's weights into
JAX params under its `state_dict()` names, trains both with TBPTT(k1, k2) from them, and
returns a `Report`: per update, the loss and every parameter's gradient gap, stopping at the
first update beyond the tolerance and naming the parameter. `load_port` and `random_data`
are what the `tbptt parity` command builds on. `tbptt_parity._harness` holds the machinery
the parity tests use (re-exported by `parity_tests.harness`).
"""

from tbptt_parity._compare import (
    DEFAULT_RTOL,
    LOSSES,
    Report,
    UpdateGaps,
    compare,
    load_object,
    load_port,
    random_data,
)
from tbptt_parity._harness import OPTIMIZERS, OptimizerPair, optimizer_pair

__all__ = ["DEFAULT_RTOL", "LOSSES", "OPTIMIZERS", "OptimizerPair", "Report", "UpdateGaps",
           "compare", "load_object", "load_port", "optimizer_pair", "random_data"]

"""TBPTT(k1, k2) in JAX: a jitted, functional trainer, torch-compatible models and losses.

No torch import anywhere in this package; `tbptt_torch` is its twin.
"""

from tbptt_jax import adapters, checkpoint, losses, models, optim, sharding
from tbptt_jax._trainer import (
    NonFiniteLossError,
    OverlapCarry,
    TBPTTState,
    Trainer,
    tbptt_train_step,
    trainer,
)

__all__ = [
    "NonFiniteLossError", "OverlapCarry", "TBPTTState", "Trainer", "adapters", "checkpoint",
    "losses", "models", "optim", "sharding", "tbptt_train_step", "trainer",
]

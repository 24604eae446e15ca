"""TBPTT(k1, k2) in PyTorch: the trainer, models and losses that match `tbptt_jax` exactly.

No jax import anywhere in this package; weights cross to JAX as numpy arrays.
"""

from tbptt_torch import checkpoint, distributed, losses, models
from tbptt_torch._trainer import NonFiniteLossError, OverlapCarry, tbptt_train_step
from tbptt_torch.audit import AuditVerdict, audit  # the function shadows its module's name
from tbptt_torch.convert import load_jax, to_jax

__all__ = ["AuditVerdict", "NonFiniteLossError", "OverlapCarry", "audit", "checkpoint",
           "distributed", "load_jax", "losses", "models", "tbptt_train_step", "to_jax"]

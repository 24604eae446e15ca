"""A recurrent agent trained with TBPTT inside one jitted JAX loop: the actor-critic and its
per-step PPO loss (`agent.py`), their PyTorch twins (`torch_agent.py`), and the training run
on gymnax's MemoryChain, a task that needs memory (`memory_chain.py`); docs/rl.md."""

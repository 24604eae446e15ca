"""Cross-framework parity tests: tbptt_jax and tbptt_torch train identically (SPEC §3)."""

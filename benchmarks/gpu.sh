#!/usr/bin/env bash
# The reduced benchmark matrix on a CUDA machine, in under 5 minutes including compiles.
#
# Both frameworks run on the GPU in true float32 first (TF32 off in torch's matmuls and in
# cuDNN, jax_default_matmul_precision="highest"; the suite pins these itself and records
# them), then in bfloat16. Beside the CPU implementations it runs `torch-cudnn`, the bare
# nn.RNN/GRU/LSTM loop over the windows: the cuDNN baseline. Writes
# benchmarks/results/cuda-float32.{json,md,png} and cuda-bfloat16.* (or under $1).
#
# Needs a Python with CUDA builds of jax and torch, and this project importable:
#   PYTHON=/path/to/python bash benchmarks/gpu.sh [OUT_DIR]
# MEMORY=1 also streams the M LSTM over 10^4 and 10^6 steps per framework (a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
out=${1:-benchmarks/results}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

"$python" - <<'PY'
import jax, torch
assert torch.cuda.is_available(), "torch sees no CUDA device"
assert jax.devices()[0].platform == "gpu", f"JAX runs on {jax.devices()[0].platform}, not a GPU"
print("torch", torch.__version__, torch.cuda.get_device_name(), "| jax", jax.__version__, jax.devices())
PY

memory=(--no-memory)
if [[ "${MEMORY:-0}" == 1 ]]; then memory=(--memory-steps 10000 1000000); fi
matrix=(--device cuda --configs S M M-k2 L char-rnn --cells gru lstm --repeats 5 --out "$out")
"$python" -m benchmarks.suite "${matrix[@]}" --dtype float32 --name cuda-float32 "${memory[@]}"
"$python" -m benchmarks.suite "${matrix[@]}" --dtype bfloat16 --name cuda-bfloat16 --no-memory

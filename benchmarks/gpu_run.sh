#!/usr/bin/env bash
# Issue 7's GPU measurement as one prepared run (for the `device` tool, whose calls are short):
# bfloat16 model FLOPs utilisation of the train step on the 3-D presets and the PyTorch ratio on
# the same GPU, then the float32 3-D step for comparison. Results go to $OUT (the device tool's
# output folder) or /tmp.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_run.sh            # PRESETS=3d64,btcv_3d,demo by default
#
# Needs jax with CUDA and this repo's requirements.txt; PyTorch (CUDA build) is optional: without
# it the PyTorch columns are skipped. Each benchmark has its own time limit, so one slow preset
# cannot eat the whole device budget.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
presets="${PRESETS:-3d64,btcv_3d,demo}"
mkdir -p "$out"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1
  python -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1
} | tee "$out/device.txt"
torch_flag=""
if ! python -c "import torch, jax; assert torch.cuda.is_available() or jax.default_backend() == 'cpu'" \
    >/dev/null 2>&1; then
  torch_flag="--no-torch"
  echo "no CUDA PyTorch here: JAX only" | tee -a "$out/device.txt"
fi
PYTHONPATH=. timeout "${LIMIT_BF16:-300}" python benchmarks/train_step.py --presets "$presets" \
    --steps 10 --dtype bfloat16 $torch_flag 2>&1 | tee "$out/train_step_bfloat16.txt"
PYTHONPATH=. timeout "${LIMIT_F32:-150}" python benchmarks/train_step.py --presets "${presets%%,*}" \
    --steps 5 $torch_flag 2>&1 | tee "$out/train_step_float32.txt"

#!/usr/bin/env bash
# The GPU measurement as one prepared run, for a machine held only for a few minutes:
# bfloat16 model FLOPs utilisation of the train step on the 3-D presets and the PyTorch ratio on
# the same GPU, then the float32 3-D step for comparison. Results go to $OUT (the caller's
# output folder) or /tmp.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_run.sh            # PRESETS=3d64,btcv_3d,demo by default
#
# Needs jax with CUDA and this repo's requirements.txt; PyTorch (CUDA build) is optional: without
# it the PyTorch columns are skipped. Each benchmark has its own time limit, so one slow preset
# cannot eat the whole device budget; if the bfloat16 run fails (rather than timing out), the
# float32 run is skipped, as it would fail the same way.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
presets="${PRESETS:-3d64,btcv_3d,demo}"
python="${PYTHON:-python3}"
# JAX and PyTorch share the GPU in one process: JAX takes this share up front, PyTorch the rest.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}"
mkdir -p "$out"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>&1
  "$python" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__,
'optax', optax.__version__, jax.devices())" 2>&1
  "$python" -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())" 2>&1
} | tee "$out/device.txt"
torch_flag=""
cuda_or_cpu="import torch, jax; assert torch.cuda.is_available() or jax.default_backend() == 'cpu'"
if ! "$python" -c "$cuda_or_cpu" >/dev/null 2>&1; then
  torch_flag="--no-torch"
  echo "no CUDA PyTorch here: JAX only" | tee -a "$out/device.txt"
fi
# A GPU's 4096^2 matmul lasts well under a millisecond, too short for a peak; 8192^2 on a GPU.
peak_size=$("$python" -c "import jax; print(4096 if jax.default_backend() == 'cpu' else 8192)")
PYTHONPATH=.:${PYTHONPATH:-} timeout "${LIMIT_BF16:-300}" "$python" benchmarks/train_step.py \
    --presets "$presets" --steps 20 --dtype bfloat16 --peak-size "$peak_size" $torch_flag 2>&1 \
    | tee "$out/train_step_bfloat16.txt"
status=$?
if [[ $status -ne 0 && $status -ne 124 ]]; then
  echo "bfloat16 run failed (exit $status): float32 run skipped"
  exit "$status"
fi
PYTHONPATH=.:${PYTHONPATH:-} timeout "${LIMIT_F32:-150}" "$python" benchmarks/train_step.py \
    --presets "${presets%%,*}" --steps 5 --peak-size "$peak_size" $torch_flag 2>&1 \
    | tee "$out/train_step_float32.txt"

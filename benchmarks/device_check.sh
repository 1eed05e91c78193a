#!/usr/bin/env bash
# Everything one GPU visit should bring back, as one prepared run of at most 8 minutes, on a host
# without network access. Results go into one folder, one file per section:
#
#   OUT=/tmp/device bash benchmarks/device_check.sh            # on the GPU host
#   OUT=/tmp/dry bash benchmarks/device_check.sh --dry-run     # tiny shapes, anywhere (CPU)
#
#   device.txt         date, GPU (nvidia-smi), lscpu model, Python, jax/flax/optax/orbax/torch
#   install.txt        what was installed from $WHEELS
#   plan.txt, .json    memory plan of the bfloat16 step, btcv_3d and tpu_pod; the per-device
#                      batch every later section uses (the largest the plan allows)
#   train_step.txt     JAX step time, model FLOPs utilisation (% of the measured bfloat16
#                      matmul peak), samples/s, compile time (benchmarks/train_step.py)
#   torch.txt          PyTorch eager and torch.compile on the same step (skipped without torch)
#   trace.txt, trace/  jax.profiler trace of 3 steps per preset and the top ops by time
#   sliding.txt        sliding-window inference throughput (windows/s, Mvoxel/s)
#   low_label/         a shortened 3-D low-label run, full against scratch
#                      (benchmarks/gpu_low_label.sh: low_label.txt, results.md, results.json)
#   timings.txt        seconds and exit status of every section
#
# The GPU hosts have Python 3.12 with jax (CUDA), flax, optax, orbax and torch, but not grain,
# nibabel, ml_collections, tensorflow-datasets or array-record. Prepare their wheels here, once,
# into the git-ignored folder wheels/ (it travels with the working tree):
#
#   pip download --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 \
#       --platform manylinux_2_28_x86_64 -d wheels/ grain nibabel ml_collections \
#       tensorflow-datasets array-record tensorboardX
#
# The script installs from there (`pip install --no-index --find-links wheels/`) whatever does
# not import; it never reaches the network. Every section has its own time limit, so one slow
# part cannot eat the device time of the others; a section that fails is recorded and the
# next one runs. Environment: OUT (default /tmp/device_check), WHEELS (default wheels/),
# PYTHON, SECTIONS (default plan,train_step,torch,trace,sliding,low_label), LIMIT_SCALE (factor
# on every section's limit; 1, or 10 in a dry run).
set -uo pipefail
cd "$(dirname "$0")/.."
dry=""
if [[ "${1:-}" == "--dry-run" ]]; then
  dry="--dry-run"
fi
out="$(mkdir -p "${OUT:-/tmp/device_check}" && cd "${OUT:-/tmp/device_check}" && pwd)"
wheels="${WHEELS:-wheels}"
python="${PYTHON:-python3}"
sections="${SECTIONS:-plan,train_step,torch,trace,sliding,low_label}"
export PYTHONPATH=".:${PYTHONPATH:-}"
# JAX and PyTorch share the GPU in the torch section's process: JAX takes this share up front.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}"

# Modules the package needs that the GPU image lacks, as `module:wheel name`.
needed="grain:grain nibabel:nibabel ml_collections:ml_collections"
needed+=" tensorflow_datasets:tensorflow-datasets array_record:array-record tensorboardX:tensorboardX"
missing=()
for pair in $needed; do
  "$python" -c "import ${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
if (( ${#missing[@]} )); then
  echo "installing from $wheels: ${missing[*]}" | tee "$out/install.txt"
  "$python" -m pip install --quiet --no-index --find-links "$wheels" "${missing[@]}" 2>&1 \
      | tee -a "$out/install.txt"
else
  echo "nothing to install" > "$out/install.txt"
fi

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>&1 \
      || echo "no nvidia-smi"
  lscpu | grep -E '^(Model name|CPU\(s\))' || true
  "$python" - <<'EOF'
import importlib, sys
print('python', sys.version.split()[0])
for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax.checkpoint', 'grain', 'torch', 'numpy'):
  try:
    print(name, importlib.import_module(name).__version__)
  except Exception as e:  # pylint: disable=broad-except
    print(name, 'unavailable:', type(e).__name__)
import jax
print('backend', jax.default_backend(), jax.devices())
EOF
} > "$out/device.txt" 2>&1
cat "$out/device.txt"

# section NAME LIMIT_S COMMAND...: runs it under a time limit into NAME.txt and records its time.
section() {
  local name="$1" limit="$2"
  shift 2
  [[ ",$sections," == *",$name,"* ]] || return 0
  local start=$SECONDS
  timeout -s KILL "$((limit * limit_scale))" "$@" > "$out/$name.txt" 2>&1
  local status=$?
  echo "$name: $((SECONDS - start)) s, exit $status" | tee -a "$out/timings.txt"
  tail -n 25 "$out/$name.txt"
}

has_torch=0
"$python" -c "import torch" >/dev/null 2>&1 && has_torch=1
# The limits fit the GPU run; a dry run on a busy CPU compiles slower than a GPU host runs.
limit_scale="${LIMIT_SCALE:-1}"
if [[ -n "$dry" ]]; then
  presets=tiny3d; peak=512; steps=2; limit_scale="${LIMIT_SCALE:-10}"
else
  presets=btcv_3d,tpu_pod; peak=8192; steps=10
fi

section plan 60 "$python" benchmarks/device_check.py plan --out "$out" $dry
if [[ ! -f "$out/plan.json" ]]; then
  echo '{"btcv_3d": 2, "tpu_pod": 2}' > "$out/plan.json"  # The plan failed: a batch that fits.
  [[ -n "$dry" ]] && echo '{"tiny3d": 2}' > "$out/plan.json"
fi
batches=$("$python" -c "import json, sys; print(' '.join(f'--batch {k}={v}' for k, v in
json.load(open(sys.argv[1])).items()))" "$out/plan.json")
# shellcheck disable=SC2086  # $batches is a list of flags.
section train_step 100 "$python" benchmarks/train_step.py --presets "$presets" $batches \
    --steps "$steps" --dtype bfloat16 --peak-size "$peak" --no-torch
if (( has_torch )); then
  section torch 90 "$python" benchmarks/device_check.py torch --out "$out" --steps "$steps" $dry
else
  echo "torch: not installed, skipped" | tee -a "$out/timings.txt"
fi
section trace 45 "$python" benchmarks/device_check.py trace --out "$out" $dry
section sliding 35 "$python" benchmarks/device_check.py sliding --out "$out" $dry
# Full against scratch at one labelled volume, shortened to fit: 100 pre-training and 150
# fine-tuning steps on 16 phantoms (a dry run: low_label.py --quick on 6 tiny ones). What
# finishes within the limit is kept; the same command with a longer LIMIT resumes it.
if [[ -n "$dry" ]]; then
  ll_env=(QUICK=1 NUM_CASES=6 SHAPE_SCALE=0.3 SPACING=6,6,8 EXTRA="--probe_arms=")
else
  ll_env=(NUM_CASES=16 SPACING=3,3,4 EXTRA="--arms scratch,full --budgets 1 --pretrain_seeds 0
--finetune_seeds 0 --probe_arms= --pretrain_steps 100 --finetune_steps 150")
fi
section low_label 130 env "${ll_env[@]}" OUT="$out/low_label" ALLOW_CPU=1 PYTHON="$python" \
    bash benchmarks/gpu_low_label.sh
echo "results in $out"

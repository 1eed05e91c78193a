#!/usr/bin/env bash
# The 3-D low-label benchmark (benchmarks/low_label.py --ndim 3) on one GPU, as one prepared run:
# prints the device, generates phantom CT cases and prepares them into a store, runs the
# benchmark (96^3 patches, btcv_3d widths) and copies its results to $OUT.
#
#   OUT=/tmp/ll3d bash benchmarks/gpu_low_label.sh           # the full 3-D benchmark
#   QUICK=1 OUT=/tmp/ll3d bash benchmarks/gpu_low_label.sh   # a smoke run of a few minutes
#
# Environment (all optional):
#   OUT        results: device.txt, low_label.txt, results.json, results.md, dice_vs_budget.png
#              (default /tmp/low_label_3d)
#   WORK       phantoms, store and runs (default $OUT/work); re-running with the same WORK
#              resumes: the store is reused and finished runs are skipped
#   NUM_CASES  phantom cases (default 40: 24 train_100, 8 val, 8 test)
#   SPACING    store grid in mm (default 2,2,2.5: about 190 x 190 x 100 voxels per case)
#   SHAPE_SCALE  phantom size factor (default 1.0)
#   FAMILY     phantom family where the generator has one (default clinical)
#   QUICK      non-empty: --quick (tiny widths, a few steps)
#   EXTRA      more flags for low_label.py, e.g. "--arms scratch,full --finetune_seeds 0,1"
#   LIMIT      seconds after which the benchmark is stopped (default: none); what finished is
#              kept and a later run resumes it
#   ALLOW_CPU  non-empty: run even where JAX sees no GPU
#
# The default selection (low_label.py SIZES['gpu_3d']): arms scratch, scratch_long, init_only,
# full; budgets 1, 2, 4, all; fine-tuning seeds 0, 1, 2; 2000 pre-training and 2000 fine-tuning
# steps; probes of full at 25, 50 and 100% of the pre-training. That is 2 pre-trainings, 48
# fine-tunings (12 of them twice as long) and 4 probes; low_label.py prints an ETA after every
# run. Trim with EXTRA where the GPU is lent for less.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/low_label_3d}"
work="${WORK:-$out/work}"
python="${PYTHON:-python3}"
mkdir -p "$out" "$work"
export PYTHONPATH=".:${PYTHONPATH:-}"

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
  "$python" -c "import jax; print('jax', jax.__version__, jax.default_backend(), jax.devices())"
} 2>&1 | tee "$out/device.txt"
if ! "$python" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')"; then
  if [[ -z "${ALLOW_CPU:-}" ]]; then
    echo "JAX sees no GPU: stopping (ALLOW_CPU=1 runs anyway)" | tee -a "$out/device.txt"
    exit 1
  fi
fi

raw="$work/raw"
store="$work/store"
if [[ ! -f "$store/store.json" ]]; then
  family=()
  if "$python" -m pixssl_jax.data.phantoms --help 2>/dev/null | grep -q -- '--family'; then
    family=(--family "${FAMILY:-clinical}")
  fi
  rm -rf "$raw" "$store"
  "$python" -m pixssl_jax.data.phantoms --out "$raw" --num_cases "${NUM_CASES:-40}" \
      --shape_scale "${SHAPE_SCALE:-1.0}" "${family[@]}"
  "$python" -m pixssl_jax.data.prepare --raw_dir "$raw" --data_dir "$store" \
      --spacing "${SPACING:-2,2,2.5}" --quiet
fi

quick=()
if [[ -n "${QUICK:-}" ]]; then
  quick=(--quick)
fi
runs="$work/runs${QUICK:+_quick}"
limit=()
if [[ -n "${LIMIT:-}" ]]; then
  limit=(timeout "$LIMIT")
fi
# shellcheck disable=SC2086  # EXTRA is a list of flags.
"${limit[@]}" "$python" benchmarks/low_label.py --data_dir "$store" --ndim 3 --out "$runs" \
    "${quick[@]}" ${EXTRA:-} 2>&1 | tee "$out/low_label.txt"
cp "$runs/results.json" "$runs/results.md" "$runs/dice_vs_budget.png" "$out/"
echo "results in $out"

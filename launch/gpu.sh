#!/usr/bin/env bash
# Runs pixssl_jax on GPU hosts: one process per host, driving all of its GPUs
# (how jax works: the process sees every local GPU as a device).
#
#   one host:     launch/gpu.sh --config CFG --workdir DIR
#   N hosts:      on host i:  launch/gpu.sh --num-hosts N --host-index i \
#                                 --coordinator HOST0:PORT --config CFG --workdir DIR
#   SLURM:        srun --nodes=N --ntasks-per-node=1 launch/gpu.sh --config ... --workdir ...
#                 (host count, index and coordinator come from the SLURM variables)
#
# The script replaces itself with python (exec), so SIGTERM from a scheduler
# reaches the trainer directly: it saves a checkpoint and exits 0.
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

readonly PROG="launch/gpu.sh"

usage() {
  cat <<EOF
Usage: ${PROG} --config CFG --workdir DIR
           [--num-hosts N --host-index I --coordinator HOST:PORT]
           [--port PORT] [--gpus LIST] [--python PY | --venv DIR]
           [--dry-run] [-- MAIN_ARGS...]

Options:
  --config CFG           Config file with optional preset, e.g.
                         configs/pretrain.py:btcv_3d (required).
  --workdir DIR          Run directory: local, shared filesystem or gs:// (required).
                         With several hosts it must be shared by all of them.
  --num-hosts N          Number of hosts (one process each). Default: SLURM_NTASKS
                         under SLURM, else 1.
  --host-index I         This host's index, 0..N-1. Default: SLURM_PROCID.
  --coordinator HOST:PORT
                         Address of host 0's coordinator. Default under SLURM:
                         the first node of SLURM_JOB_NODELIST and --port.
  --port PORT            Coordinator port under SLURM (default 20000 + SLURM_JOB_ID
                         mod 10000, so jobs sharing a node do not collide).
  --gpus LIST            Restrict to these GPUs (sets CUDA_VISIBLE_DEVICES), e.g. 0,1.
  --python PY            Interpreter (default python3).
  --venv DIR             Use DIR/bin/python (e.g. a venv made by
                         launch/bootstrap_worker.sh --gpu --venv DIR).
  --dry-run              Print the command instead of running it.
  -h, --help             Show this help.
  -- MAIN_ARGS...        Passed on to pixssl_jax.main, e.g. --config.num_steps=1000.
EOF
}

CONFIG="" WORKDIR="" NUM_HOSTS="" HOST_INDEX="" COORDINATOR="" PORT="" GPUS=""
PYTHON="python3" VENV="" DRY_RUN=0
MAIN_ARGS=()

while (( $# > 0 )); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --) shift; MAIN_ARGS=("$@"); break ;;
    --dry-run) DRY_RUN=1; shift; continue ;;
    --config|--workdir|--num-hosts|--host-index|--coordinator|--port|--gpus|--python|--venv)
      (( $# >= 2 )) || die "option $1 needs a value"
      [[ -n "$2" && "$2" != --* ]] || die "option $1 needs a value"
      opt="$1" value="$2"
      shift 2
      ;;
    --*=*)
      opt="${1%%=*}" value="${1#*=}"
      shift
      ;;
    *) die "unknown argument '$1' (arguments for pixssl_jax.main go after '--')" ;;
  esac
  case "${opt}" in
    --config) CONFIG="${value}" ;;
    --workdir) WORKDIR="${value}" ;;
    --num-hosts) NUM_HOSTS="${value}" ;;
    --host-index) HOST_INDEX="${value}" ;;
    --coordinator) COORDINATOR="${value}" ;;
    --port) PORT="${value}" ;;
    --gpus) GPUS="${value}" ;;
    --python) PYTHON="${value}" ;;
    --venv) VENV="${value}" ;;
    *) die "unknown option '${opt}' (arguments for pixssl_jax.main go after '--')" ;;
  esac
  [[ -n "${value}" ]] || die "option ${opt} needs a non-empty value"
  opt="" value=""
done

[[ -n "${CONFIG}" ]] || die "--config is required (e.g. configs/pretrain.py:btcv_3d)"
[[ -n "${WORKDIR}" ]] || die "--workdir is required"
[[ -f "${CONFIG%%:*}" ]] || die "--config: file '${CONFIG%%:*}' not found (relative paths are taken from $(pwd))"
# A relative --workdir is taken from the directory the launcher was started in (URLs as given).
[[ "${WORKDIR}" == /* || "${WORKDIR}" == *://* ]] || WORKDIR="$(pwd)/${WORKDIR}"
is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

# ---- Host count, index and coordinator: flags first, then SLURM, else one host. ----
source_of_topology="flags"
if [[ -z "${NUM_HOSTS}" && -n "${SLURM_NTASKS:-}" ]]; then
  source_of_topology="SLURM"
  NUM_HOSTS="${SLURM_NTASKS}"
  is_uint "${NUM_HOSTS}" || die "SLURM_NTASKS='${SLURM_NTASKS}' is not a number"
  if [[ -n "${SLURM_NNODES:-}" && "${SLURM_NNODES}" != "${NUM_HOSTS}" ]]; then
    die "SLURM runs ${NUM_HOSTS} tasks on ${SLURM_NNODES} nodes; use one task per node" \
      "(srun --ntasks-per-node=1): each jax process drives all GPUs of its host"
  fi
  if [[ -z "${HOST_INDEX}" ]]; then
    [[ -n "${SLURM_PROCID:-}" ]] \
      || die "SLURM_NTASKS is set but SLURM_PROCID is not: start this script with srun"
    HOST_INDEX="${SLURM_PROCID}"
  fi
  if [[ -z "${COORDINATOR}" && "${NUM_HOSTS}" != 1 ]]; then
    [[ -n "${SLURM_JOB_NODELIST:-}" ]] || die "SLURM_JOB_NODELIST is not set; pass --coordinator HOST:PORT"
    command -v scontrol >/dev/null 2>&1 || die "scontrol not found; pass --coordinator HOST:PORT"
    first_host="$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)"
    [[ -n "${first_host}" ]] || die "scontrol found no hosts in SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST}'"
    if [[ -z "${PORT}" ]]; then
      is_uint "${SLURM_JOB_ID:-}" || die "SLURM_JOB_ID is not set; pass --port or --coordinator"
      PORT="$(( 20000 + SLURM_JOB_ID % 10000 ))"
    fi
    COORDINATOR="${first_host}:${PORT}"
  fi
fi
NUM_HOSTS="${NUM_HOSTS:-1}"

if ! is_uint "${NUM_HOSTS}" || (( NUM_HOSTS < 1 )); then
  die "--num-hosts must be a positive integer, got '${NUM_HOSTS}'"
fi
if [[ -n "${PORT}" ]] && { ! is_uint "${PORT}" || (( PORT < 1 || PORT > 65535 )); }; then
  die "--port must be 1-65535, got '${PORT}'"
fi
distributed_flags=()
if (( NUM_HOSTS > 1 )); then
  [[ -n "${HOST_INDEX}" ]] || die "--host-index is required with --num-hosts ${NUM_HOSTS}"
  if ! is_uint "${HOST_INDEX}" || (( HOST_INDEX >= NUM_HOSTS )); then
    die "--host-index must be in 0..$(( NUM_HOSTS - 1 )), got '${HOST_INDEX}'"
  fi
  [[ -n "${COORDINATOR}" ]] \
    || die "--coordinator HOST:PORT is required with --num-hosts ${NUM_HOSTS} (host 0's address)"
  [[ "${COORDINATOR}" =~ ^[^:[:space:]]+:[0-9]+$ ]] \
    || die "--coordinator must be HOST:PORT, got '${COORDINATOR}'"
  distributed_flags=(--coordinator_address "${COORDINATOR}"
    --num_processes "${NUM_HOSTS}" --process_id "${HOST_INDEX}")
  echo "${PROG}: host ${HOST_INDEX} of ${NUM_HOSTS} (from ${source_of_topology})," \
    "coordinator ${COORDINATOR}" >&2
elif [[ -n "${HOST_INDEX}" && "${HOST_INDEX}" != 0 ]]; then
  die "--host-index ${HOST_INDEX} given for a single host; pass --num-hosts too"
fi

if [[ -n "${VENV}" ]]; then
  PYTHON="${VENV}/bin/python"
  [[ -x "${PYTHON}" ]] || die "--venv: ${PYTHON} not found (make it with launch/bootstrap_worker.sh --gpu --venv ${VENV})"
fi

# PYTHONPATH makes the package importable from any directory, so a relative
# --config keeps meaning what the user typed.
env_vars=("PYTHONPATH=${REPO_ROOT}${PYTHONPATH:+:${PYTHONPATH}}")
[[ -z "${GPUS}" ]] || env_vars+=("CUDA_VISIBLE_DEVICES=${GPUS}")
cmd=(env "${env_vars[@]}" "${PYTHON}" -m pixssl_jax.main --config "${CONFIG}" --workdir "${WORKDIR}"
  "${distributed_flags[@]}" "${MAIN_ARGS[@]}")

if (( DRY_RUN )); then
  printf '%s\n' "$(quote "${cmd[@]}")"
else
  printf '+ %s\n' "$(quote "${cmd[@]}")" >&2
  exec "${cmd[@]}"
fi

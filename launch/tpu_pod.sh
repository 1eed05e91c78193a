#!/usr/bin/env bash
# Launches pixssl_jax on every worker of a Cloud TPU VM (single host or pod slice).
#
# Steps of a run: (create the VM) -> copy a `git archive` of the code to all
# workers -> run the idempotent launch/bootstrap_worker.sh on all workers ->
# start `python -m pixssl_jax.main` on all workers in the background with nohup.
# On a TPU VM `jax.distributed.initialize()` finds the other workers by itself,
# so every worker runs the same command.
#
# Worker layout (under $HOME of the ssh user, see --remote-dir):
#   pixssl_jax/code/            the copied code (replaced on every launch)
#   pixssl_jax/venv/            the virtual environment (kept between launches)
#   pixssl_jax/logs/train.log   stdout+stderr of the job, appended per launch
#   pixssl_jax/logs/train.pid   pid of the job, used by --stop and --status
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

readonly PROG="launch/tpu_pod.sh"

usage() {
  cat <<EOF
Usage:
  ${PROG} --name NAME --zone ZONE [--project P] --config CFG --workdir DIR
      [--create --accelerator-type TYPE --version RUNTIME [--spot|--preemptible]]
      [--ref GIT_REF | --worktree] [--remote-dir DIR] [--dry-run] [-- MAIN_ARGS...]
  ${PROG} --name NAME --zone ZONE [--project P] --logs [--worker W] [--no-follow]
  ${PROG} --name NAME --zone ZONE [--project P] --status [--worker W]
  ${PROG} --name NAME --zone ZONE [--project P] --stop

Modes (default: launch a run):
  --logs                Stream worker W's log (default worker 0); Ctrl-C stops.
  --no-follow           With --logs: print the whole log and exit.
  --status              Print 'running' or 'stopped' for the job on worker W.
  --stop                Send SIGTERM to the job on all workers: it saves a
                        checkpoint at the next step boundary and exits 0.

Options:
  --name NAME           TPU VM name (required).
  --zone ZONE           Zone, e.g. us-west4-a (required).
  --project P           GCP project (default: gcloud's configured project).
  --config CFG          Config file relative to the repo root, optionally with
                        a preset: configs/pretrain.py:tpu_pod (required to run).
  --workdir DIR         Run directory, normally gs://BUCKET/PATH so that all
                        workers share checkpoints (required to run).
  --create              Create the TPU VM first (needs --accelerator-type and
                        --version).
  --accelerator-type T  e.g. v5litepod-64, v4-32.
  --version RUNTIME     TPU runtime, e.g. v2-alpha-tpuv5-lite, tpu-ubuntu2204-base.
  --spot | --preemptible
                        Create a spot / preemptible VM.
  --ref GIT_REF         Commit to copy (default HEAD; uncommitted changes are
                        not copied, so the run matches a commit).
  --worktree            Copy the working tree as it is instead (tracked and
                        untracked files that git does not ignore).
  --remote-dir DIR      Root directory on the workers (default pixssl_jax,
                        relative to the ssh user's home).
  --worker W            Worker for --logs/--status (default 0).
  --dry-run             Print every command, one per line, instead of running.
  -h, --help            Show this help.
  -- MAIN_ARGS...       Passed on to pixssl_jax.main, e.g. --config.num_steps=1000.
EOF
}

NAME="" ZONE="" PROJECT="" CONFIG="" WORKDIR="" ACCEL="" VERSION="" REF="HEAD"
REMOTE_DIR="pixssl_jax" WORKER="0" MODE="launch" CAPACITY=""
CREATE=0 DRY_RUN=0 FOLLOW=1 WORKTREE=0
MAIN_ARGS=()

# Takes the value of an option given as `--opt VALUE` or `--opt=VALUE`.
# Sets OPT_VALUE and OPT_SHIFT (how many words the option used).
take_value() {
  local opt="$1" next_count="$2" next="${3-}"
  if [[ "${opt}" == *=* ]]; then
    OPT_VALUE="${opt#*=}"
    OPT_SHIFT=1
  elif (( next_count > 0 )) && [[ "${next}" != --* ]]; then
    OPT_VALUE="${next}"
    OPT_SHIFT=2
  else
    die "option ${opt} needs a value"
  fi
  [[ -n "${OPT_VALUE}" ]] || die "option ${opt%%=*} needs a non-empty value"
}

while (( $# > 0 )); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --) shift; MAIN_ARGS=("$@"); break ;;
    --dry-run) DRY_RUN=1; shift ;;
    --create) CREATE=1; shift ;;
    --worktree) WORKTREE=1; shift ;;
    --spot) CAPACITY="--spot"; shift ;;
    --preemptible) CAPACITY="--preemptible"; shift ;;
    --logs) MODE="logs"; shift ;;
    --no-follow) FOLLOW=0; shift ;;
    --status) MODE="status"; shift ;;
    --stop) MODE="stop"; shift ;;
    --name|--name=*|--zone|--zone=*|--project|--project=*|--config|--config=*|\
    --workdir|--workdir=*|--accelerator-type|--accelerator-type=*|\
    --version|--version=*|--ref|--ref=*|--remote-dir|--remote-dir=*|\
    --worker|--worker=*)
      take_value "$1" "$(( $# - 1 ))" "${2-}"
      case "${1%%=*}" in
        --name) NAME="${OPT_VALUE}" ;;
        --zone) ZONE="${OPT_VALUE}" ;;
        --project) PROJECT="${OPT_VALUE}" ;;
        --config) CONFIG="${OPT_VALUE}" ;;
        --workdir) WORKDIR="${OPT_VALUE}" ;;
        --accelerator-type) ACCEL="${OPT_VALUE}" ;;
        --version) VERSION="${OPT_VALUE}" ;;
        --ref) REF="${OPT_VALUE}" ;;
        --remote-dir) REMOTE_DIR="${OPT_VALUE}" ;;
        --worker) WORKER="${OPT_VALUE}" ;;
      esac
      shift "${OPT_SHIFT}"
      ;;
    *) die "unknown argument '$1' (arguments for pixssl_jax.main go after '--')" ;;
  esac
done

# ---- Validation: every error names the option and the reason. ----
[[ -n "${NAME}" ]] || die "--name is required (the TPU VM name)"
[[ -n "${ZONE}" ]] || die "--zone is required (e.g. us-west4-a)"
[[ "${WORKER}" =~ ^[0-9]+$ ]] || die "--worker must be a worker index (0, 1, ...), got '${WORKER}'"
[[ "${REMOTE_DIR}" =~ ^[A-Za-z0-9_./-]+$ ]] \
  || die "--remote-dir may only hold letters, digits and _ . / -, got '${REMOTE_DIR}'"
if [[ "${MODE}" == "launch" ]]; then
  [[ -n "${CONFIG}" ]] || die "--config is required (e.g. configs/pretrain.py:tpu_pod)"
  [[ -n "${WORKDIR}" ]] || die "--workdir is required (e.g. gs://BUCKET/runs/NAME)"
  config_file="${CONFIG%%:*}"
  [[ "${config_file}" != /* ]] \
    || die "--config must be relative to the repo root (the workers run from a copy of it), got '${CONFIG}'"
  [[ -f "${REPO_ROOT}/${config_file}" ]] \
    || die "--config: file '${config_file}' not found under ${REPO_ROOT}"
  if (( CREATE )); then
    [[ -n "${ACCEL}" ]] || die "--create needs --accelerator-type (e.g. v5litepod-64)"
    [[ -n "${VERSION}" ]] || die "--create needs --version (e.g. v2-alpha-tpuv5-lite)"
  fi
  [[ -z "${CAPACITY}" || "${CREATE}" == 1 ]] || die "${CAPACITY} only applies with --create"
  if [[ "${WORKDIR}" != gs://* ]]; then
    echo "${PROG}: warning: --workdir '${WORKDIR}' is not a gs:// path; on a pod every" \
      "worker would write to its own local disk and checkpoints would not be shared" >&2
  fi
else
  (( ! CREATE )) || die "--create only applies when launching a run"
fi

TPU_FLAGS=("--zone=${ZONE}")
[[ -z "${PROJECT}" ]] || TPU_FLAGS+=("--project=${PROJECT}")

# Shell text that sets R (the remote root) on the worker; $HOME expands there.
if [[ "${REMOTE_DIR}" == /* ]]; then
  REMOTE_ROOT_SH="R=${REMOTE_DIR}"
else
  REMOTE_ROOT_SH="R=\"\$HOME\"/${REMOTE_DIR}"
fi
# Succeeds when the pid file names a live pixssl_jax.main process. Checking the
# command line, not only the pid, avoids trusting a pid reused after a reboot.
# The $-expressions are meant to expand on the worker, hence single quotes.
# shellcheck disable=SC2016
readonly JOB_ALIVE_SH='[ -s "$R/logs/train.pid" ] && grep -qs pixssl_jax.main "/proc/$(cat "$R/logs/train.pid")/cmdline"'

ssh_workers() {
  local worker="$1" command="$2"
  run gcloud compute tpus tpu-vm ssh "${NAME}" "${TPU_FLAGS[@]}" \
    "--worker=${worker}" "--command=${command}"
}

case "${MODE}" in
  logs)
    if (( FOLLOW )); then
      ssh_workers "${WORKER}" "${REMOTE_ROOT_SH}; tail -n 200 -F \"\$R/logs/train.log\""
    else
      ssh_workers "${WORKER}" "${REMOTE_ROOT_SH}; cat \"\$R/logs/train.log\""
    fi
    exit 0
    ;;
  status)
    ssh_workers "${WORKER}" \
      "${REMOTE_ROOT_SH}; if ${JOB_ALIVE_SH}; then echo running; else echo stopped; fi"
    exit 0
    ;;
  stop)
    ssh_workers all "${REMOTE_ROOT_SH}; if ${JOB_ALIVE_SH}; then kill -TERM \"\$(cat \"\$R/logs/train.pid\")\"; echo \"sent SIGTERM on \$(hostname)\"; else echo \"no running job on \$(hostname)\"; fi"
    exit 0
    ;;
esac

# ---- Launch. ----
git -C "${REPO_ROOT}" rev-parse --is-inside-work-tree >/dev/null 2>&1 \
  || die "${REPO_ROOT} is not a git checkout; the code is copied with git"
TMP_DIR="$(mktemp -d)"
trap 'rm -rf "${TMP_DIR}"' EXIT
TARBALL="${TMP_DIR}/pixssl_jax_code.tar.gz"
if (( WORKTREE )); then
  [[ "${REF}" == "HEAD" ]] || die "--ref and --worktree exclude each other"
  CODE_VERSION="the working tree of $(git -C "${REPO_ROOT}" rev-parse --short HEAD)"
  # The file list is read-only preparation; tar is the step that --dry-run shows.
  file_list="${TMP_DIR}/files"
  while IFS= read -r -d '' path; do
    # Tracked files deleted in the working tree are still listed by git.
    if [[ -e "${REPO_ROOT}/${path}" ]]; then
      printf '%s\0' "${path}"
    fi
  done < <(git -C "${REPO_ROOT}" ls-files -z --cached --others --exclude-standard) \
    > "${file_list}"
  copy_cmd=(tar -czf "${TARBALL}" -C "${REPO_ROOT}" --null "--files-from=${file_list}")
else
  COMMIT="$(git -C "${REPO_ROOT}" rev-parse --verify --quiet "${REF}^{commit}")" \
    || die "--ref: '${REF}' is not a commit in ${REPO_ROOT}"
  CODE_VERSION="commit ${COMMIT}"
  if [[ "${REF}" == "HEAD" && -n "$(git -C "${REPO_ROOT}" status --porcelain --untracked-files=no)" ]]; then
    echo "${PROG}: warning: uncommitted changes are not copied; the workers run ${CODE_VERSION}" \
      "(use --worktree to copy them)" >&2
  fi
  copy_cmd=(git -C "${REPO_ROOT}" archive --format=tar.gz "--output=${TARBALL}" "${COMMIT}")
fi

if (( CREATE )); then
  create_cmd=(gcloud compute tpus tpu-vm create "${NAME}" "${TPU_FLAGS[@]}"
    "--accelerator-type=${ACCEL}" "--version=${VERSION}")
  [[ -z "${CAPACITY}" ]] || create_cmd+=("${CAPACITY}")
  run "${create_cmd[@]}"
fi

run "${copy_cmd[@]}"
run gcloud compute tpus tpu-vm scp "${TARBALL}" "${NAME}:pixssl_jax_code.tar.gz" \
  "${TPU_FLAGS[@]}" --worker=all

# Unpack next to the old copy and swap, refusing while a job still runs from it.
setup_sh="set -eu; ${REMOTE_ROOT_SH}"
setup_sh+="; if ${JOB_ALIVE_SH}; then echo \"pixssl_jax is still running on \$(hostname); stop it with --stop first\" >&2; exit 2; fi"
setup_sh+="; mkdir -p \"\$R/logs\"; rm -rf \"\$R/code.new\"; mkdir -p \"\$R/code.new\""
setup_sh+="; tar -xzf \"\$HOME/pixssl_jax_code.tar.gz\" -C \"\$R/code.new\""
setup_sh+="; rm -rf \"\$R/code\"; mv \"\$R/code.new\" \"\$R/code\"; rm -f \"\$HOME/pixssl_jax_code.tar.gz\""
setup_sh+="; bash \"\$R/code/launch/bootstrap_worker.sh\" --tpu --venv \"\$R/venv\""
ssh_workers all "${setup_sh}"

main_cmd="\"\$R/venv/bin/python\" -m pixssl_jax.main $(quote --config "${CONFIG}" --workdir "${WORKDIR}")"
if (( ${#MAIN_ARGS[@]} > 0 )); then
  main_cmd+=" $(quote "${MAIN_ARGS[@]}")"
fi
run_sh="set -eu; ${REMOTE_ROOT_SH}"
run_sh+="; if ${JOB_ALIVE_SH}; then echo \"pixssl_jax is already running on \$(hostname)\" >&2; exit 2; fi"
run_sh+="; cd \"\$R/code\""
run_sh+="; echo \"=== \$(date -u +%Y-%m-%dT%H:%M:%SZ) launch of ${CODE_VERSION} on \$(hostname) ===\" >> \"\$R/logs/train.log\""
# stdin/stdout/stderr are all redirected so that ssh returns at once.
run_sh+="; nohup ${main_cmd} >> \"\$R/logs/train.log\" 2>&1 < /dev/null &"
run_sh+=" echo \$! > \"\$R/logs/train.pid\"; echo \"started pixssl_jax on \$(hostname), log \$R/logs/train.log\""
ssh_workers all "${run_sh}"

if (( ! DRY_RUN )); then
  echo "Follow worker 0 with: ${PROG} --name ${NAME} --zone ${ZONE}${PROJECT:+ --project ${PROJECT}} --logs" >&2
fi

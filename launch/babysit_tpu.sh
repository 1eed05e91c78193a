#!/usr/bin/env bash
# Keeps a pixssl_jax run alive on a spot/preemptible Cloud TPU VM.
#
# Every --interval seconds it reads the VM state. A PREEMPTED or TERMINATED VM
# is deleted and re-created, and the run is launched again with
# launch/tpu_pod.sh --create: the trainer resumes from the latest checkpoint
# in --workdir by itself. A missing VM is created and launched the same way.
# While the VM is READY it checks that the job still runs on worker 0; once it
# does not (the run finished, or failed on a healthy VM), the babysitter exits
# instead of restarting a job that may fail again: read the log and relaunch.
#
# Stop the babysitter (Ctrl-C) before deleting the VM by hand, or it will
# re-create it.
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly SCRIPT_DIR
readonly PROG="launch/babysit_tpu.sh"

usage() {
  cat <<EOF
Usage: ${PROG} --name NAME --zone ZONE [--project P]
           --accelerator-type TYPE --version RUNTIME [--spot|--preemptible]
           --config CFG --workdir gs://... [--ref GIT_REF] [--interval SECONDS]
           [--once] [--dry-run] [-- MAIN_ARGS...]

Options are those of launch/tpu_pod.sh, plus:
  --ref GIT_REF       Commit to (re)launch; resolved once at start (default
                      HEAD), so a relaunch hours later runs the same code.
  --interval SECONDS  Time between checks (default 300).
  --once              Check (and act) once, then exit.
  --dry-run           Read the VM state (read-only), but print the commands that
                      would delete, create or launch instead of running them.
  -h, --help          Show this help.
EOF
}

log() {
  echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) ${PROG}: $*" >&2
}

NAME="" ZONE="" PROJECT="" ACCEL="" VERSION="" CONFIG="" WORKDIR="" CAPACITY="" REF="HEAD"
INTERVAL=300 ONCE=0 DRY_RUN=0
MAIN_ARGS=()

while (( $# > 0 )); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --) shift; MAIN_ARGS=("$@"); break ;;
    --once) ONCE=1; shift; continue ;;
    --dry-run) DRY_RUN=1; shift; continue ;;
    --spot|--preemptible) CAPACITY="$1"; shift; continue ;;
    --name|--zone|--project|--accelerator-type|--version|--config|--workdir|--interval|--ref)
      [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "option $1 needs a value"
      opt="$1" value="$2"
      shift 2
      ;;
    --*=*) opt="${1%%=*}" value="${1#*=}"; shift ;;
    *) die "unknown argument '$1' (arguments for pixssl_jax.main go after '--')" ;;
  esac
  [[ -n "${value}" ]] || die "option ${opt} needs a non-empty value"
  case "${opt}" in
    --name) NAME="${value}" ;;
    --zone) ZONE="${value}" ;;
    --project) PROJECT="${value}" ;;
    --accelerator-type) ACCEL="${value}" ;;
    --version) VERSION="${value}" ;;
    --config) CONFIG="${value}" ;;
    --workdir) WORKDIR="${value}" ;;
    --interval) INTERVAL="${value}" ;;
    --ref) REF="${value}" ;;
    *) die "unknown option '${opt}'" ;;
  esac
done

[[ -n "${NAME}" ]] || die "--name is required (the TPU VM name)"
[[ -n "${ZONE}" ]] || die "--zone is required"
[[ -n "${ACCEL}" ]] || die "--accelerator-type is required (to re-create the VM)"
[[ -n "${VERSION}" ]] || die "--version is required (to re-create the VM)"
[[ -n "${CONFIG}" ]] || die "--config is required"
[[ -n "${WORKDIR}" ]] || die "--workdir is required"
if ! [[ "${INTERVAL}" =~ ^[0-9]+$ ]] || (( INTERVAL == 0 )); then
  die "--interval must be a positive number of seconds, got '${INTERVAL}'"
fi
[[ "${WORKDIR}" == gs://* ]] \
  || die "--workdir must be a gs:// path: a re-created VM has empty disks, so only a bucket keeps the checkpoints"

COMMIT="$(git -C "${SCRIPT_DIR}/.." rev-parse --verify --quiet "${REF}^{commit}")" \
  || die "--ref: '${REF}' is not a commit of this checkout"
log "watching ${NAME}; (re)launches run commit ${COMMIT}"

TPU_FLAGS=("--zone=${ZONE}")
[[ -z "${PROJECT}" ]] || TPU_FLAGS+=("--project=${PROJECT}")
pod_args=(--name "${NAME}" --zone "${ZONE}")
[[ -z "${PROJECT}" ]] || pod_args+=(--project "${PROJECT}")
launch_args=("${pod_args[@]}" --create --accelerator-type "${ACCEL}" --version "${VERSION}"
  --config "${CONFIG}" --workdir "${WORKDIR}" --ref "${COMMIT}")
[[ -z "${CAPACITY}" ]] || launch_args+=("${CAPACITY}")
(( ! DRY_RUN )) || launch_args+=(--dry-run)
launch_args+=(-- "${MAIN_ARGS[@]}")

# Prints the VM state (READY, PREEMPTED, ...), NOT_FOUND, or UNKNOWN when
# gcloud failed for another reason (network, auth): then nothing is changed.
vm_state() {
  local out
  if out="$(gcloud compute tpus tpu-vm describe "${NAME}" "${TPU_FLAGS[@]}" \
      --format='value(state)' 2>&1)"; then
    printf '%s\n' "${out:-UNKNOWN}"
  elif grep -qiE 'NOT_FOUND|not found' <<<"${out}"; then
    echo NOT_FOUND
  else
    log "gcloud describe failed: ${out}"
    echo UNKNOWN
  fi
}

# Prints running, stopped, or unknown (ssh failed) for the job on worker 0.
job_state() {
  local out
  out="$("${SCRIPT_DIR}/tpu_pod.sh" "${pod_args[@]}" --status --worker 0 2>/dev/null || true)"
  case "${out}" in
    *running*) echo running ;;
    *stopped*) echo stopped ;;
    *) echo unknown ;;
  esac
}

# Deletes the VM if asked, then creates it and launches the run; a failure
# (e.g. no spot capacity) is logged and retried at the next check.
relaunch() {
  local delete_first="$1"
  if (( delete_first )); then
    if ! run gcloud compute tpus tpu-vm delete "${NAME}" "${TPU_FLAGS[@]}" --quiet; then
      log "delete failed; retrying at the next check"
      return 1
    fi
  fi
  if ! "${SCRIPT_DIR}/tpu_pod.sh" "${launch_args[@]}"; then
    log "create/launch failed; retrying at the next check"
    return 1
  fi
  if (( DRY_RUN )); then
    log "dry run: printed the commands that would relaunch ${NAME}"
  else
    log "relaunched ${NAME}; the run resumes from the latest checkpoint in ${WORKDIR}"
  fi
}

# One check; returns 0 to keep watching, 10 when the babysitter should exit.
check_once() {
  local state
  state="$(vm_state)"
  log "VM ${NAME} state: ${state}"
  case "${state}" in
    PREEMPTED|TERMINATED) relaunch 1 || true ;;
    NOT_FOUND) relaunch 0 || true ;;
    READY)
      case "$(job_state)" in
        running) log "job is running on worker 0" ;;
        stopped)
          log "job is no longer running on worker 0 (finished or failed); see" \
            "launch/tpu_pod.sh --name ${NAME} --zone ${ZONE} --logs --no-follow. Exiting."
          return 10
          ;;
        *) log "could not reach worker 0; checking again later" ;;
      esac
      ;;
    STOPPED|STOPPING)
      log "VM was stopped by hand; not touching it. Exiting."
      return 10
      ;;
    *) log "waiting (state ${state})" ;;
  esac
}

while true; do
  status=0
  check_once || status=$?
  (( status != 10 )) || exit 0
  (( ! ONCE )) || exit 0
  sleep "${INTERVAL}"
done

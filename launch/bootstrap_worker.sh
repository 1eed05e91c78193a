#!/usr/bin/env bash
# Idempotent per-worker setup: a virtual environment with jax for the local
# accelerator and the packages of requirements.txt.
#
# A marker file in the venv records a hash of (requirements.txt, accelerator);
# when it matches, the script does nothing, so it is safe to run on every
# launch. Several processes sharing one venv (e.g. SLURM tasks on a shared
# filesystem) take turns through a lock file.
#
# jax needs Python >= 3.11. When no such interpreter can make a venv (Cloud TPU
# VM images ship Python 3.10), the script installs `uv` from PyPI and lets it
# create the venv with a managed Python 3.12.
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

readonly PROG="launch/bootstrap_worker.sh"
readonly UV_PYTHON_VERSION="3.12"

usage() {
  cat <<EOF
Usage: ${PROG} [--tpu|--gpu|--cpu] [--venv DIR] [--python PY]
           [--requirements FILE] [--force] [--dry-run]

Creates (or reuses) a virtual environment, installs jax for the accelerator
(jax[tpu], jax[cuda12] or plain jax) and then requirements.txt. A second run
with the same requirements and accelerator is a no-op.

Options:
  --tpu | --gpu | --cpu  Which jax build to install (default --tpu).
  --venv DIR             Virtual environment (default: \$HOME/pixssl_jax/venv).
  --python PY            Interpreter for the venv (default: the first of
                         python3.13, python3.12, python3.11, python3 that is
                         >= 3.11 and can make a venv; otherwise uv is used).
  --requirements FILE    Requirements file (default: ${REPO_ROOT}/requirements.txt).
  --force                Reinstall even if the marker says up to date.
  --dry-run              Print the commands, one per line, instead of running.
  -h, --help             Show this help.
EOF
}

ACCELERATOR="tpu" VENV="${HOME}/pixssl_jax/venv" PYTHON="" FORCE=0 DRY_RUN=0
REQUIREMENTS="${REPO_ROOT}/requirements.txt"

while (( $# > 0 )); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --tpu) ACCELERATOR="tpu"; shift ;;
    --gpu) ACCELERATOR="gpu"; shift ;;
    --cpu) ACCELERATOR="cpu"; shift ;;
    --force) FORCE=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --venv|--python|--requirements)
      [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "option $1 needs a value"
      case "$1" in
        --venv) VENV="$2" ;;
        --python) PYTHON="$2" ;;
        --requirements) REQUIREMENTS="$2" ;;
      esac
      shift 2
      ;;
    --venv=*) VENV="${1#*=}"; shift ;;
    --python=*) PYTHON="${1#*=}"; shift ;;
    --requirements=*) REQUIREMENTS="${1#*=}"; shift ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

[[ -n "${VENV}" ]] || die "--venv needs a non-empty value"
[[ -f "${REQUIREMENTS}" ]] || die "--requirements: file '${REQUIREMENTS}' not found"

# The jax extra matches the accelerator; the version range comes from
# requirements.txt so the two can never disagree.
jax_spec="$(grep -E '^jax[[:space:]]*([<>=!~]|$)' "${REQUIREMENTS}" | head -n 1 | tr -d '[:space:]' || true)"
[[ -n "${jax_spec}" ]] || die "${REQUIREMENTS} has no 'jax' requirement line to take the version range from"
case "${ACCELERATOR}" in
  tpu) JAX_PACKAGE="jax[tpu]${jax_spec#jax}" ;;
  gpu) JAX_PACKAGE="jax[cuda12]${jax_spec#jax}" ;;
  cpu) JAX_PACKAGE="${jax_spec}" ;;
esac

WANT_HASH="$( { cat "${REQUIREMENTS}"; echo "accelerator=${ACCELERATOR}"; } | sha256sum | cut -d' ' -f1)"
MARKER="${VENV}/.pixssl_jax_bootstrap"
VENV_PY="${VENV}/bin/python"

# Serialise bootstraps of the same venv (flock is in util-linux; skip if absent).
if (( ! DRY_RUN )) && command -v flock >/dev/null 2>&1; then
  mkdir -p "$(dirname "${VENV}")"
  exec 9>"${VENV}.lock"
  flock 9
fi

if (( ! FORCE )) && [[ -x "${VENV_PY}" && -f "${MARKER}" ]] \
    && [[ "$(cat "${MARKER}")" == "${WANT_HASH}" ]]; then
  echo "${PROG}: ${VENV} is up to date (${ACCELERATOR}, requirements hash ${WANT_HASH:0:12}); nothing to do" >&2
  exit 0
fi

# True when `$1` is Python >= 3.11 with a working venv module (ensurepip is
# split into a separate apt package on Debian/Ubuntu).
python_usable() {
  "$1" -c 'import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1
}

if [[ ! -x "${VENV_PY}" ]]; then
  interpreter=""
  if [[ -n "${PYTHON}" ]]; then
    command -v "${PYTHON}" >/dev/null 2>&1 || die "--python: '${PYTHON}' not found"
    python_usable "${PYTHON}" \
      || die "--python: '${PYTHON}' is not Python >= 3.11 with the venv module (jax needs 3.11+)"
    interpreter="${PYTHON}"
  else
    for candidate in python3.13 python3.12 python3.11 python3; do
      if command -v "${candidate}" >/dev/null 2>&1 && python_usable "${candidate}"; then
        interpreter="${candidate}"
        break
      fi
    done
  fi
  if [[ -n "${interpreter}" ]]; then
    run "${interpreter}" -m venv "${VENV}"
  else
    echo "${PROG}: no Python >= 3.11 with venv found; using uv to get Python ${UV_PYTHON_VERSION}" >&2
    command -v python3 >/dev/null 2>&1 || die "no python3 at all on this host; install Python >= 3.11"
    uv_bin="$(python3 -c 'import site; print(site.getuserbase())')/bin/uv"
    if [[ ! -x "${uv_bin}" ]]; then
      python3 -m pip --version >/dev/null 2>&1 \
        || die "python3 has no pip to install uv with; install python3-pip, or Python >= 3.11 with its venv package"
      pip_flags=(--user --quiet)
      # PEP 668 distributions (Ubuntu 24.04+) refuse user installs without this flag.
      if python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'; then
        pip_flags+=(--break-system-packages)
      fi
      run python3 -m pip install "${pip_flags[@]}" uv
    fi
    run "${uv_bin}" venv --seed --python "${UV_PYTHON_VERSION}" "${VENV}"
  fi
else
  echo "${PROG}: reusing the virtual environment ${VENV}" >&2
fi

run "${VENV_PY}" -m pip install --quiet --upgrade pip
run "${VENV_PY}" -m pip install --quiet "${JAX_PACKAGE}"
run "${VENV_PY}" -m pip install --quiet -r "${REQUIREMENTS}"

if (( DRY_RUN )); then
  printf '%s\n' "$(quote printf '%s\n' "${WANT_HASH}") > $(quote "${MARKER}")"
else
  # Written last: an interrupted install leaves no marker and is redone next time.
  printf '%s\n' "${WANT_HASH}" > "${MARKER}"
  echo "${PROG}: ${VENV} ready (${ACCELERATOR}); $("${VENV_PY}" -c 'import jax; print("jax", jax.__version__)' 2>/dev/null || echo 'jax import failed')" >&2
fi

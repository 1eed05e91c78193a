# Shell helpers shared by the launch scripts; sourced, not run. The sourcing script sets PROG
# (its name, for messages) and, where it uses `run`, DRY_RUN (1 prints commands instead).

# The repository checkout the scripts belong to (this file is in its launch/ folder).
# shellcheck disable=SC2034  # Used by the scripts that source this file.
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT

die() {
  echo "${PROG}: error: $*" >&2
  echo "Run '${PROG} --help' for usage." >&2
  exit 2
}

# Quotes words for a POSIX shell; plain words stay bare so the output reads well.
quote() {
  local out=() word
  local q="'"
  for word in "$@"; do
    if [[ "${word}" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+=("${word}")
    else
      out+=("${q}${word//${q}/${q}\\${q}${q}}${q}")
    fi
  done
  local IFS=' '
  printf '%s' "${out[*]}"
}

# Runs one command, or prints it (exactly, one line) under --dry-run.
run() {
  if (( DRY_RUN )); then
    printf '%s\n' "$(quote "$@")"
  else
    printf '+ %s\n' "$(quote "$@")" >&2
    "$@"
  fi
}

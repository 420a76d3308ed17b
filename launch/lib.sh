# shellcheck shell=bash
# Helpers shared by tpu_pod.sh and slurm_gpu.sh, to be sourced rather than run. They use bash
# builtins only, so --dry-run works with an empty PATH.

# Print one argument so that a POSIX shell reads it back as the same single word: bare when
# it has only safe characters, otherwise in single quotes. A --flag=value argument keeps
# "--flag=" outside the quotes, which reads better and parses the same.
shell_quote() {
  local arg=$1 prefix=""
  if [[ $arg =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$arg"
    return
  fi
  if [[ $arg =~ ^(--[A-Za-z0-9_.-]+=)(.+)$ ]]; then
    prefix=${BASH_REMATCH[1]}
    arg=${BASH_REMATCH[2]}
  fi
  printf "%s'%s'" "$prefix" "${arg//\'/\'\\\'\'}"
}

# Print all arguments quoted with shell_quote and separated by spaces, without a newline.
join_quoted() {
  local sep="" arg
  for arg in "$@"; do
    printf '%s' "$sep"
    shell_quote "$arg"
    sep=" "
  done
}

# Print the command (--dry-run) or echo it to stderr with a "+ " prefix and run it.
run_cmd() {
  if ((DRY_RUN)); then
    join_quoted "$@"
    printf '\n'
  else
    printf '+ %s\n' "$(join_quoted "$@")" >&2
    "$@"
  fi
}

# Print a "# ..." line in dry-run output, or an info line on stderr when running for real.
note() {
  if ((DRY_RUN)); then
    printf '# %s\n' "$*"
  else
    printf '%s: %s\n' "$PROG" "$*" >&2
  fi
}

warn() {
  printf '%s: warning: %s\n' "$PROG" "$*" >&2
}

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 1
}

# Exit with status 2 and a pointer to --help, as command-line tools do for invalid usage.
usage_error() {
  printf '%s: error: %s\nRun "%s --help" to list the options.\n' "$PROG" "$*" "$PROG" >&2
  exit 2
}

# Exit unless TOOL is on PATH. HINT is the instruction for installing it.
require_tool() {
  local tool=$1 hint=$2
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found on PATH; $hint (or use --dry-run)"
}

# Exit unless VALUE is an absolute path. NAME is the option that set it.
require_absolute() {
  local name=$1 value=$2
  [[ $value == /* ]] || usage_error "$name must be an absolute path on a filesystem that every" \
    "host mounts at the same place (got '$value')"
}

require_positive_int() {
  local name=$1 value=$2
  [[ $value =~ ^[1-9][0-9]*$ ]] || usage_error "$name must be a positive integer (got '$value')"
}

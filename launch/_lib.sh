# Sourced by the scripts in launch/ (not run on its own): the dry-run runner and helpers.
#
# Every command a launcher would run goes through `run`, which prints it first (shell-quoted,
# prefixed "+ ", so it can be pasted) and, under --dry-run (DRY_RUN=1), only prints it.

DRY_RUN=${DRY_RUN:-0}

# The script's header comment (from line 2 to `set -euo`), for --help.
usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
}

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# Prints a command the way a shell would read it back.
show() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
}

run() {
  show "$@"
  if [[ "$DRY_RUN" == 1 ]]; then
    return 0
  fi
  "$@"
}

# One shell-quoted string from several words (for `--command=` of a remote shell).
quote_words() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(printf '%q' "$word")"
  done
  printf '%s' "$out"
}

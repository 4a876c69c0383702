# shellcheck shell=bash
# Shared helpers for Delorean's scripts. Source it; do not run it.
#
# Everything fetched or built lives under $DELOREAN_CACHE (default ~/.cache/delorean), never in
# the repository, keyed by the versions and configuration that produced it.

set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DELOREAN_CACHE=${DELOREAN_CACHE:-$HOME/.cache/delorean}
export DELOREAN_CACHE
mkdir -p "$DELOREAN_CACHE"

# Pinned versions: changing one changes the cache key of everything built from it.
KERNEL_PKG=linux-source-7.3
KERNEL_PKG_SUITE=trixie-backports
BINDGEN_VERSION=0.73.2
LIBCLANG_VERSION=18.1.1
# The debug kernel's C compiler: Debian 12's newest clang/lld/llvm (KASAN with Rust needs clang).
DEBUG_LLVM=19

SCRIPT_START=$(date +%s)

log() { printf '[%s +%4ss] %s\n' "$(basename "$0")" "$(($(date +%s) - SCRIPT_START))" "$*" >&2; }
die() { printf '%s: error: %s\n' "$(basename "$0")" "$*" >&2; exit 1; }

# run_with_progress PHASE LOGFILE CMD...: runs CMD with output to LOGFILE and prints the phase and
# elapsed time every 20 s, so a long build is visibly alive. On failure prints the log's tail.
run_with_progress() {
  local phase=$1 logfile=$2; shift 2
  local start; start=$(date +%s)
  log "$phase (log: $logfile)"
  "$@" >"$logfile" 2>&1 &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    local now; now=$(date +%s)
    if (((now - start) % 20 == 0)); then log "$phase: $((now - start))s elapsed"; fi
  done
  if ! wait "$pid"; then
    tail -n 40 "$logfile" >&2
    die "$phase failed after $(($(date +%s) - start))s; full log: $logfile"
  fi
  log "$phase: done in $(($(date +%s) - start))s"
}

APT_UPDATED=0
# ensure_apt PKG...: installs the Debian packages that are missing, from the machine's own suites.
ensure_apt() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  if ((APT_UPDATED == 0)); then
    run_with_progress "apt-get update" "$DELOREAN_CACHE/apt-update.log" apt-get update
    APT_UPDATED=1
  fi
  run_with_progress "apt-get install ${missing[*]}" "$DELOREAN_CACHE/apt-install.log" \
    env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
}

# The toolchain environment for building Rust-for-Linux: bindgen on PATH, libclang from PyPI.
LIBCLANG_VENV=$DELOREAN_CACHE/venv-libclang-$LIBCLANG_VERSION
toolchain_env() {
  export PATH="$HOME/.cargo/bin:$PATH"
  LIBCLANG_PATH=$(echo "$LIBCLANG_VENV"/lib/python3*/site-packages/clang/native)
  export LIBCLANG_PATH
}

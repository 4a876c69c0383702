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
# Debian's own kernel (scripts/debian-kernel): its ABI name and flavour, as in
# linux-image-<ABI>-<FLAVOUR>; the environment may name another (after a kernel update).
DEBIAN_KERNEL_ABI=${DEBIAN_KERNEL_ABI:-7.3.4+deb13}
DEBIAN_KERNEL_FLAVOUR=${DEBIAN_KERNEL_FLAVOUR:-amd64}
# The debug kernel's C compiler: Debian 12's newest clang/lld/llvm (KASAN with Rust needs clang).
DEBUG_LLVM=19

SCRIPT_START=$(date +%s)

log() { printf '[%s +%4ss] %s\n' "$(basename "$0")" "$(($(date +%s) - SCRIPT_START))" "$*" >&2; }
die() { printf '%s: error: %s\n' "$(basename "$0")" "$*" >&2; exit 1; }

# run_with_progress PHASE LOGFILE CMD...: runs CMD with output to LOGFILE and shows that it is
# alive: on a terminal one status line updated every second, elsewhere (CI) a line every 20 s.
# With PROGRESS_STEP_RE set (an ERE matching one step's log line, e.g. kbuild's "  CC foo.o")
# the status counts steps, and with PROGRESS_TOTAL (the count of the last such run) shows
# "done/total (pct%)" and an estimate of the time left. On failure prints the log's tail.
run_with_progress() {
  local phase=$1 logfile=$2; shift 2
  local start; start=$(date +%s)
  local tty=0; [ -t 2 ] && tty=1
  log "$phase (log: $logfile)"
  "$@" >"$logfile" 2>&1 &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    local now; now=$(date +%s)
    local elapsed=$((now - start))
    ((tty || elapsed % 20 == 0)) || continue
    local status="${elapsed}s elapsed"
    if [ -n "${PROGRESS_STEP_RE:-}" ]; then
      local steps; steps=$(grep -cE "$PROGRESS_STEP_RE" "$logfile" 2>/dev/null || true)
      local total=${PROGRESS_TOTAL:-0}
      if ((total > 0 && steps > 0)); then
        local pct=$((steps * 100 / total)); ((pct > 99)) && pct=99
        local left=$((elapsed * (total - steps) / steps)); ((left < 0)) && left=0
        status="$steps/$total steps ($pct%), ${elapsed}s elapsed, ~${left}s left"
        if ((tty)); then
          local bar; bar=$(printf '%*s' $((pct / 5)) '' | tr ' ' '#')$(printf '%*s' $((20 - pct / 5)) '' | tr ' ' '.')
          status="[$bar] $status"
        fi
      else
        status="$steps steps, ${elapsed}s elapsed"
      fi
    fi
    if ((tty)); then
      printf '\r\033[K[%s +%4ss] %s: %s' "$(basename "$0")" "$((now - SCRIPT_START))" "$phase" "$status" >&2
    else
      log "$phase: $status"
    fi
  done
  ((tty)) && printf '\r\033[K' >&2
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

# The private apt state through which trixie-backports packages are fetched. Never add trixie
# suites to the system's sources: that upgrades libc and breaks apt (see
# ../shared/KERNEL-TOOLCHAIN.md). A private sources list + lists dir + cache dir touch nothing
# else.
APT_PRIVATE=$DELOREAN_CACHE/apt-private
apt_private() {
  apt-get -o Dir::Etc::sourcelist="$APT_PRIVATE/sources.list" -o Dir::Etc::sourceparts=- \
    -o Dir::State::Lists="$APT_PRIVATE/lists" -o Dir::Cache="$APT_PRIVATE/cache" \
    -o APT::Get::List-Cleanup=0 "$@"
}
apt_private_update() {
  mkdir -p "$APT_PRIVATE/lists/partial" "$APT_PRIVATE/cache/archives/partial"
  local uri
  uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$uri" ] || uri=$(awk '/^deb / && !/security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  [ -n "$uri" ] || die "cannot find this machine's Debian archive address in /etc/apt"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri $KERNEL_PKG_SUITE main" \
    >"$APT_PRIVATE/sources.list"
  run_with_progress "apt-get update ($KERNEL_PKG_SUITE, private state)" \
    "$DELOREAN_CACHE/apt-private-update.log" apt_private update
}
# apt_private_download DIR PKG[=VERSION]...: downloads the packages' .debs into DIR through the
# private state (its lists are fetched first if missing, and refreshed once if a package is not
# in them: backports move on).
apt_private_download() {
  local dir=$1; shift
  mkdir -p "$dir"
  compgen -G "$APT_PRIVATE/lists/*_Packages" >/dev/null || apt_private_update
  log "download $* into $dir"
  if ! apt_private_fetch "$dir" "$@"; then
    apt_private_update
    apt_private_fetch "$dir" "$@" || { tail -n 20 "$DELOREAN_CACHE/apt-private-download.log" >&2
      die "cannot download $* from $KERNEL_PKG_SUITE"; }
  fi
}
apt_private_fetch() {
  local dir=$1; shift
  (cd "$dir" && apt_private download "$@") >"$DELOREAN_CACHE/apt-private-download.log" 2>&1
}

# Shared shell helpers for scripts/*. Source it; do not run it.

# ark_apt_install PKG...: installs the Debian packages that are missing, with a clear error
# when apt is unavailable. `apt-get update` runs at most once per call site, only when needed.
ark_apt_install() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "ERROR: missing packages (${missing[*]}) and apt-get is not available; install them by hand" >&2
    return 1
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "ERROR: missing packages (${missing[*]}); run as root or install them by hand" >&2
    return 1
  fi
  echo "[apt] installing: ${missing[*]}" >&2
  local log
  log=$(mktemp /tmp/ark-apt.XXXXXX)
  if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    echo "ERROR: apt-get install failed for: ${missing[*]} (full log: $log). Is a Debian mirror reachable?" >&2
    return 1
  fi
  rm -f "$log"
}

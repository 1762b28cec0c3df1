# shellcheck shell=bash
# common.sh - helpers shared by the kernel-test scripts.  Sourced, not run.
#
# Callers set KRT_LOG_TAG before sourcing (used as the log prefix).

# sbin is not on a normal user's PATH on Debian; ip/ipvsadm/nft live there.
case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH=$PATH:/usr/sbin:/sbin ;; esac
export PATH

krt_log() { echo "[${KRT_LOG_TAG:-krt}] $*" >&2; }

# Seconds since an earlier "date +%s.%N" value, one decimal.
krt_since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

# krt_pkg_installed PKG: true if dpkg has PKG fully installed.
krt_pkg_installed() {
  [[ $(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null) == "ii"* ]]
}

# krt_ensure_pkgs PKG...: install the Debian packages that are not installed yet.
# Quick (one dpkg-query per package, no network) when everything is there;
# `apt-get update` runs only when something is missing.  Needs root to install.
krt_ensure_pkgs() {
  local p missing=() t0
  command -v dpkg-query >/dev/null 2>&1 || {
    krt_log "no dpkg-query: install these packages by hand: $*"; return 1; }
  for p in "$@"; do
    krt_pkg_installed "$p" || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  if ((EUID != 0)); then
    krt_log "missing Debian packages: ${missing[*]} (run as root, or apt-get install them)"
    return 1
  fi
  krt_log "installing ${missing[*]}"
  t0=$(date +%s.%N)
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  krt_log "packages installed in $(krt_since "$t0")s"
}

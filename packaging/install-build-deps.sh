#!/usr/bin/env bash
# Installs, on Debian or Ubuntu, the tools that packaging/build.sh and tests/packaging.rs use:
# dpkg-deb and dpkg-shlibdeps, rpmbuild and rpm, lintian, rpmlint, systemd-analyze, jq,
# objcopy, man. Idempotent: does nothing (and needs no root) when all are present.
set -euo pipefail

# tool -> Debian package
tools=(
    dpkg-deb:dpkg
    dpkg-shlibdeps:dpkg-dev
    rpmbuild:rpm
    rpm:rpm
    lintian:lintian
    rpmlint:rpmlint
    systemd-analyze:systemd
    jq:jq
    objcopy:binutils
    man:man-db
    gzip:gzip
)

missing=()
for entry in "${tools[@]}"; do
    tool=${entry%%:*} pkg=${entry#*:}
    if ! command -v "$tool" >/dev/null 2>&1; then
        case " ${missing[*]} " in *" $pkg "*) ;; *) missing+=("$pkg") ;; esac
    fi
done
[ ${#missing[@]} -gt 0 ] || exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "install-build-deps.sh: missing ${missing[*]}; run as root to install them" >&2
    exit 1
fi
command -v apt-get >/dev/null 2>&1 || {
    echo "install-build-deps.sh: no apt-get; install ${missing[*]} by hand" >&2
    exit 1
}
echo "install-build-deps.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null

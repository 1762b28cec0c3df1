#!/usr/bin/env bash
# Builds the kr-tunneld packages (SPEC O-5) in one command:
#   <target>/packages/kr-tunneld_<version>-<release>_<arch>.deb    (dpkg-deb)
#   <target>/packages/kr-tunneld-<version>-<release>.<arch>.rpm    (rpmbuild)
# where <target> is $CARGO_TARGET_DIR or ./target.
#
# usage: packaging/build.sh [--binary PATH] [--release N] [--out DIR] [--env-file PATH]
#                           [--only deb|rpm]
#   --binary PATH    package this binary instead of running "cargo build --release --locked"
#   --release N      Debian revision and RPM release (default 1)
#   --out DIR        output directory (default <target>/packages)
#   --env-file PATH  environment file to ship (default packaging/kr-tunneld.env; for tests)
#   --only deb|rpm   build one of the two
#
# Tools: cargo, dpkg-deb, dpkg-shlibdeps (dpkg-dev), rpmbuild (Debian package "rpm"), jq, gzip.
# packaging/install-build-deps.sh installs them on Debian.
#
# Reproducible: every timestamp (file mtimes, archive headers, RPM build time) is
# SOURCE_DATE_EPOCH, by default the time of the last git commit; gzip runs with -n; the build
# host recorded in the RPM is fixed.
set -euo pipefail
umask 022

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
name=kr-tunneld
maintainer="kr-tunneld maintainers <kr-tunneld@example.invalid>"

binary='' release=1 out='' env_file=$top/packaging/kr-tunneld.env only=''
while [ $# -gt 0 ]; do
    case $1 in
    --binary) binary=$(realpath "$2"); shift 2 ;;
    --release) release=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --env-file) env_file=$(realpath "$2"); shift 2 ;;
    --only) only=$2; shift 2 ;;
    -h | --help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done
case $only in '' | deb | rpm) ;; *) echo "build.sh: --only takes deb or rpm" >&2; exit 2 ;; esac
case $release in *[!0-9]* | '') echo "build.sh: --release takes a number" >&2; exit 2 ;; esac

need() {
    for tool; do
        command -v "$tool" >/dev/null 2>&1 || {
            echo "build.sh: $tool not found; run packaging/install-build-deps.sh" >&2
            exit 1
        }
    done
}
need gzip jq cargo rustc
[ "$only" = rpm ] || need dpkg-deb dpkg-shlibdeps
[ "$only" = deb ] || need rpmbuild

target=${CARGO_TARGET_DIR:-$top/target}
out=${out:-$target/packages}
mkdir -p "$out"
out=$(realpath "$out")

# [package] comes first in Cargo.toml, so the first version line is the crate's.
version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -n 1)
[ -n "$version" ] || { echo "build.sh: no version in Cargo.toml" >&2; exit 1; }
debver=$version-$release

if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || stat -c %Y Cargo.toml)
fi
export SOURCE_DATE_EPOCH

if [ -z "$binary" ]; then
    cargo build --release --locked
    binary=$target/release/$name
fi
[ -x "$binary" ] || { echo "build.sh: $binary is not an executable" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# cargo's strip keeps .comment (compiler versions); drop it as dh_strip does.
cp "$binary" "$work/$name"
if command -v objcopy >/dev/null 2>&1; then
    objcopy --remove-section=.comment --remove-section=.note "$work/$name"
fi
binary=$work/$name

# Licences of the crates linked into the binary: DEP-5 copyright, RPM License: and Provides:.
packaging/gen-copyright.sh "$work/licenses"

# The man page with this version in its title line.
sed -E "1,/^\.TH /s/^(\.TH [^\"]*\"[^\"]*\") \"[^\"]*\"/\1 \"$name $version\"/" \
    packaging/kr-tunneld.8 >"$work/kr-tunneld.8"
gzip -9n <"$work/kr-tunneld.8" >"$work/kr-tunneld.8.gz"

# Files common to both packages, relative to the root; the environment file differs.
stage_common() {
    local root=$1
    install -D -m 0755 "$binary" "$root/usr/sbin/$name"
    install -D -m 0644 systemd/kr-tunneld.service "$root/usr/lib/systemd/system/$name.service"
    install -D -m 0644 packaging/modules-load.conf "$root/usr/lib/modules-load.d/$name.conf"
    # The DSR drop-in (capabilities for --enable-dsr): installed by the operator, see README.
    install -D -m 0644 systemd/dsr.conf "$root/usr/share/$name/dsr.conf"
    install -D -m 0644 "$work/kr-tunneld.8.gz" "$root/usr/share/man/man8/$name.8.gz"
    install -D -m 0644 README.md "$root/usr/share/doc/$name/README.md"
    install -m 0644 packaging/rbac.yaml packaging/kubeconfig.example "$root/usr/share/doc/$name/"
}

# Every mtime is SOURCE_DATE_EPOCH, so archives do not depend on when files were copied.
clamp_mtimes() {
    find "$1" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
}

build_deb() {
    local root=$work/deb arch deb
    arch=$(dpkg --print-architecture)
    deb=$out/${name}_${debver}_${arch}.deb
    stage_common "$root"
    install -D -m 0644 "$env_file" "$root/etc/default/$name"
    install -m 0644 "$work/licenses/copyright" "$root/usr/share/doc/$name/copyright"
    install -D -m 0644 packaging/debian/lintian-overrides "$root/usr/share/lintian/overrides/$name"

    # changelog.Debian: a rebuild with another revision gets its own entry on top.
    {
        if ! head -n 1 packaging/debian/changelog | grep -q "($debver)"; then
            printf '%s (%s) unstable; urgency=medium\n\n  * Rebuild.\n\n -- %s  %s\n\n' \
                "$name" "$debver" "$maintainer" "$(date -u -R -d "@$SOURCE_DATE_EPOCH")"
        fi
        cat packaging/debian/changelog
    } | gzip -9n >"$root/usr/share/doc/$name/changelog.Debian.gz"

    mkdir -p "$root/DEBIAN"
    install -m 0755 packaging/debian/postinst packaging/debian/prerm packaging/debian/postrm \
        "$root/DEBIAN/"
    echo "/etc/default/$name" >"$root/DEBIAN/conffiles"

    # Shared-library dependencies as dpkg-shlibdeps finds them (libc6, libgcc-s1); it wants
    # to run where debian/control exists.
    local shl=$work/shlibdeps depends
    mkdir -p "$shl/debian"
    printf 'Source: %s\n\nPackage: %s\nArchitecture: any\n' "$name" "$name" >"$shl/debian/control"
    depends=$(cd "$shl" && dpkg-shlibdeps -O "$root/usr/sbin/$name" 2>/dev/null |
        sed -n 's/^shlibs:Depends=//p')
    [ -n "$depends" ] || { echo "build.sh: dpkg-shlibdeps found no dependencies" >&2; exit 1; }

    # Installed-Size as dpkg-gencontrol counts it: KiB per file rounded up, 1 per other entry.
    local size
    size=$(cd "$root" && find . -path ./DEBIAN -prune -o ! -path . -printf '%y %s\n' |
        awk '{ n += ($1 == "f") ? int(($2 + 1023) / 1024) : 1 } END { print n }')

    sed -e "s/@VERSION@/$debver/" -e "s/@ARCH@/$arch/" -e "s/@MAINTAINER@/$maintainer/" \
        -e "s/@INSTALLED_SIZE@/$size/" -e "s/@DEPENDS@/$depends/" \
        packaging/debian/control >"$root/DEBIAN/control"

    # md5sums of every file but the conffiles (dpkg tracks those itself), sorted.
    (cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\n' |
        grep -v -x -F -f <(sed 's|^/||' DEBIAN/conffiles) | LC_ALL=C sort |
        xargs -d '\n' md5sum) >"$work/md5sums"
    install -m 0644 "$work/md5sums" "$root/DEBIAN/md5sums"

    clamp_mtimes "$root"
    dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
    echo "$deb"
}

build_rpm() {
    local root=$work/rpm arch rpm
    arch=$(uname -m)
    rpm=$out/$name-$version-$release.$arch.rpm
    stage_common "$root"
    install -D -m 0644 "$env_file" "$root/etc/sysconfig/$name"
    install -D -m 0644 LICENSE "$root/usr/share/licenses/$name/LICENSE"
    install -m 0644 "$work/licenses/copyright" "$root/usr/share/licenses/$name/LICENSE.dependencies"
    clamp_mtimes "$root"

    awk -F '\t' '{ printf "Provides: bundled(crate(%s)) = %s\n", $1, $2 }' \
        "$work/licenses/crates.tsv" >"$work/provides"

    rpmbuild -bb --quiet --target "$arch" \
        --define "_topdir $work/rpmbuild" \
        --define "_rpmdir $out" \
        --define "_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm" \
        --define "pkg_version $version" \
        --define "pkg_release $release" \
        --define "pkg_license $(cat "$work/licenses/license.rpm")" \
        --define "stagedir $root" \
        --define "bundled_provides $work/provides" \
        --define "_buildhost reproducible" \
        --define "source_date_epoch_from_changelog 0" \
        --define "use_source_date_epoch_as_buildtime 1" \
        --define "clamp_mtime_to_source_date_epoch 1" \
        --define "_binary_payload w19.zstdio" \
        packaging/rpm/kr-tunneld.spec
    echo "$rpm"
}

[ "$only" = rpm ] || build_deb
[ "$only" = deb ] || build_rpm

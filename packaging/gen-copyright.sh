#!/usr/bin/env bash
# Lists the Rust crates linked into the kr-tunneld binary and writes, into OUTDIR:
#   copyright     Debian copyright file (DEP-5) for kr-tunneld and every linked crate
#   crates.tsv    name, version, licence expression (SPDX), one crate per line
#   license.rpm   the RPM License: tag, every distinct expression joined with AND
#
# usage: packaging/gen-copyright.sh OUTDIR
#
# The crate set is "cargo tree" over normal dependencies for the host target, without
# proc-macros (they run at build time and are not linked). Copyright lines come from each
# crate's licence files, else from its authors; licence texts from packaging/licenses/, one
# file per SPDX identifier. An identifier without a text there is an error: a new dependency
# with a new licence must not slip into the package unnoticed.
set -euo pipefail

out=${1:?usage: gen-copyright.sh OUTDIR}
top=$(cd "$(dirname "$0")/.." && pwd)
lic_dir=$top/packaging/licenses
mkdir -p "$out"

host=$(rustc -vV | sed -n 's/^host: //p')
tree() {
    cargo tree --manifest-path "$top/Cargo.toml" --locked "$@" -e normal,no-proc-macro \
        --target "$host" --prefix none --format '{p}'
}
# Offline first (a release build has fetched everything); online if the cache is incomplete.
pkgs=$(tree --offline 2>/dev/null || tree)
meta=$(cargo metadata --manifest-path "$top/Cargo.toml" --locked --offline --format-version 1 2>/dev/null ||
    cargo metadata --manifest-path "$top/Cargo.toml" --locked --format-version 1)

# "name vX.Y.Z (path)" and "(*)" markers -> "name version", unique, without our own crate.
crates=$(printf '%s\n' "$pkgs" | awk '$1 != "kr-tunneld" { sub(/^v/, "", $2); print $1, $2 }' | sort -u)

: >"$out/crates.tsv"
paragraphs=$(mktemp)
trap 'rm -f "$paragraphs"' EXIT
declare -A ids=() exprs=()

while read -r name version; do
    [ -n "$name" ] || continue
    row=$(jq -r --arg n "$name" --arg v "$version" '
        .packages[] | select(.name == $n and .version == $v)
        | [.license // "", (.authors | map(sub(" *<[^>]*>"; "")) | join(", ")), .manifest_path]
        | join("\u001f")' <<<"$meta")
    # A unit separator, not a tab: read would merge the empty fields of whitespace separators.
    IFS=$'\x1f' read -r license authors manifest <<<"$row"
    if [ -z "$license" ]; then
        echo "gen-copyright: $name $version has no licence expression in Cargo.toml" >&2
        exit 1
    fi
    # Old cargo syntax "MIT/Apache-2.0" means "MIT OR Apache-2.0".
    # shellcheck disable=SC2001 # the spaces around "/" vary
    license=$(sed -e 's| */ *| OR |g' <<<"$license")
    printf '%s\t%s\t%s\n' "$name" "$version" "$license" >>"$out/crates.tsv"
    exprs[$license]=1
    for id in $(tr '()' '  ' <<<"$license"); do
        case $id in OR | AND | WITH | or | and) ;; *) ids[$id]=1 ;; esac
    done

    # Copyright lines from the crate's licence files, without the Apache template line.
    dir=$(dirname "$manifest")
    holders=$(find "$dir" -maxdepth 1 -type f \( -iname 'licen[cs]e*' -o -iname 'copying*' \
        -o -iname 'notice*' \) -print0 | sort -z | xargs -0 -r cat |
        sed -n -E 's@^[[:space:]/#*-]*Copyright[[:space:]]*(\([cC]\)|©)?[[:space:]]*@@p' |
        grep -v -e '\[yyyy\]' -e '{yyyy}' -e '^$' | sed -e 's/[[:space:]]*$//' | sort -u || true)
    if [ -z "$holders" ]; then
        holders=${authors:-the $name authors}
    fi
    dep5=$(sed -e 's/ OR / or /g' -e 's/ AND / and /g' <<<"$license")
    {
        printf '\nFiles: vendor/%s/*\n' "$name"
        printf 'Copyright: %s\n' "$(sed -e '2,$s/^/ /' <<<"$holders")"
        printf 'License: %s\n' "$dep5"
        printf 'Comment: crate %s %s\n' "$name" "$version"
    } >>"$paragraphs"
done <<<"$crates"

{
    cat <<'EOF'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: kr-tunneld
Comment: /usr/sbin/kr-tunneld is a Rust program that links the crates listed below
 statically. Their paragraphs name the crate's directory as "cargo vendor" would lay it
 out; packaging/gen-copyright.sh writes them from the crates' Cargo.toml and licence files.

Files: *
Copyright: 2026 The kr-tunneld authors
License: Apache-2.0
EOF
    cat "$paragraphs"
    for id in $(printf '%s\n' "${!ids[@]}" Apache-2.0 | sort -u); do
        printf '\nLicense: %s\n' "$id"
        if [ "$id" = Apache-2.0 ]; then
            printf ' On Debian systems, the complete text of the Apache License, Version 2.0\n'
            printf ' can be found in "/usr/share/common-licenses/Apache-2.0".\n'
        elif [ -f "$lic_dir/$id" ]; then
            sed -e 's/^$/./' -e 's/^/ /' "$lic_dir/$id"
        else
            echo "gen-copyright: no licence text for $id in packaging/licenses/" >&2
            exit 1
        fi
    done
} >"$out/copyright"

# RPM License: our own licence and every distinct expression, compound ones in parentheses.
{
    printf 'Apache-2.0'
    for e in $(printf '%s\n' "${!exprs[@]}" | sort -u | tr ' ' '~'); do
        e=${e//\~/ }
        case $e in Apache-2.0) continue ;; *' '*) e="($e)" ;; esac
        printf ' AND %s' "$e"
    done
    printf '\n'
} >"$out/license.rpm"

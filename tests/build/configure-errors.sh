#!/bin/sh
# SPDX-License-Identifier: GPL-2.0-or-later
#
# configure's failure modes: each is a clear message and a non-zero exit,
# and none leaves a half-made build behind.
#
# Usage: configure-errors.sh QDEDUP_SOURCE_DIR

set -u
src=$1
. "$src/tests/lib/tap.sh"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
out=$tmp/out
err=$tmp/err

# Start from no tarball in the environment (CI sets one); cases that test it
# set it themselves.
unset QDEDUP_QEMU_TARBALL

# run ARGS...: run configure on a scratch build and cache directory.
run() {
    rc=0
    "$src/configure" --build-dir="$tmp/build" --cache-dir="$tmp/cache" "$@" \
        >"$out" 2>"$err" || rc=$?
}

no_qemu_tree() {
    [ ! -e "$tmp/build/qemu" ] && [ ! -e "$tmp/build/qemu-build" ]
}

# --help lists every option the option parser accepts.
run --help
check "--help exits 0" [ "$rc" -eq 0 ]
missing=
for o in $(sed -n '/^for opt in/,/^done/p' "$src/configure" | grep -o -- '^ *--[a-z-]*' | sort -u); do
    grep -q -- "$o" "$out" || missing="$missing $o"
done
check "--help lists every option${missing:+ (missing:$missing)}" [ -z "$missing" ]

run --frobnicate
check "unknown option: exit status 2" [ "$rc" -eq 2 ]
check "unknown option: names the option" contains "$err" "unknown option '--frobnicate'"
check "unknown option: points at --help" contains "$err" "--help"

run --qemu-tarball="$tmp/nowhere.tar.xz"
check "missing --qemu-tarball file: non-zero exit" [ "$rc" -ne 0 ]
check "missing --qemu-tarball file: says so" contains "$err" "no such file: $tmp/nowhere.tar.xz"
check "missing --qemu-tarball file: no QEMU tree made" no_qemu_tree

echo "not QEMU" >"$tmp/qemu_10.0.13+ds.orig.tar.xz"
bad_sum=$(sha256sum "$tmp/qemu_10.0.13+ds.orig.tar.xz" | cut -d' ' -f1)
run --qemu-tarball="$tmp/qemu_10.0.13+ds.orig.tar.xz"
check "wrong checksum: non-zero exit" [ "$rc" -ne 0 ]
check "wrong checksum: says so" contains "$err" "wrong checksum"
check "wrong checksum: shows the expected sha256" \
    contains "$err" "6a0888e806c2ffc0c5f0733e974f9aea55491950d3c47c98669c8b236dde59ae"
check "wrong checksum: shows the actual sha256" contains "$err" "$bad_sum"
check "wrong checksum: no QEMU tree made" no_qemu_tree

QDEDUP_QEMU_TARBALL=$tmp/qemu_10.0.13+ds.orig.tar.xz run
check "wrong checksum through \$QDEDUP_QEMU_TARBALL: non-zero exit" [ "$rc" -ne 0 ]
check "wrong checksum through \$QDEDUP_QEMU_TARBALL: says so" contains "$err" "wrong checksum"

# A download that fails (here: apt-get itself fails) is an error that
# points at --qemu-tarball, never a fallback to some other source.
mkdir -p "$tmp/fakebin"
printf '#!/bin/sh\necho "E: simulated network failure" >&2\nexit 100\n' >"$tmp/fakebin/apt-get"
chmod +x "$tmp/fakebin/apt-get"
PATH=$tmp/fakebin:$PATH run
check "failed download: non-zero exit" [ "$rc" -ne 0 ]
check "failed download: says it could not fetch" contains "$err" "could not fetch the source package qemu=1:10.0.13+ds-0+deb13u1"
check "failed download: suggests --qemu-tarball" contains "$err" "--qemu-tarball=FILE"
check "failed download: nothing cached" [ ! -e "$tmp/cache/qemu_10.0.13+ds.orig.tar.xz" ]
check "failed download: no QEMU tree made" no_qemu_tree

# A corrupt cached tarball is reported, not silently replaced.
cp "$tmp/qemu_10.0.13+ds.orig.tar.xz" "$tmp/cache/"
run
check "corrupt cached tarball: non-zero exit" [ "$rc" -ne 0 ]
check "corrupt cached tarball: says so" contains "$err" "has a wrong checksum"

mkdir -p "$tmp/qemu-9"
echo 9.2.0 >"$tmp/qemu-9/VERSION"
run --qemu-src="$tmp/qemu-9"
check "--qemu-src of another version: non-zero exit" [ "$rc" -ne 0 ]
check "--qemu-src of another version: names both versions" contains "$err" "is QEMU '9.2.0', this overlay needs QEMU 10.0.13"

# An explicit --qemu-src overrides the environment's default tarball.
QDEDUP_QEMU_TARBALL=$tmp/qemu_10.0.13+ds.orig.tar.xz run --qemu-src="$tmp/qemu-9"
check "--qemu-src beats \$QDEDUP_QEMU_TARBALL" contains "$err" "is QEMU '9.2.0', this overlay needs QEMU 10.0.13"

run --qemu-src="$tmp/qemu-9" --qemu-tarball="$tmp/qemu_10.0.13+ds.orig.tar.xz"
check "--qemu-src with --qemu-tarball: non-zero exit" [ "$rc" -ne 0 ]
check "--qemu-src with --qemu-tarball: says they exclude each other" contains "$err" "exclude each other"

run --prefix=relative/path
check "relative --prefix: non-zero exit" [ "$rc" -ne 0 ]
check "relative --prefix: names the option" contains "$err" "--prefix must be an absolute path"

done_testing

#!/bin/sh
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Build the test guest from Debian packages: Debian's kernel (the package
# linux-image-amd64 points at, downloaded, not installed) and a busybox
# initramfs whose /init runs a workload chosen on the kernel command line,
# with memcheck (memcheck.c), the in-guest memory integrity checker.
#
# Usage: build-image.sh [--cache-dir=DIR] OUTDIR
#
# OUTDIR gets vmlinuz, initramfs.cpio.gz and manifest.  Nothing is redone
# when the image's own inputs (this script, init, workloads) are unchanged;
# remove OUTDIR to pick up a newer Debian kernel.  See docs/guest-image.md.

set -eu

here=$(cd "$(dirname "$0")" && pwd)
. "$here/../lib/apt-private.sh"

# Modules loaded at boot (with what they depend on), for the devices later
# tests give the guest.
modules="virtio_pci virtio_balloon virtio_mem virtio_blk"

cache_dir=${QDEDUP_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/qdedup}
case ${1:-} in
--cache-dir=?*) cache_dir=${1#*=}; shift ;;
esac
if [ $# -ne 1 ]; then
    echo "usage: $0 [--cache-dir=DIR] OUTDIR" >&2
    exit 2
fi
out=$1

die() {
    echo "build-image: error: $*" >&2
    exit 1
}

inputs=$(cat "$0" "$here/init" "$here/memcheck.c" "$here"/workloads/*.sh | sha256sum | cut -d' ' -f1)
if [ -f "$out/vmlinuz" ] && [ -f "$out/initramfs.cpio.gz" ] &&
    grep -qx "inputs $inputs" "$out/manifest" 2>/dev/null; then
    echo "build-image: $out is up to date ($(sed -n 's/^kernel //p' "$out/manifest"))"
    exit 0
fi

for tool in busybox cpio gzip dpkg-deb cc; do
    command -v $tool >/dev/null || die "$tool not found (Debian packages busybox-static, cpio, gzip, dpkg)"
done
busybox=$(command -v busybox)
file "$busybox" 2>/dev/null | grep -q 'dynamically linked' &&
    die "$busybox is dynamically linked; the initramfs needs busybox-static"

# The kernel package.
apt_dir=$cache_dir/apt-host
apt_private_host "$apt_dir"
apt_private_update "$apt_dir" 1440 >/dev/null || die "apt-get update failed"
kpkg=$(apt_private "$apt_dir" apt-cache depends linux-image-amd64 |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
[ -n "$kpkg" ] || die "cannot tell which kernel package linux-image-amd64 depends on"
kver=$(apt_private "$apt_dir" apt-cache show --no-all-versions "$kpkg" |
    awk '$1 == "Version:" { print $2; exit }')
debs=$cache_dir/debs
mkdir -p "$debs"
deb=$debs/${kpkg}_${kver}_amd64.deb
if [ ! -f "$deb" ]; then
    echo "build-image: downloading $kpkg $kver"
    (cd "$debs" && apt_private "$apt_dir" apt-get -q download "$kpkg=$kver") ||
        die "could not download $kpkg=$kver"
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
dpkg-deb --fsys-tarfile "$deb" |
    tar -x -C "$tmp" --wildcards './boot/vmlinuz-*' './lib/modules/*/kernel/drivers/virtio/*' \
        './lib/modules/*/kernel/drivers/block/virtio_blk.ko'
moddir=$(echo "$tmp"/lib/modules/*/kernel)

# The initramfs tree.
root=$tmp/root
mkdir -p "$root/bin" "$root/sbin" "$root/usr/bin" "$root/usr/sbin" \
    "$root/dev" "$root/proc" "$root/sys" "$root/tmp" "$root/run" \
    "$root/lib/modules" "$root/workloads"
cp "$busybox" "$root/bin/busybox"
cp "$here/init" "$root/init"
chmod 755 "$root/init" "$root/bin/busybox"
cp "$here"/workloads/*.sh "$root/workloads/"
# The integrity checker: static, so it needs nothing else in the image.
cc -static -O2 -Wall -o "$root/bin/memcheck" "$here/memcheck.c" ||
    die "cannot build memcheck statically (Debian package libc6-dev)"

# module_deps NAME: NAME's dependencies, from the module's .modinfo section.
module_deps() {
    ko=$(find "$moddir" -name "$1.ko")
    [ -n "$ko" ] || die "module $1 not found in $kpkg"
    tr '\0' '\n' <"$ko" | sed -n 's/^depends=//p' | tr ',' ' '
}
# load_order NAME...: NAMEs and their dependencies, dependencies first.
: >"$tmp/order"
add_module() {
    grep -qx "$1" "$tmp/order" && return 0
    for dep in $(module_deps "$1"); do
        add_module "$dep"
    done
    echo "$1" >>"$tmp/order"
    cp "$(find "$moddir" -name "$1.ko")" "$root/lib/modules/"
}
for m in $modules; do
    add_module "$m"
done
cp "$tmp/order" "$root/lib/modules/load-order"

mkdir -p "$out"
(cd "$root" && find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 --reproducible) |
    gzip -9n >"$out/initramfs.cpio.gz.new"
cp "$tmp"/boot/vmlinuz-* "$out/vmlinuz.new"
mv "$out/initramfs.cpio.gz.new" "$out/initramfs.cpio.gz"
mv "$out/vmlinuz.new" "$out/vmlinuz"
cat >"$out/manifest" <<EOM
inputs $inputs
kernel $kpkg $kver
busybox $(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null || echo unknown)
modules $(tr '\n' ' ' <"$tmp/order")
EOM
echo "build-image: $out: $kpkg $kver, initramfs $(du -k "$out/initramfs.cpio.gz" | cut -f1) KiB"

#!/bin/sh
# SPDX-License-Identifier: GPL-2.0-or-later
#
# 'make install DESTDIR=...' from the built tree: everything an operator needs
# lands under DESTDIR/PREFIX (docs/operations.md), the systemd unit names the
# installed broker, the deploy rules are where systemd looks for them, and
# the installed binaries run.
#
# Usage: install.sh QDEDUP_SOURCE_DIR BUILD_CONFIG_MAK

set -u
src=$1
. "$src/tests/lib/tap.sh"
prefix=$(sed -n 's/^PREFIX := //p' "$2")
dest=$(mktemp -d)
trap 'rm -rf "$dest"' EXIT

out=$(make -C "$src" --no-print-directory install DESTDIR="$dest" 2>&1)
check "make install DESTDIR=... succeeds" [ $? -eq 0 ]
[ -n "$out" ] && diag "$out" | tail -5
root=$dest$prefix
for f in bin/qemu-system-x86_64 sbin/qemu-dedup-broker bin/qemu-dedup-ctl \
         lib/systemd/system/qemu-dedup-broker.service \
         lib/systemd/system/qemu-dedup-broker.socket lib/tmpfiles.d/qemu-dedup.conf \
         lib/sysctl.d/60-qemu-dedup.conf share/doc/qdedup/operations.md \
         share/doc/qdedup/libvirt.md share/doc/qdedup/broker.conf.example; do
    check "installed: $prefix/$f" [ -f "$root/$f" ]
done
check "the unit runs the installed broker" \
    grep -qx "ExecStart=$prefix/sbin/qemu-dedup-broker" "$root/lib/systemd/system/qemu-dedup-broker.service"
check "the tmpfiles rule gives /dev/userfaultfd to group kvm" \
    grep -qx "z /dev/userfaultfd 0660 root kvm -" "$root/lib/tmpfiles.d/qemu-dedup.conf"
check "the sysctl drop-in raises vm.max_map_count" \
    grep -qx "vm.max_map_count = 1048576" "$root/lib/sysctl.d/60-qemu-dedup.conf"
check "the installed QEMU has memory-dedup" \
    sh -c "'$root/bin/qemu-system-x86_64' -object help | grep -qx '  memory-dedup'"
check "the installed broker and ctl run" \
    sh -c "'$root/sbin/qemu-dedup-broker' --version >/dev/null && '$root/bin/qemu-dedup-ctl' --help >/dev/null"
check "nothing outside DESTDIR$prefix" [ -z "$(find "$dest" -type f ! -path "$root/*" | head -1)" ]
echo "1..$tap_count"
[ "$tap_failures" -eq 0 ]

#!/bin/sh
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Our qemu-system-x86_64 (not a system one) boots the test guest under TCG
# to its ready marker and powers off cleanly; an unknown workload is
# reported by the guest and still ends in a clean power-off.
#
# Usage: boot.sh QEMU_BUILD_DIR GUEST_DIR QDEDUP_VERSION

set -u
qemu=$1/qemu-system-x86_64
guest=$2
version=$3
. "$(dirname "$0")/../lib/tap.sh"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

check "the binary under test is the build tree's ($qemu)" [ -x "$qemu" ]
"$qemu" -version >"$tmp/version" 2>&1
check "qemu -version reports QEMU 10.0.13 with the qdedup overlay" \
    contains "$tmp/version" "QEMU emulator version 10.0.13 (qdedup-$version)"
check "the guest image exists" test -f "$guest/vmlinuz" -a -f "$guest/initramfs.cpio.gz"

# boot WORKLOAD: boot the guest, serial console to $tmp/WORKLOAD.log; sets rc.
# The timeout only keeps a hung guest from hanging the suite.
boot() {
    rc=0
    timeout 600 "$qemu" -accel tcg -machine q35 -m 256 -smp 1 \
        -nodefaults -display none -no-reboot \
        -serial "file:$tmp/$1.log" \
        -kernel "$guest/vmlinuz" -initrd "$guest/initramfs.cpio.gz" \
        -append "console=ttyS0 panic=-1 qdedup.workload=$1" \
        >"$tmp/$1.out" 2>&1 || rc=$?
    [ -s "$tmp/$1.out" ] && diag "qemu said: $(cat "$tmp/$1.out")"
}

boot boot
check "boot: qemu exits with status 0 (guest power-off)" [ "$rc" -eq 0 ]
check "boot: a Debian kernel booted" contains "$tmp/boot.log" "Linux version 6."
check "boot: the ready marker" contains "$tmp/boot.log" "QDEDUP-READY workload=boot"
check "boot: the modules loaded" sh -c "! grep -q 'QDEDUP-WARNING' '$tmp/boot.log'"
check "boot: init powered off after the workload" contains "$tmp/boot.log" "QDEDUP-POWEROFF workload=boot"
# A panic (panic=-1 with -no-reboot) also ends QEMU with status 0: insist on
# the kernel's own power-off line.
check "boot: the kernel powered down (no panic, no reboot)" contains "$tmp/boot.log" "reboot: Power down"

boot no-such-workload
check "unknown workload: qemu exits with status 0" [ "$rc" -eq 0 ]
check "unknown workload: the kernel powered down" contains "$tmp/no-such-workload.log" "reboot: Power down"
check "unknown workload: the guest names it" \
    contains "$tmp/no-such-workload.log" "QDEDUP-ERROR unknown workload 'no-such-workload'"
check "unknown workload: no ready marker" \
    sh -c "! grep -q 'QDEDUP-READY' '$tmp/no-such-workload.log'"

done_testing

#!/bin/sh
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Make an uninstalled qemu-system-x86_64 find Debian's firmware.
#
# Usage: firmware-links.sh QEMU_BUILD_DIR
#
# Debian's +ds tarball has no firmware blobs; QEMU is configured with
# Debian's firmware path (/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu),
# but a binary run from its build directory looks up every data directory
# under QEMU_BUILD_DIR/qemu-bundle instead (util/cutils.c get_relocated_path),
# so point those at Debian's seabios, ipxe-qemu and qemu-system-data.

set -eu
bundle=$1/qemu-bundle
for dir in /usr/share/seabios /usr/lib/ipxe/qemu /usr/share/qemu; do
    [ -d "$dir" ] || { echo "firmware-links: $dir is missing (Debian packages seabios, ipxe-qemu, qemu-system-data)" >&2; exit 1; }
    link=$bundle$dir
    mkdir -p "$(dirname "$link")"
    if [ -d "$link" ] && [ ! -L "$link" ]; then
        # QEMU installs its own data here (prefix /usr): add the files it lacks.
        for f in "$dir"/*; do
            [ -e "$link/$(basename "$f")" ] || ln -s "$f" "$link/"
        done
    else
        ln -sfn "$dir" "$link"
    fi
done

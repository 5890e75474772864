#!/bin/sh
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Copy qdedup's overlay (our own files, laid out as in QEMU's tree) into an
# unpacked QEMU source tree, then apply the edits to QEMU's own files.
#
# Usage: overlay-sync.sh QDEDUP_SOURCE_DIR QEMU_SOURCE_DIR
#
# Only files whose content changed are copied, so ninja rebuilds only what
# depends on them.  Files dropped from the overlay since the last run are
# removed from the QEMU tree.  An overlay file never replaces one of QEMU's.

set -eu

if [ $# -ne 2 ] || [ ! -d "$1" ] || [ ! -d "$2" ]; then
    echo "usage: $0 QDEDUP_SOURCE_DIR QEMU_SOURCE_DIR" >&2
    exit 2
fi
src=$(cd "$1" && pwd)
qemu=$(cd "$2" && pwd)

# What the overlay is made of, relative to both trees.
overlay_paths="accel/dedup hw/dedup migration/dedup include/qdedup qapi/memory-dedup.json"

manifest=$qemu/.qdedup-overlay-files
new_manifest=$manifest.new
: >"$new_manifest"

copy() { # copy SRC_FILE DEST_RELATIVE_PATH
    dest=$qemu/$2
    if [ -e "$dest" ] && ! grep -qxF "$2" "$manifest" 2>/dev/null; then
        echo "overlay-sync: $2 would replace a file of QEMU's own" >&2
        rm -f "$new_manifest"
        exit 1
    fi
    echo "$2" >>"$new_manifest"
    if ! cmp -s "$1" "$dest"; then
        mkdir -p "$(dirname "$dest")"
        cp "$1" "$dest"
        echo "  COPY  $2"
    fi
}

for p in $overlay_paths; do
    [ -e "$src/$p" ] || continue
    (cd "$src" && find "$p" -type f ! -name '*~' ! -name '.*' | LC_ALL=C sort) |
    while read -r f; do
        copy "$src/$f" "$f"
    done
done
# The engine links the wire protocol (codec, hash, transport, client).
(cd "$src" && find protocol -maxdepth 1 -type f -name '*.[ch]' | LC_ALL=C sort) |
while read -r f; do
    copy "$src/$f" "accel/dedup/$f"
done
# The QEMU-side code reports the overlay's version.
copy "$src/VERSION" accel/dedup/VERSION

if [ -f "$manifest" ]; then
    grep -vxF -f "$new_manifest" "$manifest" | while read -r gone; do
        rm -f "$qemu/$gone"
        echo "  REMOVE  $gone"
    done
fi
mv "$new_manifest" "$manifest"

exec "$src/scripts/qemu-edits.sh" "$qemu"

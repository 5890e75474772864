#!/bin/sh
# SPDX-License-Identifier: GPL-2.0-or-later
#
# The only place where QEMU's own files are edited.  Everything else of
# qdedup is new files copied into the tree (scripts/overlay-sync.sh).
#
# Usage: qemu-edits.sh [--list] QEMU_SOURCE_DIR
#
# Each edit is anchored on one exact line of QEMU 10.0.13 that must occur
# exactly once; if one does not, the script fails naming the file and the
# anchor, and writes none of the files.  The first run keeps a pristine copy of
# each edited file as FILE.qdedup-orig and every run starts again from it, so
# running twice is harmless and a file is rewritten only when its result
# changes (which keeps ninja from rebuilding what did not change).
#
# docs/qemu-edits.md explains why each edit is needed; keep the two in step.

set -eu

list_only=false
if [ "${1:-}" = "--list" ]; then
    list_only=true
    shift
fi
if [ $# -ne 1 ] || [ ! -d "$1" ]; then
    echo "usage: $0 [--list] QEMU_SOURCE_DIR" >&2
    exit 2
fi
qemu=$1
work=
pending=
nedits=0

fail() {
    echo "qemu-edits: $*" >&2
    for w in $work $pending; do
        rm -f "${w%%|*}" "${w%%|*}.tmp"
    done
    exit 1
}

# begin FILE: start editing FILE from its pristine copy.
begin() {
    file=$1
    [ -f "$qemu/$file" ] || fail "$file: no such file in $qemu"
    $list_only && return 0
    [ -f "$qemu/$file.qdedup-orig" ] || cp -p "$qemu/$file" "$qemu/$file.qdedup-orig"
    # Written with the umask, as the unpacked tree was (mktemp would make it 0600).
    work=$qemu/$file.qdedup-new
    cat "$qemu/$file.qdedup-orig" >"$work"
}

# edit MODE ANCHOR TEXT: MODE is before, after or replace; ANCHOR is a whole
# line that must occur exactly once; TEXT may span several lines.
edit() {
    nedits=$((nedits + 1))
    if $list_only; then
        printf '%s\t%s\t%s\n' "$file" "$1" "$2"
        return 0
    fi
    case $1 in
    before|after|replace) ;;
    *) fail "$file: unknown edit mode '$1'" ;;
    esac
    rc=0
    QE_MODE=$1 QE_ANCHOR=$2 QE_TEXT=$3 awk '
        BEGIN { mode = ENVIRON["QE_MODE"]; anchor = ENVIRON["QE_ANCHOR"]
                text = ENVIRON["QE_TEXT"] }
        { lines[NR] = $0; if ($0 == anchor) { n++; at = NR } }
        END {
            if (n != 1) { exit (n == 0 ? 3 : 4) }
            for (i = 1; i <= NR; i++) {
                if (i != at) { print lines[i]; continue }
                if (mode == "before") print text
                if (mode != "replace") print lines[i]
                if (mode != "before") print text
            }
        }' "$work" >"$work.tmp" || rc=$?
    case $rc in
    0) cat "$work.tmp" >"$work"; rm -f "$work.tmp" ;;
    3) fail "$file: anchor line not found: '$2'" ;;
    4) fail "$file: anchor line occurs more than once: '$2'" ;;
    *) fail "$file: awk failed ($rc)" ;;
    esac
}

# append LAST TEXT: append TEXT at the end of the file, whose last non-blank
# line must be LAST (so a changed tail is noticed, not silently extended).
append() {
    nedits=$((nedits + 1))
    if $list_only; then
        printf '%s\tappend\t%s\n' "$file" "$1"
        return 0
    fi
    last=$(awk 'NF { l = $0 } END { print l }' "$work")
    [ "$last" = "$1" ] || fail "$file: expected last line '$1', found '$last'"
    printf '%s\n' "$2" >>"$work"
}

# end: queue the result; files are written only once every edit succeeded.
end() {
    $list_only && return 0
    pending="$pending $work|$file"
    work=
}

# install_all: write each result that differs from what is there.
install_all() {
    for w in $pending; do
        if cmp -s "${w%%|*}" "$qemu/${w#*|}"; then
            rm -f "${w%%|*}"
        else
            mv "${w%%|*}" "$qemu/${w#*|}"
        fi
    done
}

# 1. Build the overlay's QEMU-side code (accel/dedup/).
begin accel/meson.build
edit after "  subdir('kvm')" "  subdir('dedup')"
end

# 2. Generate trace events for accel/dedup/trace-events.
begin meson.build
edit after "    'accel/kvm'," "    'accel/dedup',"
end

# 3. Generate C code for qapi/memory-dedup.json.
begin qapi/meson.build
edit after "    'cryptodev'," "    'memory-dedup',"
end

# 4. Include our schema before qom.json so its types get their own module.
begin qapi/qapi-schema.json
edit before "{ 'include': 'qom.json' }" "{ 'include': 'memory-dedup.json' }"
end

# 5. Make -object memory-dedup / object-add accept our type and properties.
begin qapi/qom.json
edit after "{ 'include': 'crypto.json' }" "{ 'include': 'memory-dedup.json' }"
edit before "    'pef-guest'," "    { 'name': 'memory-dedup',
      'if': 'CONFIG_LINUX' },"
edit before "      'pr-manager-helper':          { 'type': 'PrManagerHelperProperties'," \
"      'memory-dedup':               { 'type': 'MemoryDedupProperties',
                                      'if': 'CONFIG_LINUX' },"
end

# 6. HMP 'info memory-dedup' (the handler is attached at run time).
begin hmp-commands-info.hx
append "ERST" "
    {
        .name       = \"memory-dedup\",
        .args_type  = \"\",
        .params     = \"\",
        .help       = \"show memory deduplication state and statistics\",
        .flags      = \"p\",
    },

SRST
  \`\`info memory-dedup\`\`
    Show the state and statistics of each memory-dedup object.
ERST"
end

# 7. Debian's +ds tarball leaves out the edk2 firmware blobs (as Debian's own
#    skip-unpack-edk2-blobs.patch does).
begin pc-bios/meson.build
edit replace "if unpack_edk2_blobs" "if unpack_edk2_blobs and false  # qdedup: the +ds tarball has no edk2 blobs"
end

# 8. Discards go through memory-dedup first, so that merged pages read zeros
#    afterwards (ARCHITECTURE I5): balloon, free page reporting, virtio-mem,
#    postcopy all end in ram_block_discard_range().
#    The file's edits are made below, with those of 10.

# 10. Guest RAM a device writes by DMA is announced to memory-dedup between
#     map and unmap, so that it never drops, merges or moves a page in
#     flight (ARCHITECTURE I8): dma_memory_map(), the virtqueue code and
#     cpu_physical_memory_map() all come through address_space_map().
begin system/physmem.c
edit after '#include "system/xen-mapcache.h"' '#include "accel/dedup/qemu-hooks.h"'
edit before "        errno = ENOTSUP; /* If we are missing MADVISE etc */" \
"        ret = memory_dedup_ram_discard(rb, start, length);
        if (ret) {
            goto err;
        }"
edit replace "    return qemu_ram_ptr_length(mr->ram_block, xlat, plen, true, is_write);" \
"    void *ptr = qemu_ram_ptr_length(mr->ram_block, xlat, plen, true, is_write);

    if (is_write) {
        memory_dedup_dma_map(ptr, *plen);
    }
    return ptr;"
edit before "    mr = memory_region_from_host(buffer, &addr1);" \
"    if (is_write) {
        memory_dedup_dma_unmap(buffer, len);
    }"
end

# 9. The background-snapshot capability is refused with an error that names
#    memory-dedup, instead of QEMU's "not compatible with guest memory
#    configuration".
begin migration/options.c
edit after '#include "system/kvm.h"' '#include "accel/dedup/qemu-hooks.h"'
edit before "        wt_support = migrate_query_write_tracking();" \
"        if (!memory_dedup_allow_write_tracking(errp)) {
            return false;
        }"
end

$list_only && exit 0
install_all
echo "qemu-edits: $nedits edits applied to $qemu"

#!/bin/sh
# SPDX-License-Identifier: GPL-2.0-or-later
#
# scripts/qemu-edits.sh and scripts/overlay-sync.sh against pristine copies of
# the QEMU files they touch: the edits apply, are idempotent, fail loudly
# and write nothing when an anchor is missing or ambiguous, and every edited
# file is documented.  An overlay file may never replace one of QEMU's.
#
# Usage: qemu-edits.sh QDEDUP_SOURCE_DIR QEMU_SOURCE_DIR

set -u
src=$1
qemu=$2
. "$src/tests/lib/tap.sh"
edits=$src/scripts/qemu-edits.sh

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

files=$("$edits" --list "$qemu" | cut -f1 | sort -u)
check "the edit list names files" [ -n "$files" ]

# pristine DIR: a tree with QEMU's own (unedited) versions of the edited files.
pristine() {
    for f in $files; do
        mkdir -p "$1/$(dirname "$f")"
        cp "$qemu/$f.qdedup-orig" "$1/$f" || return 1
    done
}

check "pristine copies of QEMU's files exist" pristine "$tmp/a"
apply_quietly() {
    "$edits" "$1" >/dev/null
}
check "edits apply to pristine QEMU $(cat "$qemu/VERSION")" apply_quietly "$tmp/a"
same=true
for f in $files; do
    cmp -s "$tmp/a/$f" "$qemu/$f" || { same=false; diag "$f differs from the build tree"; }
    cmp -s "$tmp/a/$f" "$tmp/a/$f.qdedup-orig" && { same=false; diag "$f was not edited"; }
done
check "every listed file is edited, as in the build tree" $same
modes=true
for f in $files; do
    [ "$(stat -c %a "$tmp/a/$f")" = "$(stat -c %a "$tmp/a/$f.qdedup-orig")" ] ||
        { modes=false; diag "$f: mode $(stat -c %a "$tmp/a/$f")"; }
done
check "edited files keep QEMU's file modes" $modes

# Idempotence: a second run rewrites nothing.
for f in $files; do touch -d '2000-01-01' "$tmp/a/$f"; done
"$edits" "$tmp/a" >/dev/null
untouched=true
for f in $files; do
    [ -n "$(find "$tmp/a/$f" -newermt '2000-01-02')" ] && { untouched=false; diag "$f rewritten"; }
done
check "a second run rewrites no file (no needless rebuild)" $untouched

# A missing anchor: loud failure naming file and anchor, nothing written.
pristine "$tmp/b"
grep -v "^  subdir('kvm')\$" "$tmp/b/accel/meson.build" >"$tmp/x" && mv "$tmp/x" "$tmp/b/accel/meson.build"
rc=0
"$edits" "$tmp/b" >"$tmp/out" 2>&1 || rc=$?
check "missing anchor: non-zero exit" [ "$rc" -ne 0 ]
check "missing anchor: names the file and the anchor" \
    contains "$tmp/out" "accel/meson.build: anchor line not found: '  subdir('kvm')'"
written=
for f in $files; do
    cmp -s "$tmp/b/$f" "$qemu/$f.qdedup-orig" || [ "$f" = accel/meson.build ] || written="$written $f"
done
check "missing anchor: no file written${written:+ (written:$written)}" [ -z "$written" ]
check "missing anchor: no temporary file left" [ -z "$(find "$tmp/b" -name '*.qdedup-new*')" ]

# An anchor that occurs twice is as bad as a missing one.
pristine "$tmp/c"
echo "    'cryptodev'," >>"$tmp/c/qapi/meson.build"
rc=0
"$edits" "$tmp/c" >"$tmp/out" 2>&1 || rc=$?
check "duplicated anchor: non-zero exit" [ "$rc" -ne 0 ]
check "duplicated anchor: says so" contains "$tmp/out" "qapi/meson.build: anchor line occurs more than once"

# A changed tail of an appended-to file is noticed.
pristine "$tmp/d"
echo "# something new" >>"$tmp/d/hmp-commands-info.hx"
rc=0
"$edits" "$tmp/d" >"$tmp/out" 2>&1 || rc=$?
check "changed tail of hmp-commands-info.hx: non-zero exit" [ "$rc" -ne 0 ]
check "changed tail of hmp-commands-info.hx: says so" contains "$tmp/out" "expected last line 'ERST'"

# Every edited file is explained in docs/qemu-edits.md.
undocumented=
for f in $files; do
    grep -qF "\`$f\`" "$src/docs/qemu-edits.md" || undocumented="$undocumented $f"
done
check "docs/qemu-edits.md explains every edited file${undocumented:+ (missing:$undocumented)}" \
    [ -z "$undocumented" ]

# overlay-sync refuses to overwrite a file of QEMU's own.
pristine "$tmp/e"
echo 10.0.13 >"$tmp/e/VERSION"
mkdir -p "$tmp/e/accel/dedup"
echo "QEMU's own file" >"$tmp/e/accel/dedup/memory-dedup.c"
rc=0
"$src/scripts/overlay-sync.sh" "$src" "$tmp/e" >"$tmp/out" 2>&1 || rc=$?
check "overlay over a QEMU file: non-zero exit" [ "$rc" -ne 0 ]
check "overlay over a QEMU file: names it" \
    contains "$tmp/out" "accel/dedup/memory-dedup.c would replace a file of QEMU's own"
check "overlay over a QEMU file: the file is kept" \
    contains "$tmp/e/accel/dedup/memory-dedup.c" "QEMU's own file"

# ... and a normal sync copies the overlay and removes what left it.
pristine "$tmp/f"
"$src/scripts/overlay-sync.sh" "$src" "$tmp/f" >/dev/null 2>&1
check "overlay-sync copies the overlay" cmp -s "$src/accel/dedup/memory-dedup.c" "$tmp/f/accel/dedup/memory-dedup.c"
"$src/scripts/overlay-sync.sh" "$src" "$tmp/f" >"$tmp/out" 2>&1
check "overlay-sync on an up-to-date tree copies nothing" sh -c "! grep -q COPY '$tmp/out'"
echo "accel/dedup/removed.c" >>"$tmp/f/.qdedup-overlay-files"
touch "$tmp/f/accel/dedup/removed.c"
"$src/scripts/overlay-sync.sh" "$src" "$tmp/f" >/dev/null 2>&1
check "overlay-sync removes a file dropped from the overlay" [ ! -e "$tmp/f/accel/dedup/removed.c" ]

done_testing

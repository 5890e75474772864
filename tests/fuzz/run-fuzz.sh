#!/bin/sh
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Short fuzz run for make check: seeds, then RUNS inputs from a fixed seed
# (a count, not a time, so it does the same work on any machine).  Prints
# TAP.  Usage: run-fuzz.sh FUZZER MAKE_SEEDS RUNS
set -u
fuzzer=$1
make_seeds=$2
runs=$3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/seeds" "$tmp/corpus"
"$make_seeds" "$tmp/seeds"
n=$(ls "$tmp/seeds" | wc -l)
if [ "$n" -ge 9 ]; then echo "ok 1 - $n seed messages"; else echo "not ok 1 - $n seed messages"; fi
if "$fuzzer" -seed=1 -runs="$runs" -max_len=140000 "$tmp/corpus" "$tmp/seeds" >"$tmp/log" 2>&1; then
    echo "ok 2 - $runs fuzz inputs: no crash, decode is the inverse of encode"
    grep -E '^#[0-9]+ +DONE' "$tmp/log" | sed 's/^/# /'
else
    echo "not ok 2 - the decoder fuzzer found a problem"
    tail -n 40 "$tmp/log" | sed 's/^/# /'
fi
echo "1..2"

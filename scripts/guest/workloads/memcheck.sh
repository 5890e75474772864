# SPDX-License-Identifier: GPL-2.0-or-later
# memcheck: fill memory with patterns (some identical in every guest), then
# verify all of it round after round while rewriting part of it; see
# memcheck.c for the output lines.  Parameters (kernel command line):
#   qdedup.shared=MiB qdedup.unique=MiB qdedup.zero=MiB qdedup.seed=N
#   qdedup.rounds=N (0: until powered off) qdedup.interval=S
#   qdedup.rewrite=PCT of shared pages per round
#   qdedup.spare=MiB identical in every guest, unmapped after round qdedup.free=N
#   qdedup.time=1 times the first write to each rewritten page (--time-writes)
ready
timing=
[ "$(param time 0)" = 1 ] && timing=--time-writes
/bin/memcheck --shared-mib "$(param shared 32)" --unique-mib "$(param unique 8)" \
    --zero-mib "$(param zero 16)" --seed "$(param seed 1)" \
    --rounds "$(param rounds 10)" --interval "$(param interval 2)" \
    --rewrite-pct "$(param rewrite 2)" \
    --spare-mib "$(param spare 0)" --free-round "$(param free 0)" $timing
echo "QDEDUP-MEMCHECK-EXIT status=$?"

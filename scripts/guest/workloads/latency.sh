# SPDX-License-Identifier: GPL-2.0-or-later
# latency: fill qdedup.shared=MiB with data identical in every guest (and
# qdedup.unique=MiB that differs per qdedup.seed=N); then every
# qdedup.interval=S seconds time the first write to qdedup.sample=N of the
# identical pages not written before (the copy-on-write of a merged page,
# once the host merged them) and print p50/p99 per sample (memcheck --latency).
ready
/bin/memcheck --latency --shared-mib "$(param shared 32)" --unique-mib "$(param unique 0)" \
    --zero-mib 0 --seed "$(param seed 1)" --interval "$(param interval 5)" \
    --sample "$(param sample 256)" --rounds "$(param rounds 0)"
echo "QDEDUP-MEMCHECK-EXIT status=$?"

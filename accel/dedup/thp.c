/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Splitting the transparent huge pages we punch holes into.
 *
 * QEMU asks for THP on guest RAM.  Dropping a zero page or mapping a pool
 * page over a 4 KiB piece of a PMD-mapped THP only splits the PMD: the
 * 2 MiB folio stays allocated, queued for a deferred split that runs under
 * memory pressure.  PSS falls at once, free memory does not.  MADV_COLD on
 * one page of the folio that is still ours makes the kernel split the folio
 * now (a large folio only partly in the range is split), and the split
 * frees the subpages nobody maps any more.  The price is that one page goes
 * to the inactive list.  Measured on Linux 6.18: 1 GiB of THP with every
 * other 4 KiB dropped freed nothing before the hint and 470 MiB after it.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <sys/mman.h>

#include "engine-internal.h"

#define CHUNK_PAGES ((2u << 20) / DEDUP_PAGE)

static bool changed_here(const Region *r, size_t p)
{
    return (r->kind[p] & 0x80) || (r->kind[p] & 0x7f) == PAGE_MERGED;
}

void thp_split_batch(DedupEngine *e, Region *r, const uint8_t *pm, size_t first, size_t n)
{
    size_t i = 0;

    while (i < n) {
        uintptr_t addr = (uintptr_t)(r->host + (first + i) * DEDUP_PAGE);
        size_t in_chunk = CHUNK_PAGES - (addr / DEDUP_PAGE) % CHUNK_PAGES;
        size_t end = MIN(n, i + in_chunk), keep = SIZE_MAX;
        bool holed = false;

        /* A page that was part of a THP before this batch and is no more. */
        for (size_t j = i; j < end; j++) {
            if (pm[j] & PM_HUGE) {
                if (changed_here(r, first + j)) {
                    holed = true;
                } else if (keep == SIZE_MAX && (r->kind[first + j] & 0x7f) == PAGE_ANON) {
                    keep = first + j;
                }
            }
        }
        if (holed && keep != SIZE_MAX &&
            madvise(r->host + keep * DEDUP_PAGE, DEDUP_PAGE, MADV_COLD) == 0) {
            e->st.thp_splits++;
        }
        i = end;
    }
}

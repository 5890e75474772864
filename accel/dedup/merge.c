/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Changing what guest pages map, race-free (ARCHITECTURE I3, I4):
 *
 *   protect (uffd-wp) -> check the content -> replace the mapping -> wake
 *
 * all under e->wp_lock.  A guest write that arrives after the protection
 * blocks until the wake and then lands on the new mapping (a private file
 * mapping: the kernel copies the pool page first, I1).  A write that came
 * before the protection is seen by the check.  Whatever fails, the section
 * ends with the range unprotected and woken, and a page we could not change
 * keeps its old mapping: when in doubt, do not merge.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include "engine-internal.h"

#define RUN_MAX 64u     /* pages protected at once */

int remap_flags(Region *r, void *addr, size_t len)
{
    int ret = 0;

    /* QEMU's MADV_DONTFORK keeps guest RAM out of forked children. */
    if (r->flags & DEDUP_REGION_DONTFORK) {
        ret |= madvise(addr, len, MADV_DONTFORK);
    }
    if (r->flags & DEDUP_REGION_DONTDUMP) {
        ret |= madvise(addr, len, MADV_DONTDUMP);
    }
    return ret;
}

/* Is a device writing some of [addr, addr+len)?  Asked under protection (dma.c). */
static bool dma_busy(DedupEngine *e, const void *addr, size_t len)
{
    return !e->cfg.ignore_dma && dedup_dma_busy(addr, len);
}

static bool page_is_zero(const uint8_t *p)
{
    static const uint8_t zero[DEDUP_PAGE];

    return memcmp(p, zero, DEDUP_PAGE) == 0;
}

/* Map slots [slot, slot+n) over pages [page, page+n) of r; wp_lock held. */
static bool map_run(DedupEngine *e, Region *r, size_t page, uint64_t slot, size_t n)
{
    uint8_t *addr = r->host + page * DEDUP_PAGE;
    void *m = mmap(addr, n * DEDUP_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED,
                   e->broker.pool_fd, slot * DEDUP_PAGE);

    if (m == MAP_FAILED) {
        return false;
    }
    /*
     * The new VMA is not registered yet: a write before the next line COWs
     * silently, which for private RAM only means the page is no longer
     * merged (seen by the next pass).
     */
    uffd_register_wp(e, addr, n * DEDUP_PAGE);
    remap_flags(r, addr, n * DEDUP_PAGE);
    return true;
}

/* Merge one run of consecutive pages of r (items[0..n)). */
static void merge_run(DedupEngine *e, MergeItem *it, size_t n, GArray *unref)
{
    Region *r = it[0].r;
    uint8_t *base = r->host + it[0].page * DEDUP_PAGE;
    size_t len = (it[n - 1].page - it[0].page + 1) * DEDUP_PAGE;
    bool same[RUN_MAX], dma[RUN_MAX], busy;

    g_mutex_lock(&e->wp_lock);
    if (uffd_protect(e, base, len, true) < 0) {
        g_mutex_unlock(&e->wp_lock);
        for (size_t i = 0; i < n; i++) {
            g_array_append_val(unref, it[i].slot);
        }
        return;
    }
    busy = dma_busy(e, base, len);
    for (size_t i = 0; i < n; i++) {
        const uint8_t *pool = broker_pool_page(e, it[i].slot);
        uint8_t *page = r->host + it[i].page * DEDUP_PAGE;

        dma[i] = busy && dma_busy(e, page, DEDUP_PAGE);
        same[i] = !dma[i] && pool && memcmp(page, pool, DEDUP_PAGE) == 0;
    }
    /* Runs of equal pages with consecutive slots: one mmap each. */
    for (size_t i = 0; i < n;) {
        size_t k = 1;

        if (!same[i]) {
            g_array_append_val(unref, it[i].slot);
            if (dma[i]) {
                e->st.dma_skipped++;
            } else {
                e->st.mismatches++;
            }
            i++;
            continue;
        }
        while (i + k < n && same[i + k] && it[i + k].page == it[i].page + k &&
               it[i + k].slot == it[i].slot + k) {
            k++;
        }
        if (map_run(e, r, it[i].page, it[i].slot, k)) {
            engine_trace(e, DEDUP_TRACE_MERGED, r, it[i].page, k);
            for (size_t j = i; j < i + k; j++) {
                size_t p = it[j].page;

                if ((r->kind[p] & 0x7f) == PAGE_MERGED || (r->kind[p] & 0x7f) == PAGE_COWED) {
                    /* The old slot is mapped no more: only now may it go (I2). */
                    uint64_t old = r->slot[p];

                    g_array_append_val(unref, old);
                }
                region_set_page(r, p, PAGE_MERGED, it[j].slot);
                e->st.merges++;
            }
        } else {
            for (size_t j = i; j < i + k; j++) {
                g_array_append_val(unref, it[j].slot);
            }
        }
        i += k;
    }
    uffd_protect(e, base, len, false);
    uffd_wake(e, base, len);
    g_mutex_unlock(&e->wp_lock);
}

void merge_pages(DedupEngine *e, MergeItem *items, size_t n)
{
    g_autoptr(GArray) unref = g_array_new(FALSE, FALSE, sizeof(uint64_t));

    for (size_t i = 0; i < n;) {
        size_t k = 1;

        /* Protect spans of nearby pages together; RUN_MAX bounds the stall. */
        while (i + k < n && items[i + k].r == items[i].r &&
               items[i + k].page - items[i].page < RUN_MAX && k < RUN_MAX) {
            k++;
        }
        merge_run(e, items + i, k, unref);
        i += k;
    }
    broker_unref(e, (uint64_t *)unref->data, unref->len);
}

static int self_pidfd(void)
{
    static int fd = -2;

    if (fd == -2) {
        fd = syscall(SYS_pidfd_open, getpid(), 0);
    }
    return fd;
}

/* MADV_DONTNEED every iov at once where the kernel allows it (6.13+). */
static void dontneed(struct iovec *iov, size_t n)
{
    static bool batched = true;
    int pidfd = self_pidfd();

    if (batched && pidfd >= 0 &&
        syscall(SYS_process_madvise, pidfd, iov, n, MADV_DONTNEED, 0) == (ssize_t)
        (n * DEDUP_PAGE)) {
        return;
    }
    batched = false;
    for (size_t i = 0; i < n; i++) {
        madvise(iov[i].iov_base, iov[i].iov_len, MADV_DONTNEED);
    }
}

void drop_zero_pages(DedupEngine *e, Region *r, const size_t *pages, size_t n)
{
    if (r->flags & DEDUP_REGION_FILE) {
        return;     /* the file would show through (I9); classify() merges them */
    }
    for (size_t i = 0; i < n;) {
        struct iovec iov[RUN_MAX];
        uint8_t *base = r->host + pages[i] * DEDUP_PAGE;
        size_t k = 1, nz = 0, len;

        while (i + k < n && pages[i + k] - pages[i] < RUN_MAX) {
            k++;
        }
        len = (pages[i + k - 1] - pages[i] + 1) * DEDUP_PAGE;
        g_mutex_lock(&e->wp_lock);
        if (uffd_protect(e, base, len, true) == 0) {
            /* Under protection (dma.c): zero pages are often a read in flight. */
            bool busy = dma_busy(e, base, len);

            for (size_t j = i; j < i + k; j++) {
                uint8_t *p = r->host + pages[j] * DEDUP_PAGE;

                if (busy && dma_busy(e, p, DEDUP_PAGE)) {
                    e->st.dma_skipped++;
                } else if (page_is_zero(p)) {
                    iov[nz++] = (struct iovec) { p, DEDUP_PAGE };
                    r->kind[pages[j]] |= 0x80;
                }
            }
            if (nz) {
                dontneed(iov, nz);
            }
            e->st.zero_dropped += nz;
            engine_trace(e, DEDUP_TRACE_ZERO, r, pages[i], nz);
            uffd_protect(e, base, len, false);
            uffd_wake(e, base, len);
        }
        g_mutex_unlock(&e->wp_lock);
        i += k;
    }
}

bool move_to_anon(DedupEngine *e, Region *r, size_t page, size_t n)
{
    uint8_t *addr = r->host + page * DEDUP_PAGE;
    size_t len = n * DEDUP_PAGE;
    uint8_t *staging = mmap(NULL, len, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    bool ok = false;

    if (staging == MAP_FAILED) {
        return false;
    }
    g_mutex_lock(&e->wp_lock);
    if (uffd_protect(e, addr, len, true) == 0) {
        if (dma_busy(e, addr, len)) {
            /* A device writes there: the copy would miss its data (I8). */
            e->st.dma_skipped += n;
            goto unprotect;
        }
        memcpy(staging, addr, len);
        /*
         * Atomic: readers see the old pages or the copy, never a hole (a
         * fresh mapping filled afterwards would read as zeros meanwhile).
         */
        ok = mremap(staging, len, len, MREMAP_FIXED | MREMAP_MAYMOVE, addr) == addr;
        if (ok) {
            uffd_register_wp(e, addr, len);
            remap_flags(r, addr, len);
        }
unprotect:
        uffd_protect(e, addr, len, false);
        uffd_wake(e, addr, len);
    }
    g_mutex_unlock(&e->wp_lock);
    if (!ok) {
        munmap(staging, len);
    }
    return ok;
}

bool restore_page(DedupEngine *e, Region *r, size_t page, bool release)
{
    uint64_t old = r->slot[page];

    if (!move_to_anon(e, r, page, 1)) {
        return false;
    }
    region_set_page(r, page, PAGE_MOVED, DEDUP_NO_SLOT);
    engine_trace(e, DEDUP_TRACE_RESTORED, r, page, old);
    if (release) {
        broker_unref(e, &old, 1);
    }
    e->st.restored++;
    return true;
}

void mark_moved_run(Region *r, size_t s, size_t n, GArray *unref)
{
    for (size_t i = s; i < s + n; i++) {
        uint64_t slot = r->slot[i];

        g_array_append_val(unref, slot);
        region_set_page(r, i, i == s ? PAGE_MOVED : PAGE_MOVED_CONT, DEDUP_NO_SLOT);
    }
}

void restore_cowed(DedupEngine *e, Region *r, size_t p, size_t limit,
                   uint64_t *refs, uint64_t *merged)
{
    g_autoptr(GArray) unref = g_array_new(FALSE, FALSE, sizeof(uint64_t));
    size_t s = p, end = p + 1, cowed = 0;

    /* p's run: neighbours that map consecutive slots (one VMA). */
    while (s > 0 && p - s < MOVE_RUN_MAX / 2 && pool_mapped(r, s - 1) &&
           r->slot[s - 1] + 1 == r->slot[s]) {
        s--;
    }
    while (end < r->npages && end - s < MOVE_RUN_MAX && pool_mapped(r, end) &&
           r->slot[end] == r->slot[end - 1] + 1) {
        end++;
    }
    for (size_t i = s; i < end; i++) {
        cowed += (r->kind[i] & 0x7f) == PAGE_COWED;
    }
    /*
     * Page by page, each move would split the run into a VMA per page (a
     * moved page never merges back, I7); after a loadvm or a reboot
     * rewrote the guest's memory that soon exhausts the VMA budget.  So
     * when most of the run is COWed, it moves in one piece, taking its
     * few still-merged pages along (they may merge again later).
     */
    if (end - s < 2 || cowed * 2 < end - s) {
        /*
         * Alone, a move costs up to two VMAs for good.  Past half the
         * budget the page keeps its slot instead (its VMA still maps the
         * slot, I2): merging needs the rest of the budget, and the run
         * moves back in one piece once most of it is COWed.
         */
        if (engine_vmas(e) + 2 <= e->cfg.max_vmas / 2 && restore_page(e, r, p, true)) {
            *refs += p < limit;
        }
        return;
    }
    if (!move_to_anon(e, r, s, end - s)) {
        return;
    }
    for (size_t i = s; i < MIN(end, limit); i++) {
        *refs += 1;
        *merged += (r->kind[i] & 0x7f) == PAGE_MERGED;
    }
    mark_moved_run(r, s, end - s, unref);
    engine_trace(e, DEDUP_TRACE_RESTORED, r, s, end - s);
    broker_unref(e, (uint64_t *)unref->data, unref->len);
    e->st.restored += end - s;
}

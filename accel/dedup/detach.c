/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Giving guest pages back: what the rest of QEMU needs from the engine.
 *
 * - discard (ARCHITECTURE I5): QEMU's ram_block_discard_range() expects a
 *   discarded page to read zeros afterwards, but MADV_DONTNEED on a page
 *   that maps a pool slot brings the slot's content back.  So merged pages
 *   in a discarded range get fresh anonymous memory first.  No write
 *   protection is needed: a guest that writes to RAM it gave away may lose
 *   the write without dedup too.
 * - unmerge (object-del, or unmerge=on): merged pages are copied to
 *   anonymous memory and moved into place atomically (merge.c
 *   move_to_anon), after which their references may go (I2).
 * - reset: the per-page back-off hints describe the old boot.
 *
 * All of it runs under e->lock, so never in the middle of a merge.  The
 * callers are QEMU threads that may hold the BQL; the engine's threads
 * never wait for the BQL, so this cannot deadlock (I6).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <string.h>
#include <sys/mman.h>

#include "engine-internal.h"

/* Forget what the scanner learnt about page p: its content is gone. */
static void forget_page(Region *r, size_t p)
{
    r->hash[p] = 0;
    r->misses[p] = 0;
    r->cooldown[p] = 0;
}

/* Fresh anonymous memory over pages [p, p+n) of r; e->lock held. */
static int map_anon_run(DedupEngine *e, Region *r, size_t p, size_t n, GArray *unref)
{
    uint8_t *addr = r->host + p * DEDUP_PAGE;
    size_t len = n * DEDUP_PAGE;

    g_mutex_lock(&e->wp_lock);
    if (mmap(addr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
             -1, 0) == MAP_FAILED) {
        int ret = -errno;

        g_mutex_unlock(&e->wp_lock);
        return ret;
    }
    /* Registered and advised like its neighbours, so the VMAs merge again. */
    uffd_register_wp(e, addr, len);
    remap_flags(r, addr, len);
    if (r->flags & DEDUP_REGION_HUGEPAGE) {
        madvise(addr, len, MADV_HUGEPAGE);
    }
    g_mutex_unlock(&e->wp_lock);
    for (size_t i = p; i < p + n; i++) {
        uint64_t slot = r->slot[i];

        g_array_append_val(unref, slot);
        region_set_page(r, i, PAGE_ANON, DEDUP_NO_SLOT);
        forget_page(r, i);
    }
    e->st.discarded += n;
    return 0;
}

int dedup_engine_discard(DedupEngine *e, void *host, size_t len)
{
    g_autoptr(GArray) unref = g_array_new(FALSE, FALSE, sizeof(uint64_t));
    uintptr_t lo = (uintptr_t)host, hi = lo + len;
    int ret = 0;

    g_mutex_lock(&e->lock);
    for (guint i = 0; i < e->regions->len && !ret; i++) {
        Region *r = g_ptr_array_index(e->regions, i);
        uintptr_t rlo = (uintptr_t)r->host, rhi = rlo + r->npages * DEDUP_PAGE;
        size_t first, end;

        if (hi <= rlo || lo >= rhi) {
            continue;
        }
        first = (MAX(lo, rlo) - rlo) / DEDUP_PAGE;
        end = (MIN(hi, rhi) - rlo + DEDUP_PAGE - 1) / DEDUP_PAGE;
        for (size_t p = first; p < end && !ret;) {
            size_t n = 0;

            if (!pool_mapped(r, p)) {
                /* Anonymous memory reads zeros after QEMU's own discard. */
                forget_page(r, p);
                p++;
                continue;
            }
            while (p + n < end && pool_mapped(r, p + n)) {
                n++;
            }
            ret = map_anon_run(e, r, p, n, unref);
            p += n;
        }
    }
    broker_unref(e, (uint64_t *)unref->data, unref->len);
    e->st.vmas_used = engine_vmas(e);
    engine_unlock(e);
    return ret;
}

/* Unmerge up to max pages, e->lock held; the pool-mapped pages left. */
uint64_t unmerge_locked(DedupEngine *e, uint64_t max)
{
    g_autoptr(GArray) unref = g_array_new(FALSE, FALSE, sizeof(uint64_t));
    uint64_t left = 0, merged = 0, done = 0;

    for (guint i = 0; i < e->regions->len; i++) {
        Region *r = g_ptr_array_index(e->regions, i);

        for (size_t p = 0; p < r->npages;) {
            size_t n = 0;

            if (!pool_mapped(r, p)) {
                p++;
                continue;
            }
            /* One copy and one mremap per run: a VMA each, as while merged. */
            while (p + n < r->npages && pool_mapped(r, p + n) && n < MOVE_RUN_MAX) {
                n++;
            }
            if (done < max && move_to_anon(e, r, p, n)) {
                mark_moved_run(r, p, n, unref);
                e->st.unmerged += n;
                done += n;
            } else {
                for (size_t j = p; j < p + n; j++) {
                    merged += (r->kind[j] & 0x7f) == PAGE_MERGED;
                }
                left += n;
            }
            p += n;
        }
    }
    broker_unref(e, (uint64_t *)unref->data, unref->len);
    e->st.vmas_used = engine_vmas(e);
    e->st.merged_pages = merged;
    e->st.pool_refs = left;
    return left;
}

uint64_t dedup_engine_unmerge(DedupEngine *e, uint64_t max_pages)
{
    uint64_t left;

    g_mutex_lock(&e->lock);
    left = unmerge_locked(e, max_pages);
    engine_unlock(e);
    return left;
}

void dedup_engine_reset_hints(DedupEngine *e)
{
    g_mutex_lock(&e->lock);
    for (guint i = 0; i < e->regions->len; i++) {
        Region *r = g_ptr_array_index(e->regions, i);

        memset(r->cooldown, 0, r->npages);
        memset(r->misses, 0, r->npages);
    }
    e->st.resets++;
    engine_unlock(e);
}

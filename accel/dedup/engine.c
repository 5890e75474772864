/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The engine: regions, the scanner's passes, settings and stats.
 *
 * A pass walks every region in batches.  Per page it keeps the low 32 bits
 * of the last hash, what the page maps (engine-internal.h PAGE_*), the slot
 * it holds a reference to, a cooldown and a count of lookups without a
 * match: 11 bytes a page, 0.27% of RAM.
 *
 * - absent pages are never read (reading would populate them);
 * - a zero page of anonymous RAM is dropped at once (merge.c, I4);
 * - any other page is a candidate once its hash is the same two passes
 *   running, as in KSM's unstable tree: pages in flux are not worth a
 *   broker round trip nor a VMA;
 * - a merged page that pagemap shows as anonymous was written by the guest
 *   (kernel COW, I1): it keeps its reference while its VMA still maps the
 *   slot (I2), may merge again with other content, and otherwise is moved
 *   back to anonymous memory, which releases the slot.
 *
 * Locks: e->lock guards the regions and their arrays (scanner, and the
 * caller adding or removing regions); e->wp_lock the protect..wake sections
 * (merge.c, uffd.c).  The scanner never takes the BQL (it knows no QEMU).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <time.h>
#include <sys/socket.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "engine-internal.h"

/*
 * Passes a written page waits before it is hashed again: about 4 s at the
 * shortest pass interval, fewer passes as the interval backs off (scanner()).
 */
#define COW_COOLDOWN_PASSES 8
#define MISS_BACKOFF_MAX 4         /* up to 2^4 passes between lookups of a page */

void engine_notify(DedupEngine *e, DedupEvent ev)
{
    if (e->cfg.notify) {
        e->cfg.notify(e->cfg.opaque, ev);
    }
}

DedupEngine *dedup_engine_new(const DedupConfig *cfg, char **errmsg)
{
    DedupEngine *e = g_new0(DedupEngine, 1);

    e->cfg = *cfg;
    e->broker_path = g_strdup(cfg->broker ? cfg->broker : QD_DEFAULT_SOCKET);
    e->domain = g_strdup(cfg->domain ? cfg->domain : "");
    e->secret = g_strdup(cfg->secret);
    e->name = g_strdup(cfg->name ? cfg->name : "");
    e->cfg.broker = e->cfg.domain = e->cfg.secret = e->cfg.name = NULL;
    e->cfg.cpu_limit = CLAMP(cfg->cpu_limit, 1, 100);
    e->enabled = true;
    e->regions = g_ptr_array_new();
    e->broker.pool_fd = -1;
    e->broker.unref_due = g_hash_table_new(g_direct_hash, g_direct_equal);
    e->broker.io_fd = -1;
    e->unmap_wait = g_array_new(FALSE, FALSE, sizeof(DetachedRun));
    e->broker.unref_uncertain = g_array_new(FALSE, FALSE, sizeof(uint64_t));
    e->pagemap_fd = -1;
    e->uffd = -1;
    e->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    g_mutex_init(&e->lock);
    g_mutex_init(&e->wp_lock);
    g_mutex_init(&e->ctl_lock);
    g_mutex_init(&e->stats_lock);
    g_cond_init(&e->ctl_cond);
    if (uffd_setup(e, errmsg) < 0) {
        dedup_engine_free(e);
        return NULL;
    }
    if (pagemap_open(e) < 0) {
        *errmsg = g_strdup_printf("cannot open /proc/self/pagemap: %s", g_strerror(errno));
        dedup_engine_free(e);
        return NULL;
    }
    return e;
}

void dedup_engine_stop(DedupEngine *e)
{
    uint64_t one = 1;

    g_mutex_lock(&e->ctl_lock);
    e->stopping = true;
    if (e->broker.io_fd >= 0) {
        /* Waiting for the broker: the reply will not come, nobody waits for it. */
        shutdown(e->broker.io_fd, SHUT_RDWR);
    }
    g_cond_broadcast(&e->ctl_cond);
    g_mutex_unlock(&e->ctl_lock);
    if (write(e->stop_fd, &one, sizeof(one)) < 0) {
        /* The counter cannot overflow from one write. */
    }
}

static void region_free(Region *r)
{
    g_free(r->name);
    g_free(r->kind);
    g_free(r->cooldown);
    g_free(r->misses);
    g_free(r->slot);
    g_free(r->hash);
    g_free(r);
}

void dedup_engine_free(DedupEngine *e)
{
    bool pool_in_use = false;

    if (!e) {
        return;
    }
    broker_hand_over_unrefs(e);
    broker_close(e);
    for (guint i = 0; i < e->regions->len; i++) {
        Region *r = g_ptr_array_index(e->regions, i);

        for (size_t p = 0; p < r->npages && !pool_in_use; p++) {
            pool_in_use = pool_mapped(r, p);
        }
        region_free(r);
    }
    if (!pool_in_use) {
        /* Nothing maps the pool any more (all unmerged): let it go. */
        broker_release_pool(e);
    }
    qd_slot_uses_destroy(&e->broker.uses);
    for (guint i = 0; i < e->unmap_wait->len; i++) {
        /* Still mapped, or QEMU exits: the broker keeps them until then (I2). */
        g_array_free(g_array_index(e->unmap_wait, DetachedRun, i).slots, TRUE);
    }
    g_array_free(e->unmap_wait, TRUE);
    g_hash_table_destroy(e->broker.unref_due);
    g_array_free(e->broker.unref_uncertain, TRUE);
    g_ptr_array_free(e->regions, TRUE);
    if (e->uffd >= 0) {
        /* Closing unregisters every range and wakes any blocked writer. */
        close(e->uffd);
    }
    if (e->pagemap_fd >= 0) {
        close(e->pagemap_fd);
    }
    if (e->stop_fd >= 0) {
        close(e->stop_fd);
    }
    g_mutex_clear(&e->lock);
    g_mutex_clear(&e->wp_lock);
    g_mutex_clear(&e->ctl_lock);
    g_mutex_clear(&e->stats_lock);
    g_cond_clear(&e->ctl_cond);
    g_free(e->broker_path);
    g_free(e->domain);
    g_free(e->secret);
    g_free(e->name);
    g_free(e);
}

int dedup_engine_add_region(DedupEngine *e, const char *name, void *host,
                            size_t len, unsigned flags, char **errmsg)
{
    Region *r;
    int ret;

    if ((uintptr_t)host % DEDUP_PAGE || len % DEDUP_PAGE || !len) {
        *errmsg = g_strdup_printf("RAM '%s' is not page aligned", name);
        return -EINVAL;
    }
    ret = uffd_register_wp(e, host, len);
    if (ret < 0) {
        *errmsg = g_strdup_printf("cannot write-protect RAM '%s' with userfaultfd: %s "
                                  "(another userfaultfd owns it, or it is not private "
                                  "RAM)", name, g_strerror(-ret));
        return ret;
    }
    r = g_new0(Region, 1);
    r->name = g_strdup(name);
    r->host = host;
    r->npages = len / DEDUP_PAGE;
    r->flags = flags;
    r->kind = g_new0(uint8_t, r->npages);
    r->cooldown = g_new0(uint8_t, r->npages);
    r->misses = g_new0(uint8_t, r->npages);
    r->slot = g_new(uint32_t, r->npages);
    memset(r->slot, 0xff, r->npages * sizeof(uint32_t));
    r->hash = g_new0(uint32_t, r->npages);
    g_mutex_lock(&e->lock);
    r->id = ++e->next_region_id;
    g_ptr_array_add(e->regions, r);
    e->st.covered_bytes += len;
    engine_unlock(e);
    return 0;
}

void dedup_engine_remove_region(DedupEngine *e, void *host)
{
    g_autoptr(GArray) slots = g_array_new(FALSE, FALSE, sizeof(uint64_t));
    size_t len = 0;

    g_mutex_lock(&e->lock);
    for (guint i = 0; i < e->regions->len; i++) {
        Region *r = g_ptr_array_index(e->regions, i);

        if (r->host != host) {
            continue;
        }
        /*
         * The caller unmaps the RAM next: once no VMA maps our slots, the
         * references may go (I2).  Until then the mappings stay correct.
         */
        for (size_t p = 0; p < r->npages; p++) {
            uint8_t k = r->kind[p] & 0x7f;

            if (k == PAGE_MERGED || k == PAGE_COWED) {
                uint64_t s = r->slot[p];

                g_array_append_val(slots, s);
            }
        }
        len = r->npages * DEDUP_PAGE;
        e->st.covered_bytes -= len;
        g_ptr_array_remove_index(e->regions, i);
        region_free(r);
        break;
    }
    /*
     * The caller unmaps the RAM later (after an RCU grace period, or
     * never, for RAM QEMU keeps): the references go only once no mapping
     * of the pool is left in the range (engine_release_unmapped), so the
     * broker cannot punch a slot our pages still map (I2).
     */
    if (slots->len) {
        DetachedRun run = { (uintptr_t)host, (uintptr_t)host + len,
                            g_steal_pointer(&slots) };

        g_array_append_val(e->unmap_wait, run);
    }
    engine_unlock(e);
}

/* Does this process still map the pool inside [lo, hi)? (/proc/self/maps) */
static bool pool_mapped_in(const Broker *b, uintptr_t lo, uintptr_t hi)
{
    g_autofree char *text = NULL;
    bool mapped = false;

    if (!g_file_get_contents("/proc/self/maps", &text, NULL, NULL)) {
        return true;    /* cannot tell: keep the references */
    }
    for (char *line = text; line && *line && !mapped;) {
        char *next = strchr(line, '\n');
        unsigned long long start, end, ino;
        unsigned int major, minor;

        if (sscanf(line, "%llx-%llx %*s %*x %x:%x %llu", &start, &end, &major, &minor,
                   &ino) == 5) {
            mapped = ino == b->pool_ino && makedev(major, minor) == b->pool_dev &&
                     start < hi && lo < end;
        }
        line = next ? next + 1 : NULL;
    }
    return mapped;
}

void engine_release_unmapped(DedupEngine *e)
{
    g_mutex_lock(&e->lock);
    if (!e->unmap_wait->len) {
        g_mutex_unlock(&e->lock);
        return;
    }
    for (guint i = 0; i < e->unmap_wait->len;) {
        DetachedRun *run = &g_array_index(e->unmap_wait, DetachedRun, i);

        if (pool_mapped_in(&e->broker, run->lo, run->hi)) {
            i++;
            continue;
        }
        broker_unref(e, (uint64_t *)run->slots->data, run->slots->len);
        g_array_free(run->slots, TRUE);
        g_array_remove_index_fast(e->unmap_wait, i);
    }
    engine_unlock(e);
}

/*
 * VMA accounting (I7).  Our mappings split the region's VMA wherever the
 * mapping changes: between anonymous memory and the pool, between pool runs
 * whose slots are not consecutive, and around each page moved back from the
 * pool (its own VMA, which does not merge back on Linux 6.18).  A page
 * starts a new VMA depending only on itself and its left neighbour, so a
 * change to one page is accounted in O(1) instead of a walk of the region.
 * It is a model: two pool runs with consecutive slots that each already
 * hold COWed pages keep two anon_vmas and stay two VMAs.  The stress test
 * compares it with /proc/self/maps (a few in 8000 apart under heavy churn).
 */
static bool starts_vma(const Region *r, size_t p)
{
    int k, kprev;
    bool file, fprev;

    if (p == 0 || p >= r->npages) {
        return false;
    }
    k = r->kind[p] & 0x7f;
    kprev = r->kind[p - 1] & 0x7f;
    if (k == PAGE_MOVED || k == PAGE_MOVED_CONT) {
        /* region_set_page() keeps a MOVED_CONT page's left neighbour moved with it. */
        return k == PAGE_MOVED;
    }
    file = k == PAGE_MERGED || k == PAGE_COWED;
    fprev = kprev == PAGE_MERGED || kprev == PAGE_COWED;
    if (file != fprev || kprev == PAGE_MOVED || kprev == PAGE_MOVED_CONT) {
        return true;
    }
    return file && r->slot[p] != r->slot[p - 1] + 1;
}

void region_set_page(Region *r, size_t page, uint8_t kind, uint32_t slot)
{
    uint64_t before = starts_vma(r, page) + starts_vma(r, page + 1);

    r->kind[page] = kind;
    r->slot[page] = slot;
    if (page + 1 < r->npages && (r->kind[page + 1] & 0x7f) == PAGE_MOVED_CONT) {
        /* Its VMA began here; whatever this page maps now, it starts one. */
        r->kind[page + 1] = (r->kind[page + 1] & 0x80) | PAGE_MOVED;
    }
    r->vmas += starts_vma(r, page) + starts_vma(r, page + 1) - before;
}

uint64_t engine_vmas(DedupEngine *e)
{
    uint64_t n = 0;

    for (guint i = 0; i < e->regions->len; i++) {
        n += ((Region *)g_ptr_array_index(e->regions, i))->vmas;
    }
    return n;
}

typedef struct Batch {
    Region *r;
    size_t first, n;
    uint8_t pm[DEDUP_BATCH];
    size_t zero[DEDUP_BATCH];
    size_t nzero;
    QdLookupEntry lookup[DEDUP_BATCH];
    QdResult result[DEDUP_BATCH];
    size_t nlookup;
    size_t cowed[DEDUP_BATCH];      /* COWed pages that found no new match */
    size_t ncowed;
} Batch;

/* Counters of the pass in progress, published when it ends. */
typedef struct PassTotals {
    uint64_t zero_now, merged_now, refs_now;
    uint64_t changed;       /* pages whose content changed since the last pass */
} PassTotals;

static bool budget_left(DedupEngine *e, uint64_t extra)
{
    if (e->st.vmas_used + extra <= e->cfg.max_vmas) {
        return true;
    }
    if (!e->budget_reported) {
        e->budget_reported = true;
        e->st.vma_budget_reached = true;
        engine_notify(e, DEDUP_EVENT_VMA_BUDGET);
    }
    return false;
}

/* Classify the batch's pages; fills b->zero, b->lookup, counts what is now. */
static void classify(DedupEngine *e, Batch *b, PassTotals *t, bool merging)
{
    static const uint8_t zero[DEDUP_PAGE];
    static QdHash zero_hash;
    Region *r = b->r;

    if (!zero_hash.lo) {
        zero_hash = qd_hash_page(zero);
    }
    for (size_t i = 0; i < b->n; i++) {
        size_t p = b->first + i;
        uint8_t kind = r->kind[p] & 0x7f, f = b->pm[i];
        bool dropped = r->kind[p] & 0x80;
        QdHash h;

        if (kind == PAGE_MERGED) {
            if ((f & PM_PRESENT) && !(f & PM_FILE)) {
                region_set_page(r, p, PAGE_COWED, r->slot[p]);
                r->cooldown[p] = MAX(1, COW_COOLDOWN_PASSES >> e->idle_passes);
                engine_trace(e, DEDUP_TRACE_COW, r, p, r->slot[p]);
                r->hash[p] = 0;
                e->st.cow_events++;
                t->refs_now++;
            } else {
                t->merged_now++;
                t->refs_now++;
            }
            continue;
        }
        if (kind == PAGE_COWED) {
            t->refs_now++;
        }
        if (!(f & PM_PRESENT) || (f & PM_ZERO)) {
            t->zero_now += dropped;
            continue;
        }
        r->kind[p] = kind;      /* written since we dropped it */
        if (r->cooldown[p]) {
            r->cooldown[p]--;
            continue;
        }
        h = qd_hash_page(r->host + p * DEDUP_PAGE);
        e->st.scanned_pages++;
        if (qd_hash_equal(h, zero_hash) && !(r->flags & DEDUP_REGION_FILE)) {
            if (kind != PAGE_COWED && e->cfg.zero_pages) {
                b->zero[b->nzero++] = p;
            } else if (kind == PAGE_COWED) {
                b->cowed[b->ncowed++] = p;
            }
            t->changed += r->hash[p] != 0;
            r->hash[p] = 0;
            continue;
        }
        if (r->hash[p] != (uint32_t)h.lo) {
            t->changed++;
            r->misses[p] = 0;
        }
        if (merging && r->hash[p] == (uint32_t)h.lo) {
            b->lookup[b->nlookup++] = (QdLookupEntry) { .hash = h, .cookie = p };
        } else if (kind == PAGE_COWED && r->hash[p]) {
            b->cowed[b->ncowed++] = p;      /* unstable: give the slot back */
        }
        r->hash[p] = (uint32_t)h.lo;
    }
}

static int cmp_items(const void *a, const void *b)
{
    const MergeItem *x = a, *y = b;

    return x->page < y->page ? -1 : x->page > y->page;
}

/* Is r, seen before e->lock was let go, still one of ours? */
static bool region_alive(DedupEngine *e, const Region *r, uint64_t id)
{
    for (guint i = 0; i < e->regions->len; i++) {
        const Region *x = g_ptr_array_index(e->regions, i);

        if (x == r && x->id == id) {
            return true;
        }
    }
    return false;
}

/* References the broker just gave for pages we will not map: back. */
static void give_back(DedupEngine *e, const QdResult *res, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if ((res[i].result == QD_RESULT_HIT || res[i].result == QD_RESULT_STORED) &&
            qd_slot_uses_count(&e->broker.uses, res[i].slot) == 0) {
            g_hash_table_add(e->broker.unref_due, GSIZE_TO_POINTER((gsize)res[i].slot));
        }
    }
}

/*
 * Ask the broker about the batch's candidates; merge the matches.  Called
 * with e->lock held; lets it go while the broker answers (I10), so a
 * discard, a RAM-block removal or the monitor never waits for the broker.
 * Meanwhile pages may change (the merge compares them under protection)
 * and b->r may go: false then, and b->r must not be touched.
 */
static bool lookup_and_merge(DedupEngine *e, Batch *b)
{
    g_autofree MergeItem *items = g_new(MergeItem, b->nlookup);
    g_autofree uint32_t *publish = g_new(uint32_t, b->nlookup);
    g_autofree uint8_t *copies = NULL;
    size_t nitems = 0, npublish = 0;
    uint64_t rid = b->r->id;
    QdError err;
    int ret;

    engine_unlock(e);
    broker_io(e, e->broker.client.sock);
    ret = qd_client_lookup(&e->broker.client, b->lookup, b->nlookup, b->result, &err);
    broker_io(e, -1);
    g_mutex_lock(&e->lock);
    if (!region_alive(e, b->r, rid)) {
        if (!ret) {
            give_back(e, b->result, b->nlookup);
        }
        return false;
    }
    if (ret) {
        broker_lost(e, ret < 0 ? g_strerror(-ret) : err.message);
        return true;
    }
    for (size_t i = 0; i < b->nlookup; i++) {
        if (b->result[i].result == QD_RESULT_HIT) {
            if (broker_took(e, b->result[i].slot)) {
                items[nitems++] = (MergeItem) { b->r, b->lookup[i].cookie,
                                                b->result[i].slot };
            }
        } else if (b->result[i].result == QD_RESULT_PUBLISH) {
            publish[npublish++] = i;
        } else {
            size_t p = b->lookup[i].cookie;

            if ((b->r->kind[p] & 0x7f) == PAGE_COWED) {
                b->cowed[b->ncowed++] = p;
            }
            /*
             * No match (yet): ask again after 2, 4, 8, then every 16 passes
             * while the content stays the same.  Stable unique pages were
             * most of a settled guest's hashing and broker traffic.
             */
            b->r->misses[p] = MIN(b->r->misses[p] + 1, MISS_BACKOFF_MAX);
            b->r->cooldown[p] = 1u << b->r->misses[p];
        }
    }
    engine_trace(e, DEDUP_TRACE_LOOKUP, b->r, b->nlookup, nitems);     /* nitems: hits */
    if (npublish) {
        copies = g_malloc(MIN(npublish, QD_MAX_PUBLISH) * DEDUP_PAGE);
    }
    for (size_t i = 0; i < npublish && e->broker.connected; i += QD_MAX_PUBLISH) {
        uint32_t n = MIN(npublish - i, QD_MAX_PUBLISH);
        QdLookupEntry pe[QD_MAX_PUBLISH];
        const void *pages[QD_MAX_PUBLISH];
        QdResult pr[QD_MAX_PUBLISH];

        for (uint32_t j = 0; j < n; j++) {
            pe[j] = b->lookup[publish[i + j]];
            /*
             * Copied under e->lock (the RAM may go once we let it go), read
             * without protection: the broker hashes what it receives.
             */
            memcpy(copies + j * DEDUP_PAGE, b->r->host + pe[j].cookie * DEDUP_PAGE,
                   DEDUP_PAGE);
            pages[j] = copies + j * DEDUP_PAGE;
        }
        engine_unlock(e);
        broker_io(e, e->broker.client.sock);
        ret = qd_client_publish(&e->broker.client, pe, pages, n, pr, &err);
        broker_io(e, -1);
        g_mutex_lock(&e->lock);
        if (!region_alive(e, b->r, rid)) {
            for (size_t k = 0; k < nitems; k++) {
                uint64_t slot = items[k].slot;

                broker_unref(e, &slot, 1);      /* taken above, mapped by nothing */
            }
            if (!ret) {
                give_back(e, pr, n);
            }
            return false;
        }
        if (ret) {
            broker_lost(e, ret < 0 ? g_strerror(-ret) : err.message);
            break;
        }
        for (uint32_t j = 0; j < n; j++) {
            if ((pr[j].result == QD_RESULT_STORED || pr[j].result == QD_RESULT_HIT) &&
                broker_took(e, pr[j].slot)) {
                items[nitems++] = (MergeItem) { b->r, pe[j].cookie, pr[j].slot };
            }
        }
        engine_trace(e, DEDUP_TRACE_PUBLISH, b->r, n, nitems);
    }
    if (!nitems) {
        return true;
    }
    qsort(items, nitems, sizeof(*items), cmp_items);
    if (!budget_left(e, 2 * nitems)) {
        /* Give the references back: we will not map them. */
        g_autofree uint64_t *slots = g_new(uint64_t, nitems);

        for (size_t i = 0; i < nitems; i++) {
            slots[i] = items[i].slot;
        }
        broker_unref(e, slots, nitems);
        return true;
    }
    merge_pages(e, items, nitems);
    e->st.vmas_used = engine_vmas(e);
    return true;
}

/*
 * One batch of b->r, e->lock held (let go while the broker answers).
 * False if b->r went meanwhile: the caller must not touch it.
 */
static bool process_batch(DedupEngine *e, Batch *b, PassTotals *t)
{
    bool merging;

    b->nzero = b->nlookup = b->ncowed = 0;
    if (pagemap_flags(e, b->r->host + b->first * DEDUP_PAGE, b->n, b->pm) < 0) {
        return true;
    }
    merging = e->cfg.merge && e->broker.connected && budget_left(e, 2);
    classify(e, b, t, merging);
    if (b->nzero) {
        drop_zero_pages(e, b->r, b->zero, b->nzero);
        t->zero_now += b->nzero;
    }
    if (b->nlookup && e->broker.connected && !lookup_and_merge(e, b)) {
        return false;
    }
    if (b->nzero || b->nlookup) {
        thp_split_batch(e, b->r, b->pm, b->first, b->n);
    }
    for (size_t i = 0; i < b->ncowed; i++) {
        size_t p = b->cowed[i];
        uint64_t refs = 0, merged = 0;

        if ((b->r->kind[p] & 0x7f) == PAGE_COWED && e->broker.connected) {
            restore_cowed(e, b->r, p, b->first + b->n, &refs, &merged);
            t->refs_now -= MIN(refs, t->refs_now);
            t->merged_now -= MIN(merged, t->merged_now);
        }
    }
    return true;
}

/* Sleep as long as the CPU limit asks, or until stopped; false if stopped. */
static bool pace(DedupEngine *e, int64_t cpu_ns, int64_t wall_ns, int64_t extra_ms)
{
    int64_t sleep_us = extra_ms * 1000;
    bool go;

    if (e->cfg.cpu_limit < 100) {
        sleep_us += (cpu_ns * 100 / e->cfg.cpu_limit - wall_ns) / 1000;
    }
    g_mutex_lock(&e->ctl_lock);
    if (sleep_us > 0 && !e->stopping) {
        g_cond_wait_until(&e->ctl_cond, &e->ctl_lock, g_get_monotonic_time() + sleep_us);
    }
    while (!e->enabled && !e->unmerging && !e->stopping) {
        g_cond_wait(&e->ctl_cond, &e->ctl_lock);
    }
    go = !e->stopping;
    g_mutex_unlock(&e->ctl_lock);
    return go;
}

/* Work a pass did: merges, drops, COWs, restores. */
static uint64_t work_done(const DedupStats *st)
{
    return st->merges + st->zero_dropped + st->cow_events + st->restored;
}

/*
 * The pause after a pass: pass-interval, doubled after each quiet pass, up
 * to IDLE_BACKOFF_MAX doublings.  A pass is quiet when the pages that
 * changed plus the work it did (merges, drops, COWs, restores) are at most
 * a thousandth of the pages: a live guest always writes a few pages, and a
 * few COWs a second are not worth a pass every 0.5 s (which cost a settled
 * 512 MiB guest 14 ms a pass, mostly the page-table walk).  A settled guest
 * then costs a pass every 8 s; a guest that writes keeps the short interval,
 * and one that starts populating memory cuts the pause short.
 */
#define IDLE_BACKOFF_MAX 4
#define UNMERGE_STEP 4096           /* pages unmerged between CPU-limit checks */

/* Resident pages of this process (statm), 0 if unknown. */
static uint64_t resident_pages(void)
{
    g_autofree char *statm = NULL;
    unsigned long long size, resident;

    if (!g_file_get_contents("/proc/self/statm", &statm, NULL, NULL) ||
        sscanf(statm, "%llu %llu", &size, &resident) != 2) {
        return 0;
    }
    return resident;
}

/*
 * Sleep between passes; false if stopped.  While backed off, look at the
 * process's resident pages every pass-interval (a few microseconds): a guest
 * that starts loading data after a quiet spell populates memory, and should
 * not wait up to 8 s for the pass that merges it.
 */
static bool pause_between_passes(DedupEngine *e, uint64_t quiet_pages)
{
    int64_t left = (int64_t)e->cfg.pass_interval_ms << e->idle_passes;
    uint64_t rss0 = e->idle_passes ? resident_pages() : 0;

    while (left > 0) {
        int64_t step = MIN(left, (int64_t)e->cfg.pass_interval_ms);

        if (!pace(e, 0, 0, step)) {
            return false;
        }
        left -= step;
        if (left > 0 && rss0 && resident_pages() > rss0 + quiet_pages) {
            e->idle_passes = 0;
            break;
        }
    }
    return true;
}

void dedup_engine_run_scanner(DedupEngine *e)
{
    Batch *b = g_new0(Batch, 1);
    while (pace(e, 0, 0, 0)) {
        int64_t pass_start = g_get_monotonic_time();

        if (__atomic_load_n(&e->unmerging, __ATOMIC_RELAXED)) {
            /* A step at a time, within the CPU limit, until nothing is left. */
            int64_t cpu0 = thread_cpu_ns();
            bool left = dedup_engine_unmerge(e, UNMERGE_STEP) > 0;
            int64_t cpu1;

            engine_release_unmapped(e);
            broker_flush_unrefs(e);
            cpu1 = thread_cpu_ns();

            __atomic_store_n(&e->cpu_ns_scanner, cpu1, __ATOMIC_RELAXED);
            if (!pace(e, cpu1 - cpu0, (g_get_monotonic_time() - pass_start) * 1000,
                      left ? 0 : e->cfg.pass_interval_ms)) {
                break;
            }
            continue;
        }
        PassTotals t = { 0 };

        size_t ri = 0, page = 0;
        uint64_t work_before = work_done(&e->st), quiet_pages;

        /*
         * (Re)connect once a pass, not per batch: a broker that accepts and
         * never answers costs a pass the HELLO's timeout, and zero pages
         * are still dropped in between.  Without e->lock (I10).
         */
        if (e->cfg.merge) {
            broker_usable(e);
        }

        for (;;) {
            int64_t cpu0 = thread_cpu_ns(), wall0 = g_get_monotonic_time();
            int64_t cpu1;

            if (__atomic_load_n(&e->unmerging, __ATOMIC_RELAXED)) {
                break;      /* merge no more */
            }
            /* Broker I/O here is made without e->lock (I10). */
            broker_flush_unrefs(e);
            g_mutex_lock(&e->lock);
            if (ri >= e->regions->len) {
                engine_unlock(e);
                break;
            }
            b->r = g_ptr_array_index(e->regions, ri);
            b->first = page;
            b->n = MIN(DEDUP_BATCH, b->r->npages - page);
            if (!process_batch(e, b, &t)) {
                page = 0;       /* the region went: ri names the next one now */
            } else {
                page += b->n;
                if (page >= b->r->npages) {
                    ri++;
                    page = 0;
                }
            }
            engine_unlock(e);
            cpu1 = thread_cpu_ns();
            __atomic_store_n(&e->cpu_ns_scanner, cpu1, __ATOMIC_RELAXED);
            if (!pace(e, cpu1 - cpu0, (g_get_monotonic_time() - wall0) * 1000, 0)) {
                g_free(b);
                return;
            }
        }
        g_mutex_lock(&e->lock);
        e->st.zero_pages = t.zero_now;
        e->st.merged_pages = t.merged_now;
        e->st.pool_refs = t.refs_now;
        e->st.passes++;
        e->st.last_pass_ms = (g_get_monotonic_time() - pass_start) / 1000;
        e->st.vmas_used = engine_vmas(e);
        broker_check_closed(e);
        if (e->st.vmas_used + 2 <= e->cfg.max_vmas) {
            e->budget_reported = false;
            e->st.vma_budget_reached = false;
        }
        /* A live guest always changes a few pages: a thousandth is quiet. */
        quiet_pages = e->st.covered_bytes / DEDUP_PAGE / 1024;
        e->idle_passes = t.changed + work_done(&e->st) - work_before > quiet_pages
                         ? 0 : MIN(e->idle_passes + 1, IDLE_BACKOFF_MAX);
        engine_unlock(e);
        engine_release_unmapped(e);
        broker_flush_unrefs(e);
        if (!pause_between_passes(e, quiet_pages)) {
            break;
        }
    }
    g_free(b);
}

void engine_unlock(DedupEngine *e)
{
    DedupStats st = e->st;
    uint64_t meta = sizeof(*e);

    st.regions = e->regions->len;
    for (guint i = 0; i < e->regions->len; i++) {
        Region *r = g_ptr_array_index(e->regions, i);

        meta += sizeof(*r) + r->npages * (3 + sizeof(*r->slot) + sizeof(*r->hash));
    }
    st.metadata_bytes = meta;
    st.broker_connected = e->broker.connected;
    st.vmas_used = engine_vmas(e);
    g_mutex_lock(&e->stats_lock);
    e->shown = st;
    g_mutex_unlock(&e->stats_lock);
    g_mutex_unlock(&e->lock);
}

/*
 * The figures as of the last e->lock section: this never waits for the
 * scanner, which may be waiting for the broker (I10).
 */
void dedup_engine_get_stats(DedupEngine *e, DedupStats *st)
{
    g_mutex_lock(&e->stats_lock);
    *st = e->shown;
    g_mutex_unlock(&e->stats_lock);
    st->wp_faults = __atomic_load_n(&e->st.wp_faults, __ATOMIC_RELAXED);
    st->unmerging = __atomic_load_n(&e->unmerging, __ATOMIC_RELAXED);
    st->vma_budget = e->cfg.max_vmas;
    st->saved_bytes = (int64_t)(st->zero_pages + st->merged_pages) * DEDUP_PAGE -
                      (int64_t)st->metadata_bytes;
    st->cpu_ns = __atomic_load_n(&e->cpu_ns_scanner, __ATOMIC_RELAXED) +
                 __atomic_load_n(&e->cpu_ns_faults, __ATOMIC_RELAXED);
}

static void set_locked(DedupEngine *e, void (*fn)(DedupEngine *, uint64_t), uint64_t v)
{
    g_mutex_lock(&e->ctl_lock);
    fn(e, v);
    g_cond_broadcast(&e->ctl_cond);
    g_mutex_unlock(&e->ctl_lock);
}

static void do_enabled(DedupEngine *e, uint64_t v) { e->enabled = v; }
static void do_cpu_limit(DedupEngine *e, uint64_t v) { e->cfg.cpu_limit = CLAMP(v, 1, 100); }
static void do_max_vmas(DedupEngine *e, uint64_t v) { e->cfg.max_vmas = v; }
static void do_zero_pages(DedupEngine *e, uint64_t v) { e->cfg.zero_pages = v; }
static void do_unmerging(DedupEngine *e, uint64_t v) { e->unmerging = v; }

void dedup_engine_set_enabled(DedupEngine *e, bool on) { set_locked(e, do_enabled, on); }
void dedup_engine_set_cpu_limit(DedupEngine *e, uint32_t pct) { set_locked(e, do_cpu_limit, pct); }
void dedup_engine_set_max_vmas(DedupEngine *e, uint64_t n) { set_locked(e, do_max_vmas, n); }
void dedup_engine_set_zero_pages(DedupEngine *e, bool on) { set_locked(e, do_zero_pages, on); }
void dedup_engine_set_unmerging(DedupEngine *e, bool on) { set_locked(e, do_unmerging, on); }

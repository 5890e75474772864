/* SPDX-License-Identifier: GPL-2.0-or-later */
/* What the engine's files share; not for the QEMU glue. */
#ifndef QDEDUP_ENGINE_INTERNAL_H
#define QDEDUP_ENGINE_INTERNAL_H

#include <glib.h>
#include <time.h>

#include "engine.h"
#include "qdedup/client.h"
#include "qdedup/slot-uses.h"

#define DEDUP_PAGE          4096u
#define DEDUP_NO_SLOT       UINT32_MAX
#define DEDUP_BATCH         1024u   /* pages hashed between checks of the budget */

/* Where a page's memory comes from, as far as we changed it. */
enum {
    PAGE_ANON = 0,      /* QEMU's original mapping */
    PAGE_MERGED,        /* pool slot mapped here (slot[]), not written since */
    PAGE_COWED,         /* pool slot mapped here, but the guest wrote: own copy */
    PAGE_MOVED,         /* moved back to anonymous memory: starts its own VMA */
    PAGE_MOVED_CONT,    /* moved in one piece with the page before it: same VMA */
};

/* Page flags from pagemap (see pagemap.c). */
enum {
    PM_PRESENT = 1 << 0,
    PM_FILE = 1 << 1,       /* maps a file page (for us: the pool) */
    PM_ZERO = 1 << 2,       /* maps the shared zero page */
    PM_HUGE = 1 << 3,
};

typedef struct Region {
    char *name;
    uint8_t *host;
    size_t npages;
    unsigned flags;         /* DEDUP_REGION_* */
    uint8_t *kind;          /* PAGE_* */
    uint8_t *cooldown;      /* passes to skip: COWed soon after merging, or no match */
    uint8_t *misses;        /* lookups without a match since the content changed */
    uint32_t *slot;         /* PAGE_MERGED/COWED: pool slot we hold a reference to */
    /*
     * Low 32 bits of the last hash, 0: none.  Only tells whether the page
     * changed since the last pass: lookups send the full hash and merges
     * compare bytes, so a collision costs at most one early lookup.
     */
    uint32_t *hash;
    uint64_t vmas;          /* extra VMAs our mappings cost here (I7) */
    uint64_t id;            /* unique: tells a removed region from a new one */
} Region;

typedef struct Broker {
    QdClient client;
    bool connected;
    /*
     * Our pages that map each slot.  The broker holds one reference per
     * slot for us, however many pages map it: it is taken by the first use
     * (HIT or STORED) and given back when the last use goes.
     */
    QdSlotUses uses;
    /*
     * Slots whose last use went: their UNREF is due.  Any thread queues
     * (under e->lock); only the scanner sends, never under e->lock, so no
     * discard or RAM-block removal waits for the broker (I10).  A slot that
     * is used again before the UNREF left is simply taken off: the broker
     * still holds its reference.
     */
    GHashTable *unref_due;
    /* UNREFs lost to a timeout or a disconnect: done or not, we cannot tell. */
    GArray *unref_uncertain;
    int io_fd;              /* socket of the request in flight, or -1 (ctl_lock) */
    int pool_fd;            /* read-only, kept across reconnects */
    uint8_t *pool_view;     /* pool_fd mapped read-only, for compares */
    size_t pool_view_len;
    uint64_t pool_dev, pool_ino;
    int64_t next_attempt_us;
    int64_t backoff_us;
    bool ever_connected;
    bool denied;            /* the last HELLO was refused: wait long */
} Broker;

struct DedupEngine {
    DedupConfig cfg;
    char *broker_path, *domain, *secret, *name;

    GMutex lock;            /* regions and their page arrays; never taken by faults */
    GPtrArray *regions;
    GMutex wp_lock;         /* one protect..wake section at a time, vs. the fault loop */
    GMutex ctl_lock;        /* sleep/stop/settings */
    /*
     * Readers (the monitor) never take e->lock, which the scanner holds
     * across broker requests: they read a copy of the figures made as each
     * e->lock section ends (engine_unlock), under this lock held only to
     * copy.
     */
    GMutex stats_lock;
    DedupStats shown;
    GCond ctl_cond;
    bool stopping;
    bool enabled;
    bool unmerging;         /* give every pool page back instead of merging */

    int uffd;
    uint64_t uffd_features;
    int stop_fd;            /* eventfd: wakes the fault loop */
    int pagemap_fd;
    bool pagemap_scan;      /* PAGEMAP_SCAN ioctl works */

    Broker broker;
    int64_t cpu_ns_scanner, cpu_ns_faults;      /* atomics */
    bool budget_reported;
    unsigned idle_passes;       /* quiet passes in a row (scanner thread) */
    DedupStats st;          /* counters; "now" figures computed per pass */
    uint64_t next_region_id;
    /*
     * Removed regions whose references wait until QEMU really unmapped
     * their RAM (DetachedRun): until then our mappings of the pool stay.
     */
    GArray *unmap_wait;
};

typedef struct DetachedRun {
    uintptr_t lo, hi;       /* the removed region's addresses */
    GArray *slots;          /* uint64_t: one per page that mapped the pool */
} DetachedRun;

/* Scanner, e->lock not held: release what removed regions no longer map. */
void engine_release_unmapped(DedupEngine *e);

/* Leave an e->lock section, first publishing its figures to readers. */
void engine_unlock(DedupEngine *e);

/* pagemap.c */
int pagemap_open(DedupEngine *e);
/* Fill flags[0..n) (PM_*) for the pages at addr. */
int pagemap_flags(DedupEngine *e, const uint8_t *addr, size_t n, uint8_t *flags);

/* uffd.c */
int uffd_setup(DedupEngine *e, char **errmsg);
int uffd_register_wp(DedupEngine *e, void *addr, size_t len);
int uffd_protect(DedupEngine *e, void *addr, size_t len, bool wp);
void uffd_wake(DedupEngine *e, void *addr, size_t len);

/* merge.c: called by the scanner with e->lock held */
typedef struct MergeItem {
    Region *r;
    size_t page;
    uint64_t slot;
} MergeItem;
/* Merge items (sorted by region and page); unreferences what does not merge. */
void merge_pages(DedupEngine *e, MergeItem *items, size_t n);
void region_set_page(Region *r, size_t page, uint8_t kind, uint32_t slot);

static inline void engine_trace(DedupEngine *e, DedupTrace what, const Region *r,
                                uint64_t a, uint64_t b)
{
    if (e->cfg.trace) {
        e->cfg.trace(e->cfg.opaque, what, r ? r->name : "", a, b);
    }
}
/* Drop the zero pages among pages[0..n) of r (I4). */
void drop_zero_pages(DedupEngine *e, Region *r, const size_t *pages, size_t n);
void thp_split_batch(DedupEngine *e, Region *r, const uint8_t *pm, size_t first, size_t n);
/* Copy pages [page, page+n) of r to anonymous memory, moved in atomically. */
bool move_to_anon(DedupEngine *e, Region *r, size_t page, size_t n);
/* Longest run moved back at once: bounds how long guest writes wait. */
#define MOVE_RUN_MAX 512u
/* Pages [s, s+n) of r were moved back in one piece (one VMA): slots to unref. */
void mark_moved_run(Region *r, size_t s, size_t n, GArray *unref);
/* Move a COWed page back to anonymous memory; release its slot if asked. */
bool restore_page(DedupEngine *e, Region *r, size_t page, bool release);
/*
 * Give back the slot of COWed page p, with the rest of its pool run when
 * most of the run is COWed.  Counts, among the pages given back before page
 * limit, those that held a reference and those still merged.
 */
void restore_cowed(DedupEngine *e, Region *r, size_t p, size_t limit,
                   uint64_t *refs, uint64_t *merged);

static inline bool pool_mapped(const Region *r, size_t p)
{
    uint8_t k = r->kind[p] & 0x7f;

    return k == PAGE_MERGED || k == PAGE_COWED;
}
int remap_flags(Region *r, void *addr, size_t len);

/* broker-link.c */
/* Scanner, e->lock not held: connects (with backoff) if needed. */
bool broker_usable(DedupEngine *e);
void broker_lost(DedupEngine *e, const char *why);
/*
 * A page now maps slot (the broker answered HIT or STORED for it).  False if
 * it cannot be counted: the page must not map the slot then.
 */
bool broker_took(DedupEngine *e, uint64_t slot);
/* One page each no longer maps slots[i]: the last use gives the reference back. */
void broker_unref(DedupEngine *e, const uint64_t *slots, size_t n);
/* Scanner only, e->lock not held: send the UNREFs that are due. */
void broker_flush_unrefs(DedupEngine *e);
void broker_hand_over_unrefs(DedupEngine *e);
void broker_io(DedupEngine *e, int fd);
const uint8_t *broker_pool_page(DedupEngine *e, uint64_t slot);
void broker_close(DedupEngine *e);
/* Unmap and close the pool: only when no page maps it any more. */
void broker_release_pool(DedupEngine *e);
void broker_check_closed(DedupEngine *e);
/* Move up to max pool-mapped pages back to anonymous memory (e->lock held). */
uint64_t unmerge_locked(DedupEngine *e, uint64_t max);

void engine_notify(DedupEngine *e, DedupEvent ev);
/* engine.c: the VMAs our mappings add (I7); e->lock held. */
uint64_t engine_vmas(DedupEngine *e);

/* CPU time of the calling thread, for cpu-ms and the CPU limit. */
static inline int64_t thread_cpu_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec * 1000000000ll + ts.tv_nsec;
}

#endif

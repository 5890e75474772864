/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The dedup engine: regions of guest RAM in, merges out.
 *
 * It has no QEMU includes, so our own meson build links it into a stress test
 * that plays guest with threads; QEMU's glue (memory-dedup.c) feeds it
 * RAMBlocks.  The caller owns the threads: one runs dedup_engine_run_scanner()
 * (hash, zero-drop, lookup, merge), one runs dedup_engine_run_faults() (the
 * userfaultfd).  See docs/memory-dedup.md for the design and
 * ../shared/ARCHITECTURE.md for the invariants (I1-I11) it keeps.
 */
#ifndef QDEDUP_ENGINE_H
#define QDEDUP_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct DedupEngine DedupEngine;

/* madvise() flags QEMU gave the RAM, re-applied to every mapping we put in it. */
enum {
    DEDUP_REGION_DONTFORK = 1 << 0,
    DEDUP_REGION_DONTDUMP = 1 << 1,
    DEDUP_REGION_HUGEPAGE = 1 << 2,
    /*
     * A private mapping of a file (memory-backend-file or -memfd with
     * share=off): MADV_DONTNEED there reads the file again, not zeros
     * (I9), so its zero pages merge with the pool's zero page instead.
     */
    DEDUP_REGION_FILE = 1 << 3,
};

typedef enum DedupEvent {
    DEDUP_EVENT_BROKER_LOST,
    DEDUP_EVENT_BROKER_REGAINED,
    DEDUP_EVENT_VMA_BUDGET,         /* stopped merging: max-vmas reached */
} DedupEvent;

/* What the engine reports for tracing (DedupConfig.trace), with a and b. */
typedef enum DedupTrace {
    DEDUP_TRACE_MERGED,         /* a run merged: first page, pages */
    DEDUP_TRACE_COW,            /* the guest wrote to a merged page: page, slot */
    DEDUP_TRACE_RESTORED,       /* a written page moved back: page, slot released */
    DEDUP_TRACE_ZERO,           /* zero pages dropped: first page, pages */
    DEDUP_TRACE_LOOKUP,         /* LOOKUP: entries, hits */
    DEDUP_TRACE_PUBLISH,        /* PUBLISH: pages, stored or hit */
    DEDUP_TRACE_UNREF,          /* UNREF: slots */
} DedupTrace;

typedef struct DedupConfig {
    const char *broker;         /* socket path; NULL: the broker's default */
    const char *domain;         /* trust domain; "" or NULL: share with nobody */
    const char *secret;         /* the domain's secret, or NULL */
    const char *name;           /* VM name, for the broker's stats */
    uint8_t uuid[16];
    bool zero_pages;            /* drop zero pages (I4) */
    bool merge;                 /* look up and merge non-zero pages */
    uint32_t cpu_limit;         /* % of one core for the scanner, 1-100 */
    uint32_t pass_interval_ms;  /* pause between passes */
    uint64_t max_vmas;          /* VMAs we may add (I7) */
    /* Tests only: change pages that devices are writing (I8 off, to see it fail). */
    bool ignore_dma;
    /* Called from the engine's threads; must not block (schedule a BH). */
    void (*notify)(void *opaque, DedupEvent ev);
    /* Called from the engine's threads with its locks held: cheap, no blocking. */
    void (*trace)(void *opaque, DedupTrace what, const char *region, uint64_t a, uint64_t b);
    void *opaque;
} DedupConfig;

typedef struct DedupStats {
    bool broker_connected;
    bool vma_budget_reached;
    uint64_t regions;
    uint64_t covered_bytes;
    uint64_t scanned_pages;     /* pages hashed, all passes */
    uint64_t passes;
    uint64_t last_pass_ms;
    uint64_t zero_pages;        /* dropped now */
    uint64_t zero_dropped;      /* dropped, all passes */
    uint64_t thp_splits;        /* huge pages split after we punched holes (thp.c) */
    uint64_t merged_pages;      /* mapped to the pool now */
    uint64_t pool_refs;         /* broker references held now */
    uint64_t merges;            /* pages merged, all passes */
    uint64_t cow_events;        /* merged pages written by the guest */
    uint64_t restored;          /* COWed pages moved back to anonymous memory */
    uint64_t mismatches;        /* compare under protection failed */
    uint64_t dma_skipped;       /* pages left alone: a device was writing them (I8) */
    uint64_t wp_faults;         /* writes that waited for a merge */
    uint64_t vmas_used;
    uint64_t vma_budget;
    uint64_t metadata_bytes;
    int64_t saved_bytes;        /* zero + merged pages, net of our metadata */
    uint64_t cpu_ns;            /* scanner + fault thread */
    uint64_t broker_reconnects;
    uint64_t discarded;         /* merged pages QEMU discarded (balloon, virtio-mem) */
    uint64_t unmerged;          /* merged pages given back by unmerge */
    bool unmerging;
    uint64_t resets;            /* guest resets seen */
} DedupStats;

/* NULL and *errmsg (g_free it) when the userfaultfd is unavailable. */
DedupEngine *dedup_engine_new(const DedupConfig *cfg, char **errmsg);
/* Stop the loops; call before joining the threads. */
void dedup_engine_stop(DedupEngine *e);
/*
 * Free everything.  Merged pages stay mapped (they are correct private
 * mappings); the pool fd stays open for them, and the broker keeps our
 * references until this process exits (ARCHITECTURE I2).
 */
void dedup_engine_free(DedupEngine *e);

/* Region of private anonymous (or MAP_PRIVATE file) RAM, page aligned. */
int dedup_engine_add_region(DedupEngine *e, const char *name, void *host,
                            size_t len, unsigned flags, char **errmsg);
/* Stop touching [host, ...); waits for a batch in progress. */
void dedup_engine_remove_region(DedupEngine *e, void *host);

void dedup_engine_run_scanner(DedupEngine *e);
void dedup_engine_run_faults(DedupEngine *e);

void dedup_engine_get_stats(DedupEngine *e, DedupStats *st);
void dedup_engine_set_enabled(DedupEngine *e, bool enabled);
void dedup_engine_set_cpu_limit(DedupEngine *e, uint32_t percent);
void dedup_engine_set_max_vmas(DedupEngine *e, uint64_t max_vmas);
void dedup_engine_set_zero_pages(DedupEngine *e, bool on);

/*
 * Before QEMU discards [host, host+len) (ram_block_discard_range: balloon,
 * free page reporting, virtio-mem, postcopy): merged pages there get fresh
 * anonymous memory, so the range reads zeros afterwards as discarded RAM
 * must (I5), and their references go.  Callable from any thread, with or
 * without the BQL.  -errno if some could not: the discard must then fail.
 */
int dedup_engine_discard(DedupEngine *e, void *host, size_t len);
/*
 * Move up to max_pages pool-mapped pages back to anonymous memory and
 * release their references; returns how many are left.  Needs the fault
 * thread running (guest writes wait for the move).
 */
uint64_t dedup_engine_unmerge(DedupEngine *e, uint64_t max_pages);
/* While on, the scanner unmerges everything, bit by bit, instead of merging. */
void dedup_engine_set_unmerging(DedupEngine *e, bool on);
/* The guest was reset: forget the per-page back-off of the old boot. */
void dedup_engine_reset_hints(DedupEngine *e);

/*
 * Device DMA into guest RAM (I8; dma.c).  Call dedup_dma_map() before a
 * device may write [host, host+len) and dedup_dma_unmap() with the same
 * host once it finished; any thread, cheap, never blocks for long.  The
 * engine leaves pages in such a range alone.  Process-wide: the mappings
 * of every device, whatever engines exist.
 */
void dedup_dma_map(const void *host, size_t len);
void dedup_dma_unmap(const void *host, size_t len);
/* Does some device mapping overlap [host, host+len)? */
bool dedup_dma_busy(const void *host, size_t len);
/* Mappings in flight (tests, stats). */
size_t dedup_dma_in_flight(void);

#endif

/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Guest RAM mapped for device DMA (ARCHITECTURE I8).
 *
 * Write-protection stops the CPU, not a device: the host kernel pins the
 * pages of an O_DIRECT read (cache=none with aio=native, io_uring or
 * threads) and the disk writes them directly.  Dropping, merging or moving
 * such a page sends the device's data to a page nobody maps.  User space
 * cannot see pins, but QEMU maps every DMA buffer (address_space_map(),
 * which dma_memory_map() and the virtqueue code use) before the I/O starts
 * and unmaps it after it ended, so it tells us (memory_dedup_dma_map()).
 *
 * The ordering argument.  A mapping is entered here, under dma_lock,
 * before its pointer reaches the device: a pin of its pages comes after
 * the entry.  The engine write-protects a range and only then asks
 * dedup_dma_busy() (under dma_lock, which orders it after the protection):
 *  - a mapping entered before the question is seen, and the page is left
 *    alone;
 *  - a mapping entered after it pins its pages after the protection is in
 *    place; the pin (a GUP write fault) waits on the protection until the
 *    engine has replaced the mapping and woken it, and then pins the new
 *    page.
 * So no device ever writes a page the engine dropped, merged or moved.
 *
 * Only mappings a device writes (is_write) are entered: a device reading a
 * page we change reads the same content from the old page.
 *
 * This is process-wide and always on, not per engine: a memory-dedup
 * object created while I/O is in flight must see the mappings made before
 * it.  Its cost is a mutex and a short array search per map and unmap
 * (scripts/bench/dma-track-bench.c).
 */
#include <glib.h>

#include "engine.h"

typedef struct DmaMapping {
    uintptr_t lo, hi;
    uint32_t count;             /* mapped this many times, same start */
} DmaMapping;

static GMutex dma_lock;
static DmaMapping *mappings;    /* unordered; few: a device's queue depth */
static size_t nmappings, capacity;

void dedup_dma_map(const void *host, size_t len)
{
    uintptr_t lo = (uintptr_t)host;

    if (!len) {
        return;
    }
    g_mutex_lock(&dma_lock);
    for (size_t i = nmappings; i-- > 0;) {
        if (mappings[i].lo == lo) {
            mappings[i].count++;
            mappings[i].hi = MAX(mappings[i].hi, lo + len);
            g_mutex_unlock(&dma_lock);
            return;
        }
    }
    if (nmappings == capacity) {
        capacity = MAX(64, capacity * 2);
        mappings = g_renew(DmaMapping, mappings, capacity);
    }
    mappings[nmappings++] = (DmaMapping) { lo, lo + len, 1 };
    g_mutex_unlock(&dma_lock);
}

void dedup_dma_unmap(const void *host, size_t len)
{
    uintptr_t lo = (uintptr_t)host;

    (void)len;  /* found by its start: callers' lengths may differ */
    g_mutex_lock(&dma_lock);
    for (size_t i = nmappings; i-- > 0;) {
        if (mappings[i].lo == lo) {
            if (!--mappings[i].count) {
                mappings[i] = mappings[--nmappings];
            }
            break;
        }
    }
    g_mutex_unlock(&dma_lock);
}

bool dedup_dma_busy(const void *host, size_t len)
{
    uintptr_t lo = (uintptr_t)host, hi = lo + len;
    bool busy = false;

    g_mutex_lock(&dma_lock);
    for (size_t i = 0; i < nmappings && !busy; i++) {
        busy = mappings[i].lo < hi && lo < mappings[i].hi;
    }
    g_mutex_unlock(&dma_lock);
    return busy;
}

size_t dedup_dma_in_flight(void)
{
    size_t n;

    g_mutex_lock(&dma_lock);
    n = nmappings;
    g_mutex_unlock(&dma_lock);
    return n;
}

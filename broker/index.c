/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Stable index (see index.h).  Removal shifts later entries of the probe
 * run back instead of leaving tombstones, so lookups never slow down as
 * slots come and go.
 */
#include <glib.h>

#include "index.h"

#define MIN_CAPACITY 64

static uint64_t home_of(const HashIndex *ix, uint64_t kh)
{
    return kh & ix->mask;
}

static uint64_t home_of_slot(const HashIndex *ix, const SlotTable *st, uint32_t cell)
{
    return home_of(ix, keyed_hash(ix->key, st->info[cell - 1].hash));
}

void index_init(HashIndex *ix, const KeyedHash *key)
{
    ix->cells = g_new0(uint32_t, MIN_CAPACITY);
    ix->mask = MIN_CAPACITY - 1;
    ix->count = 0;
    ix->key = key;
    ix->probes = 0;
}

void index_destroy(HashIndex *ix)
{
    g_free(ix->cells);
    ix->cells = NULL;
}

uint64_t index_find(HashIndex *ix, const SlotTable *st, QdHash h, uint64_t kh)
{
    for (uint64_t i = home_of(ix, kh);; i = (i + 1) & ix->mask) {
        uint32_t c = ix->cells[i];

        ix->probes++;
        if (c == 0) {
            return INDEX_NONE;
        }
        if (qd_hash_equal(st->info[c - 1].hash, h)) {
            return c - 1;
        }
    }
}

static void place(HashIndex *ix, const SlotTable *st, uint32_t cell)
{
    uint64_t i = home_of_slot(ix, st, cell);

    while (ix->cells[i]) {
        i = (i + 1) & ix->mask;
    }
    ix->cells[i] = cell;
}

static void resize(HashIndex *ix, const SlotTable *st, uint64_t capacity)
{
    uint32_t *old = ix->cells;
    uint64_t old_cap = ix->mask + 1;

    ix->cells = g_new0(uint32_t, capacity);
    ix->mask = capacity - 1;
    for (uint64_t i = 0; i < old_cap; i++) {
        if (old[i]) {
            place(ix, st, old[i]);
        }
    }
    g_free(old);
}

void index_insert(HashIndex *ix, const SlotTable *st, uint64_t slot)
{
    if ((ix->count + 1) * 4 > (ix->mask + 1) * 3) {
        resize(ix, st, (ix->mask + 1) * 2);
    }
    place(ix, st, slot + 1);
    ix->count++;
}

void index_remove(HashIndex *ix, const SlotTable *st, uint64_t slot)
{
    uint64_t i = home_of_slot(ix, st, slot + 1);

    while (ix->cells[i] != slot + 1) {
        if (ix->cells[i] == 0) {
            return;     /* not indexed: nothing to remove */
        }
        i = (i + 1) & ix->mask;
    }
    ix->cells[i] = 0;
    ix->count--;
    /* Backward shift: move up entries that probed past the freed cell. */
    for (uint64_t j = (i + 1) & ix->mask; ix->cells[j]; j = (j + 1) & ix->mask) {
        uint64_t h = home_of_slot(ix, st, ix->cells[j]);

        /* Entry at j may move to i if its home is not in (i, j]. */
        if (((j - h) & ix->mask) >= ((j - i) & ix->mask)) {
            ix->cells[i] = ix->cells[j];
            ix->cells[j] = 0;
            i = j;
        }
    }
    if (ix->mask + 1 > MIN_CAPACITY && ix->count * 8 < ix->mask + 1) {
        resize(ix, st, (ix->mask + 1) / 2);
    }
}

uint64_t index_bytes(const HashIndex *ix)
{
    return (ix->mask + 1) * sizeof(uint32_t);
}

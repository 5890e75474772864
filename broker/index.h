/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The stable index of one trust domain: XXH3-128 -> slot.  Open addressing
 * with linear probing over 32-bit slot numbers (the hashes live in the
 * SlotTable), kept at most 3/4 full: 5-11 bytes a slot.  Entries are placed
 * by the broker's keyed hash of the page hash (keyed.h), not by bits a
 * client could choose by choosing page content.
 */
#ifndef QDEDUP_BROKER_INDEX_H
#define QDEDUP_BROKER_INDEX_H

#include <stdint.h>

#include "keyed.h"
#include "slots.h"

#define INDEX_NONE UINT64_MAX

typedef struct HashIndex {
    uint32_t *cells;        /* slot + 1; 0 = empty */
    uint64_t mask;          /* capacity - 1 (power of two) */
    uint64_t count;
    const KeyedHash *key;
    uint64_t probes;        /* cells looked at by finds, for the stats */
} HashIndex;

void index_init(HashIndex *ix, const KeyedHash *key);
void index_destroy(HashIndex *ix);
/* kh: keyed_hash(ix->key, h), computed once by the caller. */
uint64_t index_find(HashIndex *ix, const SlotTable *st, QdHash h, uint64_t kh);
/* Insert slot (its hash is st's); the hash must not be present yet. */
void index_insert(HashIndex *ix, const SlotTable *st, uint64_t slot);
void index_remove(HashIndex *ix, const SlotTable *st, uint64_t slot);
uint64_t index_bytes(const HashIndex *ix);

/* Start fetching the cell a find of kh will look at first. */
static inline void index_prefetch(const HashIndex *ix, uint64_t kh)
{
    __builtin_prefetch(&ix->cells[kh & ix->mask]);
}

#endif

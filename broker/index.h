/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The stable index of one trust domain: XXH3-128 -> slot.  Open addressing
 * with linear probing over 32-bit slot numbers (the hashes live in the
 * SlotTable), kept at most 3/4 full: 5-11 bytes a slot.  Each domain has its
 * own table, so lookups in one domain never probe another domain's entries.
 */
#ifndef QDEDUP_BROKER_INDEX_H
#define QDEDUP_BROKER_INDEX_H

#include <stdint.h>

#include "slots.h"

#define INDEX_NONE UINT64_MAX

typedef struct HashIndex {
    uint32_t *cells;        /* slot + 1; 0 = empty */
    uint64_t mask;          /* capacity - 1 (power of two) */
    uint64_t count;
} HashIndex;

void index_init(HashIndex *ix);
void index_destroy(HashIndex *ix);
uint64_t index_find(const HashIndex *ix, const SlotTable *st, QdHash h);
/* Insert slot (its hash is st's); the hash must not be present yet. */
void index_insert(HashIndex *ix, const SlotTable *st, uint64_t slot);
void index_remove(HashIndex *ix, const SlotTable *st, uint64_t slot);
uint64_t index_bytes(const HashIndex *ix);

#endif

/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * What the broker knows of each allocated slot of one domain's pool: the
 * XXH3-128 of its content (computed by the broker itself) and how many
 * clients hold a reference to it.  A client holds at most one reference per
 * slot (refs.h), so the count is bounded by the number of clients and no
 * request can wrap it.  24 bytes a slot; the table grows with the pool's
 * high-water mark.
 */
#ifndef QDEDUP_BROKER_SLOTS_H
#define QDEDUP_BROKER_SLOTS_H

#include <glib.h>
#include <stdint.h>

#include "qdedup/protocol.h"

typedef struct SlotInfo {
    QdHash hash;
    uint32_t refs;          /* clients holding it */
    uint32_t flags;
} SlotInfo;

#define SLOT_INDEXED 1u     /* present in its domain's index */

typedef struct SlotTable {
    SlotInfo *info;
    uint64_t len;           /* entries allocated */
} SlotTable;

void slot_table_init(SlotTable *t);
void slot_table_destroy(SlotTable *t);
/* The entry of slot, growing the table to hold it. */
SlotInfo *slot_table_get(SlotTable *t, uint64_t slot);
uint64_t slot_table_bytes(const SlotTable *t);

#endif

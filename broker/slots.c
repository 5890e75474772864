/* SPDX-License-Identifier: GPL-2.0-or-later */
/* Per-slot metadata (see slots.h). */
#include <string.h>

#include "slots.h"

G_STATIC_ASSERT(sizeof(SlotInfo) == 24);

void slot_table_init(SlotTable *t)
{
    memset(t, 0, sizeof(*t));
}

void slot_table_destroy(SlotTable *t)
{
    g_free(t->info);
    memset(t, 0, sizeof(*t));
}

SlotInfo *slot_table_get(SlotTable *t, uint64_t slot)
{
    if (slot >= t->len) {
        /* Grow by an eighth (at least 64Ki entries): a doubling table would
         * cost up to 48 bytes a slot instead of 24. */
        uint64_t len = MAX(MAX(slot + 1, t->len + t->len / 8), 65536);
        t->info = g_renew(SlotInfo, t->info, len);
        memset(t->info + t->len, 0, (len - t->len) * sizeof(SlotInfo));
        t->len = len;
    }
    return &t->info[slot];
}

uint64_t slot_table_bytes(const SlotTable *t)
{
    return t->len * sizeof(SlotInfo);
}

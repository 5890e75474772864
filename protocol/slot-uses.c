/* SPDX-License-Identifier: GPL-2.0-or-later */
/* A client's uses of each pool slot (see include/qdedup/slot-uses.h). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qdedup/slot-uses.h"

#define OVERFLOWED 255u     /* the count is in the overflow table */
#define NO_SLOT UINT64_MAX

int qd_slot_uses_init(QdSlotUses *u, uint64_t max_slots)
{
    memset(u, 0, sizeof(*u));
    u->max_slots = max_slots;
    u->nchunks = (max_slots + QD_SLOT_USES_CHUNK - 1) / QD_SLOT_USES_CHUNK;
    u->chunks = calloc(u->nchunks ? u->nchunks : 1, sizeof(*u->chunks));
    return u->chunks ? 0 : -ENOMEM;
}

void qd_slot_uses_destroy(QdSlotUses *u)
{
    for (uint64_t i = 0; u->chunks && i < u->nchunks; i++) {
        free(u->chunks[i]);
    }
    free(u->chunks);
    free(u->over);
    memset(u, 0, sizeof(*u));
}

static size_t over_home(const QdSlotUses *u, uint64_t slot)
{
    return (size_t)(slot * 0x9e3779b97f4a7c15ull >> 32) & (u->over_cap - 1);
}

static QdSlotUseOverflow *over_find(const QdSlotUses *u, uint64_t slot)
{
    if (!u->over_cap) {
        return NULL;
    }
    for (size_t i = over_home(u, slot);; i = (i + 1) & (u->over_cap - 1)) {
        if (u->over[i].slot == slot) {
            return &u->over[i];
        }
        if (u->over[i].slot == NO_SLOT) {
            return NULL;
        }
    }
}

static void over_place(QdSlotUses *u, QdSlotUseOverflow e)
{
    size_t i = over_home(u, e.slot);

    while (u->over[i].slot != NO_SLOT) {
        i = (i + 1) & (u->over_cap - 1);
    }
    u->over[i] = e;
}

static int over_insert(QdSlotUses *u, uint64_t slot, uint64_t count)
{
    if ((u->over_len + 1) * 2 > u->over_cap) {
        size_t cap = u->over_cap ? u->over_cap * 2 : 16;
        QdSlotUseOverflow *old = u->over, *n = malloc(cap * sizeof(*n));
        size_t old_cap = u->over_cap;

        if (!n) {
            return -ENOMEM;
        }
        for (size_t i = 0; i < cap; i++) {
            n[i].slot = NO_SLOT;
        }
        u->over = n;
        u->over_cap = cap;
        for (size_t i = 0; i < old_cap; i++) {
            if (old[i].slot != NO_SLOT) {
                over_place(u, old[i]);
            }
        }
        free(old);
    }
    over_place(u, (QdSlotUseOverflow) { slot, count });
    u->over_len++;
    return 0;
}

/* Remove e, shifting its probe run back (no tombstones). */
static void over_remove(QdSlotUses *u, QdSlotUseOverflow *e)
{
    size_t mask = u->over_cap - 1, i = e - u->over;

    u->over[i].slot = NO_SLOT;
    u->over_len--;
    for (size_t j = (i + 1) & mask; u->over[j].slot != NO_SLOT; j = (j + 1) & mask) {
        size_t h = over_home(u, u->over[j].slot);

        if (((j - h) & mask) >= ((j - i) & mask)) {
            u->over[i] = u->over[j];
            u->over[j].slot = NO_SLOT;
            i = j;
        }
    }
}

static uint8_t *cell(const QdSlotUses *u, uint64_t slot)
{
    uint8_t *chunk = slot < u->max_slots ? u->chunks[slot / QD_SLOT_USES_CHUNK] : NULL;

    return chunk ? &chunk[slot % QD_SLOT_USES_CHUNK] : NULL;
}

uint64_t qd_slot_uses_count(const QdSlotUses *u, uint64_t slot)
{
    uint8_t *c = cell(u, slot);

    if (!c || *c != OVERFLOWED) {
        return c ? *c : 0;
    }
    return over_find(u, slot)->count;
}

int64_t qd_slot_uses_add(QdSlotUses *u, uint64_t slot)
{
    uint8_t *c;

    if (slot >= u->max_slots) {
        return -EINVAL;
    }
    if (!u->chunks[slot / QD_SLOT_USES_CHUNK]) {
        u->chunks[slot / QD_SLOT_USES_CHUNK] = calloc(QD_SLOT_USES_CHUNK, 1);
        if (!u->chunks[slot / QD_SLOT_USES_CHUNK]) {
            return -ENOMEM;
        }
    }
    c = cell(u, slot);
    if (*c == OVERFLOWED) {
        return ++over_find(u, slot)->count;
    }
    if (*c == OVERFLOWED - 1) {
        if (over_insert(u, slot, OVERFLOWED) < 0) {
            return -ENOMEM;
        }
        *c = OVERFLOWED;
        return OVERFLOWED;
    }
    u->distinct += *c == 0;
    return ++*c;
}

int64_t qd_slot_uses_drop(QdSlotUses *u, uint64_t slot)
{
    uint8_t *c = cell(u, slot);

    if (!c || *c == 0) {
        return -ENOENT;
    }
    if (*c == OVERFLOWED) {
        QdSlotUseOverflow *o = over_find(u, slot);

        if (--o->count >= OVERFLOWED) {
            return o->count;
        }
        over_remove(u, o);
        *c = OVERFLOWED - 1;
        return *c;
    }
    u->distinct -= *c == 1;
    return --*c;
}

void qd_slot_uses_forget(QdSlotUses *u, uint64_t slot)
{
    uint8_t *c = cell(u, slot);

    if (!c || *c == 0) {
        return;
    }
    if (*c == OVERFLOWED) {
        over_remove(u, over_find(u, slot));
    }
    *c = 0;
    u->distinct--;
}

void qd_slot_uses_foreach(const QdSlotUses *u,
                          void (*fn)(uint64_t slot, uint64_t uses, void *opaque),
                          void *opaque)
{
    for (uint64_t k = 0; k < u->nchunks; k++) {
        const uint8_t *chunk = u->chunks[k];

        for (uint32_t i = 0; chunk && i < QD_SLOT_USES_CHUNK; i++) {
            if (chunk[i]) {
                uint64_t slot = k * QD_SLOT_USES_CHUNK + i;

                fn(slot, qd_slot_uses_count(u, slot), opaque);
            }
        }
    }
}

size_t qd_slot_uses_bytes(const QdSlotUses *u)
{
    size_t bytes = u->nchunks * sizeof(*u->chunks) + u->over_cap * sizeof(*u->over);

    for (uint64_t k = 0; k < u->nchunks; k++) {
        bytes += u->chunks[k] ? QD_SLOT_USES_CHUNK : 0;
    }
    return bytes;
}

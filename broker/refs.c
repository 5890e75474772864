/* SPDX-License-Identifier: GPL-2.0-or-later */
/* Per-client references (see refs.h). */
#include "refs.h"

#define CHUNK_SLOTS 32768u      /* 4 KiB of bitmap */
#define WORDS (CHUNK_SLOTS / 64)

void refs_init(ClientRefs *r, uint64_t max_slots)
{
    r->nchunks = (max_slots + CHUNK_SLOTS - 1) / CHUNK_SLOTS;
    r->chunks = g_new0(uint64_t *, r->nchunks);
    r->held = 0;
}

void refs_destroy(ClientRefs *r)
{
    for (uint64_t i = 0; i < r->nchunks; i++) {
        g_free(r->chunks[i]);
    }
    g_free(r->chunks);
    r->chunks = NULL;
    r->nchunks = r->held = 0;
}

static uint64_t *word(const ClientRefs *r, uint64_t slot)
{
    uint64_t *chunk = slot / CHUNK_SLOTS < r->nchunks ? r->chunks[slot / CHUNK_SLOTS] : NULL;

    return chunk ? &chunk[slot % CHUNK_SLOTS / 64] : NULL;
}

gboolean refs_held(const ClientRefs *r, uint64_t slot)
{
    uint64_t *w = word(r, slot);

    return w && (*w >> (slot % 64) & 1);
}

gboolean refs_add(ClientRefs *r, uint64_t slot)
{
    uint64_t *w;

    if (slot / CHUNK_SLOTS >= r->nchunks || refs_held(r, slot)) {
        return FALSE;
    }
    if (!r->chunks[slot / CHUNK_SLOTS]) {
        r->chunks[slot / CHUNK_SLOTS] = g_new0(uint64_t, WORDS);
    }
    w = word(r, slot);
    *w |= 1ull << (slot % 64);
    r->held++;
    return TRUE;
}

gboolean refs_remove(ClientRefs *r, uint64_t slot)
{
    if (!refs_held(r, slot)) {
        return FALSE;
    }
    *word(r, slot) &= ~(1ull << (slot % 64));
    r->held--;
    return TRUE;
}

void refs_foreach(const ClientRefs *r, void (*fn)(uint64_t, void *), void *opaque)
{
    for (uint64_t c = 0; c < r->nchunks; c++) {
        if (!r->chunks[c]) {
            continue;
        }
        for (uint64_t w = 0; w < WORDS; w++) {
            for (uint64_t bits = r->chunks[c][w]; bits; bits &= bits - 1) {
                fn(c * CHUNK_SLOTS + w * 64 + __builtin_ctzll(bits), opaque);
            }
        }
    }
}

uint64_t refs_bytes(const ClientRefs *r)
{
    uint64_t bytes = r->nchunks * sizeof(uint64_t *);

    for (uint64_t c = 0; c < r->nchunks; c++) {
        bytes += r->chunks[c] ? WORDS * sizeof(uint64_t) : 0;
    }
    return bytes;
}

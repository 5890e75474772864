/* SPDX-License-Identifier: GPL-2.0-or-later */
/* Per-client references (see refs.h). */
#include "refs.h"

#define CHUNK_SLOTS 32768u      /* 4 KiB of bitmap */
#define WORDS (CHUNK_SLOTS / 64)

void refs_init(ClientRefs *r, uint64_t max_slots)
{
    r->nchunks = (max_slots + CHUNK_SLOTS - 1) / CHUNK_SLOTS;
    r->chunks = g_new0(uint64_t *, r->nchunks);
    r->extra = g_hash_table_new(g_direct_hash, g_direct_equal);
    r->distinct = r->total = 0;
}

void refs_destroy(ClientRefs *r)
{
    for (uint64_t i = 0; i < r->nchunks; i++) {
        g_free(r->chunks[i]);
    }
    g_free(r->chunks);
    g_hash_table_destroy(r->extra);
    r->chunks = NULL;
    r->extra = NULL;
}

static uint64_t *word(const ClientRefs *r, uint64_t slot)
{
    uint64_t *chunk = slot / CHUNK_SLOTS < r->nchunks ? r->chunks[slot / CHUNK_SLOTS] : NULL;

    return chunk ? &chunk[slot % CHUNK_SLOTS / 64] : NULL;
}

static gboolean held(const ClientRefs *r, uint64_t slot)
{
    uint64_t *w = word(r, slot);

    return w && (*w >> (slot % 64) & 1);
}

void refs_add(ClientRefs *r, uint64_t slot)
{
    uint64_t *w;

    g_assert(slot / CHUNK_SLOTS < r->nchunks);
    r->total++;
    if (held(r, slot)) {
        gpointer key = GSIZE_TO_POINTER(slot);
        guint n = GPOINTER_TO_UINT(g_hash_table_lookup(r->extra, key));

        g_hash_table_insert(r->extra, key, GUINT_TO_POINTER(n + 1));
        return;
    }
    if (!r->chunks[slot / CHUNK_SLOTS]) {
        r->chunks[slot / CHUNK_SLOTS] = g_new0(uint64_t, WORDS);
    }
    w = word(r, slot);
    *w |= 1ull << (slot % 64);
    r->distinct++;
}

gboolean refs_remove(ClientRefs *r, uint64_t slot)
{
    gpointer key = GSIZE_TO_POINTER(slot);
    guint n;

    if (!held(r, slot)) {
        return FALSE;
    }
    r->total--;
    n = GPOINTER_TO_UINT(g_hash_table_lookup(r->extra, key));
    if (n > 1) {
        g_hash_table_insert(r->extra, key, GUINT_TO_POINTER(n - 1));
    } else if (n == 1) {
        g_hash_table_remove(r->extra, key);
    } else {
        *word(r, slot) &= ~(1ull << (slot % 64));
        r->distinct--;
    }
    return TRUE;
}

uint32_t refs_count(const ClientRefs *r, uint64_t slot)
{
    if (!held(r, slot)) {
        return 0;
    }
    return 1 + GPOINTER_TO_UINT(g_hash_table_lookup(r->extra, GSIZE_TO_POINTER(slot)));
}

void refs_foreach(const ClientRefs *r, void (*fn)(uint64_t, uint32_t, void *),
                  void *opaque)
{
    for (uint64_t c = 0; c < r->nchunks; c++) {
        if (!r->chunks[c]) {
            continue;
        }
        for (uint64_t w = 0; w < WORDS; w++) {
            for (uint64_t bits = r->chunks[c][w]; bits; bits &= bits - 1) {
                uint64_t slot = c * CHUNK_SLOTS + w * 64 + __builtin_ctzll(bits);

                fn(slot, refs_count(r, slot), opaque);
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
    /* GHashTable: about 3 words per entry. */
    return bytes + g_hash_table_size(r->extra) * 3 * sizeof(void *);
}

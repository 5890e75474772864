/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * A growable bitmap: words are allocated up to the highest bit ever set, so
 * a pool of 16 GiB whose domain uses 1 MiB costs a few words, not 512 KiB.
 * Bits past the allocated words read as zero.
 */
#ifndef QDEDUP_BROKER_BITMAP_H
#define QDEDUP_BROKER_BITMAP_H

#include <glib.h>
#include <stdint.h>
#include <string.h>

typedef struct Bitmap {
    uint64_t *words;
    uint64_t nwords;
} Bitmap;

static inline gboolean bitmap_test(const Bitmap *b, uint64_t i)
{
    return i / 64 < b->nwords && (b->words[i / 64] >> (i % 64) & 1);
}

static inline uint64_t bitmap_word(const Bitmap *b, uint64_t w)
{
    return w < b->nwords ? b->words[w] : 0;
}

static inline void bitmap_set(Bitmap *b, uint64_t i)
{
    if (i / 64 >= b->nwords) {
        /* Grow by an eighth at least, as the slot table does. */
        uint64_t n = MAX(i / 64 + 1, b->nwords + b->nwords / 8 + 8);

        b->words = g_renew(uint64_t, b->words, n);
        memset(b->words + b->nwords, 0, (n - b->nwords) * sizeof(uint64_t));
        b->nwords = n;
    }
    b->words[i / 64] |= 1ull << (i % 64);
}

static inline void bitmap_clear(Bitmap *b, uint64_t i)
{
    if (i / 64 < b->nwords) {
        b->words[i / 64] &= ~(1ull << (i % 64));
    }
}

static inline void bitmap_free(Bitmap *b)
{
    g_free(b->words);
    b->words = NULL;
    b->nwords = 0;
}

static inline uint64_t bitmap_bytes(const Bitmap *b)
{
    return b->nwords * sizeof(uint64_t);
}

#endif

/* SPDX-License-Identifier: GPL-2.0-or-later */
/* Candidate hashes, two generations of open-addressing tables (candidates.h). */
#include <glib.h>

#include "candidates.h"

#define MIN_CAPACITY 64

static uint32_t fold(uint64_t cookie)
{
    return (uint32_t)cookie ^ (uint32_t)(cookie >> 32);
}

static void gen_init(CandGen *g, uint64_t capacity)
{
    g->cells = g_new0(CandEntry, capacity);
    g->mask = capacity - 1;
    g->count = 0;
}

static CandEntry *gen_find(const CandGen *g, uint64_t key, uint64_t *probes)
{
    for (uint64_t i = key & g->mask;; i = (i + 1) & g->mask) {
        (*probes)++;
        if (g->cells[i].key == key) {
            return &g->cells[i];
        }
        if (g->cells[i].key == 0) {
            return NULL;
        }
    }
}

static void gen_put(CandGen *g, CandEntry e)
{
    uint64_t i = e.key & g->mask;

    while (g->cells[i].key) {
        i = (i + 1) & g->mask;
    }
    g->cells[i] = e;
    g->count++;
}

static void gen_grow(CandGen *g)
{
    CandGen old = *g;

    gen_init(g, (old.mask + 1) * 2);
    for (uint64_t i = 0; i <= old.mask; i++) {
        if (old.cells[i].key) {
            gen_put(g, old.cells[i]);
        }
    }
    g_free(old.cells);
}

static void gen_insert(CandGen *g, CandEntry e)
{
    if ((g->count + 1) * 4 > (g->mask + 1) * 3) {
        gen_grow(g);
    }
    gen_put(g, e);
}

/* Remove the entry at e, shifting its probe run back (no tombstones). */
static void gen_remove(CandGen *g, CandEntry *e)
{
    uint64_t i = e - g->cells;

    g->cells[i].key = 0;
    g->count--;
    for (uint64_t j = (i + 1) & g->mask; g->cells[j].key; j = (j + 1) & g->mask) {
        uint64_t h = g->cells[j].key & g->mask;

        if (((j - h) & g->mask) >= ((j - i) & g->mask)) {
            g->cells[i] = g->cells[j];
            g->cells[j].key = 0;
            i = j;
        }
    }
}

void candidates_init(Candidates *c)
{
    gen_init(&c->cur, MIN_CAPACITY);
    gen_init(&c->prev, MIN_CAPACITY);
    c->gen = 1;
    c->probes = 0;
}

void candidates_destroy(Candidates *c)
{
    g_free(c->cur.cells);
    g_free(c->prev.cells);
}

/* May the client place one more entry in the current generation? */
static gboolean budget_take(CandBudget *b, uint64_t gen)
{
    if (b->gen != gen) {
        b->gen = gen;
        b->placed = 0;
    }
    if (b->max && b->placed >= b->max) {
        b->refused++;
        return FALSE;
    }
    b->placed++;
    return TRUE;
}

CandResult candidates_check(Candidates *c, uint64_t kh, uint32_t owner, uint64_t cookie,
                            CandBudget *budget, uint64_t gen)
{
    CandEntry want = { .key = kh, .owner = owner, .cookie = fold(cookie) };
    CandEntry *e = gen_find(&c->cur, want.key, &c->probes);

    if (!e) {
        e = gen_find(&c->prev, want.key, &c->probes);
        if (e && e->owner == owner && e->cookie == want.cookie) {
            /* Still alive: carry it into the current generation. */
            CandEntry keep = *e;

            if (!budget_take(budget, gen)) {
                return CAND_SEEN;   /* it stays in prev until rotation */
            }
            gen_remove(&c->prev, e);
            gen_insert(&c->cur, keep);
            return CAND_SEEN;
        }
    }
    if (!e) {
        if (!budget_take(budget, gen)) {
            return CAND_OVER;
        }
        gen_insert(&c->cur, want);
        return CAND_NEW;
    }
    if (e->owner == want.owner && e->cookie == want.cookie) {
        return CAND_SEEN;
    }
    return CAND_MATCH;
}

/* Give memory back when most candidates became slots. */
static void gen_shrink(CandGen *g)
{
    CandGen old = *g;

    if (old.mask + 1 <= MIN_CAPACITY || old.count * 8 >= old.mask + 1) {
        return;
    }
    gen_init(g, (old.mask + 1) / 2);
    for (uint64_t i = 0; i <= old.mask; i++) {
        if (old.cells[i].key) {
            gen_put(g, old.cells[i]);
        }
    }
    g_free(old.cells);
}

void candidates_forget(Candidates *c, uint64_t key)
{
    CandEntry *e;

    if ((e = gen_find(&c->cur, key, &c->probes))) {
        gen_remove(&c->cur, e);
        gen_shrink(&c->cur);
    }
    if ((e = gen_find(&c->prev, key, &c->probes))) {
        gen_remove(&c->prev, e);
        gen_shrink(&c->prev);
    }
}

void candidates_rotate(Candidates *c)
{
    uint64_t cap = MIN_CAPACITY;

    /* Size the new generation for about as many entries as the last one. */
    while (cap * 3 < c->cur.count * 4) {
        cap *= 2;
    }
    g_free(c->prev.cells);
    c->prev = c->cur;
    gen_init(&c->cur, cap);
    c->gen++;
}

uint64_t candidates_count(const Candidates *c)
{
    return c->cur.count + c->prev.count;
}

uint64_t candidates_bytes(const Candidates *c)
{
    return (c->cur.mask + c->prev.mask + 2) * sizeof(CandEntry);
}

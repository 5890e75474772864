/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The references one client holds (ARCHITECTURE I2): for each slot, how
 * many of its pages map it.  A bitmap over the pool, allocated in chunks
 * as the client touches them (1 bit a slot), says whether it holds at least
 * one; the rare extra references (a page content repeated inside one VM)
 * are counted in a small hash table.  When the client goes away, walking
 * the bitmap releases everything it held.
 */
#ifndef QDEDUP_BROKER_REFS_H
#define QDEDUP_BROKER_REFS_H

#include <glib.h>
#include <stdint.h>

typedef struct ClientRefs {
    uint64_t **chunks;      /* chunk -> bitmap, NULL until used */
    uint64_t nchunks;
    GHashTable *extra;      /* slot -> references beyond the first */
    uint64_t distinct;      /* slots held */
    uint64_t total;         /* references held */
} ClientRefs;

void refs_init(ClientRefs *r, uint64_t max_slots);
void refs_destroy(ClientRefs *r);
void refs_add(ClientRefs *r, uint64_t slot);
/* FALSE (and nothing changed) if the client holds no reference to slot. */
gboolean refs_remove(ClientRefs *r, uint64_t slot);
uint32_t refs_count(const ClientRefs *r, uint64_t slot);
/* Call fn for each slot held, with the number of references. */
void refs_foreach(const ClientRefs *r, void (*fn)(uint64_t slot, uint32_t count,
                                                  void *opaque), void *opaque);
uint64_t refs_bytes(const ClientRefs *r);

#endif

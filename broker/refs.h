/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The references one client holds (ARCHITECTURE I2): one bit per slot of
 * its domain's pool, in chunks allocated as the client touches them.  One
 * reference per (client, slot), however many of its pages map the slot:
 * the client counts its own pages (include/qdedup/slot-uses.h), so no
 * request can drive a count the broker trusts.  When the client goes away,
 * walking the bitmap releases everything it held.
 */
#ifndef QDEDUP_BROKER_REFS_H
#define QDEDUP_BROKER_REFS_H

#include <glib.h>
#include <stdint.h>

typedef struct ClientRefs {
    uint64_t **chunks;      /* chunk -> bitmap, NULL until used */
    uint64_t nchunks;
    uint64_t held;          /* slots held */
} ClientRefs;

void refs_init(ClientRefs *r, uint64_t max_slots);
void refs_destroy(ClientRefs *r);
/* TRUE if the reference is new (FALSE: held already; nothing changed). */
gboolean refs_add(ClientRefs *r, uint64_t slot);
/* FALSE (and nothing changed) if the client holds no reference to slot. */
gboolean refs_remove(ClientRefs *r, uint64_t slot);
gboolean refs_held(const ClientRefs *r, uint64_t slot);
/* Call fn for each slot held. */
void refs_foreach(const ClientRefs *r, void (*fn)(uint64_t slot, void *opaque),
                  void *opaque);
uint64_t refs_bytes(const ClientRefs *r);

#endif

/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * A pool: the memfd of one trust domain's canonical pages, QD_PAGE_SIZE
 * slots, owned by the broker, mapped read-write shared here and handed to
 * the domain's clients read-only (ARCHITECTURE I1, I11).  Each domain has
 * its own, so a descriptor reveals nothing of another domain: not its
 * content (read, mmap), not its activity (fstat's blocks, SEEK_DATA).
 *
 * The file is sized to the maximum once (sparse); memory is used only by
 * slots written and is given back with FALLOC_FL_PUNCH_HOLE when a slot dies.
 */
#ifndef QDEDUP_BROKER_POOL_H
#define QDEDUP_BROKER_POOL_H

#include <glib.h>
#include <stdint.h>
#include <sys/types.h>

#include "bitmap.h"
#include "qdedup/protocol.h"

#define POOL_NO_SLOT UINT64_MAX

typedef struct Pool {
    int fd;                 /* read-write */
    /*
     * One read-only open file description for all the domain's clients:
     * passing the same one to each lets the broker recognise it in a
     * client's descriptor table later (kcmp), without taking it.
     */
    int ro_fd;
    uint8_t *map;           /* whole pool, MAP_SHARED */
    uint64_t max_slots;
    Bitmap used;            /* allocated slots */
    /*
     * After adoption: slots that held data then.  A client that has not
     * restored yet may map them: never reused, and punched only once no
     * process maps them (the recovery sweep asks the kernel).
     */
    Bitmap held;
    uint64_t nused, nheld;
    uint64_t low_free;      /* no free slot below this */
    uint64_t high_water;    /* no allocated slot at or above this */
    dev_t dev;
    ino_t ino;
} Pool;

/* Create a new pool of max_slots (memfd, chmod 0400). */
gboolean pool_create(Pool *p, uint64_t max_slots, GError **errp);
/*
 * Take over a pool after a broker restart, from ro_fd: a read-only
 * description of it taken from a client (the caller checked its identity).
 * On success the pool owns ro_fd and a new read-write descriptor, and every
 * populated slot is held.
 */
gboolean pool_adopt(Pool *p, int ro_fd, uint64_t max_slots, GError **errp);
void pool_destroy(Pool *p);

/* n consecutive free slots (lowest first); POOL_NO_SLOT when none. */
uint64_t pool_alloc_run(Pool *p, uint32_t n);
/* Mark a held slot used (restoring after a restart); FALSE if it is not held or used. */
gboolean pool_claim(Pool *p, uint64_t slot);
/* Free a slot: the memory goes back to the host (held slots: at the sweep). */
void pool_free(Pool *p, uint64_t slot);

static inline gboolean pool_slot_used(const Pool *p, uint64_t slot)
{
    return slot < p->max_slots && bitmap_test(&p->used, slot);
}

static inline gboolean pool_slot_held(const Pool *p, uint64_t slot)
{
    return slot < p->max_slots && bitmap_test(&p->held, slot);
}

static inline uint8_t *pool_page(Pool *p, uint64_t slot)
{
    return p->map + slot * QD_PAGE_SIZE;
}

/* Bytes of memory the pool's file really holds. */
uint64_t pool_resident_bytes(const Pool *p);

/*
 * The recovery sweep's two outcomes for a held slot: it stops being held
 * (only its references protect it from now on), or, unused and mapped by
 * nobody, it is punched as well.
 */
void pool_unhold(Pool *p, uint64_t slot);
void pool_punch_held(Pool *p, uint64_t slot);
uint64_t pool_bitmap_bytes(const Pool *p);

#endif

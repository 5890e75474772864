/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The pool: one memfd of QD_PAGE_SIZE slots, owned by the broker, mapped
 * read-write shared here and handed to clients read-only.  The file is
 * sized to the maximum once (sparse); memory is used only by slots written
 * and is given back with FALLOC_FL_PUNCH_HOLE when a slot dies.
 */
#ifndef QDEDUP_BROKER_POOL_H
#define QDEDUP_BROKER_POOL_H

#include <glib.h>
#include <stdint.h>
#include <sys/types.h>

#include "qdedup/protocol.h"

#define POOL_NO_SLOT UINT64_MAX

typedef struct Pool {
    int fd;                 /* read-write */
    uint8_t *map;           /* whole pool, MAP_SHARED */
    uint64_t max_slots;
    uint64_t *used;         /* bitmap of allocated slots */
    /*
     * After adoption, until the sweep: slots that held data then.  A client
     * that has not restored yet may map them: never reused or punched.
     */
    uint64_t *held;
    uint64_t nused;
    uint64_t low_free;      /* no free slot below this */
    uint64_t high_water;    /* no allocated slot at or above this */
    dev_t dev;
    ino_t ino;
} Pool;

/* Create a new pool of max_slots (memfd, chmod 0400). */
gboolean pool_create(Pool *p, uint64_t max_slots, GError **errp);
/*
 * Take over a pool handed back by a client after a broker restart: fd must
 * be a memfd inode owned by this user, of the same geometry.  On success
 * the pool owns a new read-write descriptor; fd is left to the caller.
 */
gboolean pool_adopt(Pool *p, int fd, uint64_t max_slots, GError **errp);
void pool_destroy(Pool *p);

/* A new read-only descriptor of the pool, for a client. */
int pool_open_readonly(Pool *p, GError **errp);

/* n consecutive free slots (lowest first); POOL_NO_SLOT when none. */
uint64_t pool_alloc_run(Pool *p, uint32_t n);
/* Mark a slot used (restoring after a restart); FALSE if it already is. */
gboolean pool_claim(Pool *p, uint64_t slot);
/* Free a slot: the memory goes back to the host. */
void pool_free(Pool *p, uint64_t slot);
gboolean pool_slot_used(const Pool *p, uint64_t slot);

static inline uint8_t *pool_page(Pool *p, uint64_t slot)
{
    return p->map + slot * QD_PAGE_SIZE;
}

/* Bytes of memory the pool's file really holds. */
uint64_t pool_resident_bytes(const Pool *p);
/*
 * The restart sweep: punch every slot that holds data and is not used, and
 * make the slots held since adoption free again; returns slots punched.
 */
uint64_t pool_punch_unused(Pool *p);

#endif

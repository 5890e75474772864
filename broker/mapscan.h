/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Who maps which pool slots, from the kernel's own account: the private
 * mappings of each pool inode in every process's /proc/PID/maps.  After a
 * broker restart this, not what clients say, decides which held slots may
 * be punched (ARCHITECTURE I2).  Shared mappings are left out: they are
 * read-only views (the engine's compare window, the broker's own map) that
 * read a punched slot as zeros harmlessly.
 *
 * The scan runs on its own thread ("dedup-mapscan"): reading the maps of a
 * QEMU with tens of thousands of VMAs takes milliseconds, and a hostile
 * process can hold its mmap lock to make the read wait.
 */
#ifndef QDEDUP_BROKER_MAPSCAN_H
#define QDEDUP_BROKER_MAPSCAN_H

#include <glib.h>
#include <stdint.h>
#include <sys/types.h>

typedef struct MapScanPool {
    uint64_t dev, ino;
    uint32_t domain_id;
} MapScanPool;

typedef struct MapRange {
    pid_t pid;
    guint pool;             /* index into the request's pools */
    uint64_t first, n;      /* slots */
} MapRange;

typedef struct MapScan {
    GArray *pools;          /* MapScanPool, the request */
    GArray *ranges;         /* MapRange, the answer */
    GArray *unreadable;     /* pid_t whose maps could not be read (recovery.c decides) */
} MapScan;

/*
 * Scan /proc on a thread; done(scan, opaque) is then called on the main
 * context, and owns scan (mapscan_free).
 */
void mapscan_start(MapScan *scan, void (*done)(MapScan *scan, gpointer opaque),
                   gpointer opaque);
/* The same, synchronously (tests). */
void mapscan_run(MapScan *scan);
MapScan *mapscan_new(void);
void mapscan_free(MapScan *scan);

#endif

/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Recovery after a broker restart (ARCHITECTURE I2): when a client hands a
 * domain's pool back, every slot that holds data is *held*: not handed out
 * again and not punched, because any live process that was a client of the
 * previous broker may still map it, whatever it is doing now (paused,
 * unmerging, backed off, slow to reconnect).  Clients RESTORE the slots they
 * map; those get reference counts again.
 *
 * restart-grace seconds after the adoption, and then at growing intervals
 * while held slots remain, the broker asks the kernel who maps what
 * (mapscan.c) and settles each held slot:
 *  - mapped by no process, and not restored: punched, free again;
 *  - restored, and mapped only by processes that hold a reference to it:
 *    no longer held (its references protect it now);
 *  - mapped by a process that has not restored it: still held, so that
 *    process never reads zeros or another page, however late it restores.
 * If the scan could not read some process's maps, nothing is punched.
 */
#include <string.h>

#include "broker.h"
#include "mapscan.h"
#include "peer.h"

#define SWEEP_BACKOFF_MAX 6         /* restart-grace x 64 at most between scans */

void recovery_start(Broker *b, Domain *d)
{
    d->recovering = d->pool.nheld > 0;
    d->sweep_round = 0;
    d->sweep_at = d->recovering
        ? g_get_monotonic_time() + (gint64)b->cfg->restart_grace * G_USEC_PER_SEC : 0;
}

/* Clients of d by pid, for "does the process that maps it hold it?" */
static GHashTable *clients_by_pid(Broker *b, Domain *d)
{
    GHashTable *t = g_hash_table_new_full(g_direct_hash, g_direct_equal, NULL,
                                          (GDestroyNotify)g_slist_free);
    GHashTableIter it;
    gpointer v;

    g_hash_table_iter_init(&it, b->clients);
    while (g_hash_table_iter_next(&it, NULL, &v)) {
        BrokerClient *c = v;
        GSList *l;

        if (c->domain != d) {
            continue;
        }
        l = g_hash_table_lookup(t, GINT_TO_POINTER(c->pid));
        if (l) {
            g_hash_table_steal(t, GINT_TO_POINTER(c->pid));
        }
        g_hash_table_insert(t, GINT_TO_POINTER(c->pid), g_slist_prepend(l, c));
    }
    return t;
}

static gboolean pid_holds(GHashTable *by_pid, pid_t pid, uint64_t slot)
{
    for (GSList *l = g_hash_table_lookup(by_pid, GINT_TO_POINTER(pid)); l; l = l->next) {
        if (refs_held(&((BrokerClient *)l->data)->refs, slot)) {
            return TRUE;
        }
    }
    return FALSE;
}

static void settle_domain(Broker *b, Domain *d, MapScan *scan, guint pool, gboolean complete)
{
    g_autoptr(GHashTable) by_pid = clients_by_pid(b, d);
    Bitmap mapped = { 0 }, foreign = { 0 };
    GHashTable *strangers = g_hash_table_new(g_direct_hash, g_direct_equal);
    uint64_t punched = 0, released = 0;
    gint64 now = g_get_monotonic_time();

    for (guint i = 0; i < scan->ranges->len; i++) {
        MapRange *r = &g_array_index(scan->ranges, MapRange, i);
        uint64_t end = MIN(r->first + r->n, d->pool.max_slots);

        if (r->pool != pool) {
            continue;
        }
        for (uint64_t s = r->first; s < end; s++) {
            uint64_t w = bitmap_word(&d->pool.held, s / 64);

            if (!w) {
                s |= 63;    /* nothing held in this word */
                continue;
            }
            if (!(w >> (s % 64) & 1)) {
                continue;
            }
            bitmap_set(&mapped, s);
            if (!pid_holds(by_pid, r->pid, s)) {
                bitmap_set(&foreign, s);
                g_hash_table_add(strangers, GINT_TO_POINTER(r->pid));
            }
        }
    }
    if (complete) {
        for (uint64_t w = 0; w < d->pool.held.nwords; w++) {
            for (uint64_t bits = d->pool.held.words[w]; bits; bits &= bits - 1) {
                uint64_t s = w * 64 + __builtin_ctzll(bits);

                if (pool_slot_used(&d->pool, s)) {
                    if (!bitmap_test(&foreign, s)) {
                        pool_unhold(&d->pool, s);
                        released++;
                    }
                } else if (!bitmap_test(&mapped, s)) {
                    pool_punch_held(&d->pool, s);
                    punched++;
                }
                if (!d->pool.nheld) {
                    break;
                }
            }
            if (!d->pool.nheld) {
                break;
            }
        }
        b->stats.frees += punched;
    }
    d->recovering = d->pool.nheld > 0;
    if (d->recovering) {
        d->sweep_round = MIN(d->sweep_round + 1, SWEEP_BACKOFF_MAX);
        d->sweep_at = now + ((gint64)b->cfg->restart_grace << d->sweep_round) * G_USEC_PER_SEC;
        g_message("recovery of %s: %" G_GUINT64_FORMAT " slots punched, %" G_GUINT64_FORMAT
                  " released to their references; %" G_GUINT64_FORMAT " still held, mapped "
                  "by %u processes that have not restored them%s", *d->name ? d->name :
                  "a private domain", punched, released, d->pool.nheld,
                  g_hash_table_size(strangers),
                  complete ? "" : " (some processes' maps were unreadable: nothing punched)");
    } else {
        d->sweep_at = 0;
        g_message("recovery of %s complete: %" G_GUINT64_FORMAT " slots in use, %"
                  G_GUINT64_FORMAT " unclaimed slots freed", *d->name ? d->name :
                  "a private domain", d->pool.nused, punched);
    }
    bitmap_free(&mapped);
    bitmap_free(&foreign);
    g_hash_table_destroy(strangers);
    domain_maybe_free(b, d);
}

/*
 * Could this process map a pool?  Only if a broker gave it a descriptor:
 * one of our clients, or one the previous broker recorded (pid and start
 * time, restart.c).  Another process we cannot read (a container's init, a
 * more privileged daemon) has no pool to map.
 */
static gboolean may_map_pools(Broker *b, pid_t pid)
{
    uint64_t *start = g_hash_table_lookup(b->prev_clients, GUINT_TO_POINTER((guint)pid));
    GHashTableIter it;
    gpointer v;

    if (start && (!*start || *start == peer_start_time(pid))) {
        return TRUE;
    }
    g_hash_table_iter_init(&it, b->clients);
    while (g_hash_table_iter_next(&it, NULL, &v)) {
        if (((BrokerClient *)v)->pid == pid) {
            return TRUE;
        }
    }
    return FALSE;
}

static void scan_done(MapScan *scan, gpointer opaque)
{
    Broker *b = opaque;
    guint blind = 0;
    pid_t first = 0;
    gboolean complete;

    b->scanning = FALSE;
    for (guint i = 0; i < scan->unreadable->len; i++) {
        pid_t pid = g_array_index(scan->unreadable, pid_t, i);

        if (may_map_pools(b, pid)) {
            first = blind++ ? first : pid;
        }
    }
    complete = blind == 0;
    if (!complete) {
        g_warning("recovery: cannot read /proc/PID/maps of %u clients (pid %d first): "
                  "held slots stay held (the broker needs root or CAP_SYS_PTRACE)",
                  blind, (int)first);
    }
    for (guint i = 0; i < scan->pools->len; i++) {
        MapScanPool *p = &g_array_index(scan->pools, MapScanPool, i);
        Domain *d = g_hash_table_lookup(b->domain_ids, GUINT_TO_POINTER(p->domain_id));

        if (d && d->recovering && d->pool.ino == p->ino && d->pool.dev == p->dev) {
            settle_domain(b, d, scan, i, complete);
        }
    }
    mapscan_free(scan);
}

void recovery_tick(Broker *b, gint64 now)
{
    MapScan *scan = NULL;
    GHashTableIter it;
    gpointer v;

    if (b->scanning) {
        return;
    }
    g_hash_table_iter_init(&it, b->domain_ids);
    while (g_hash_table_iter_next(&it, NULL, &v)) {
        Domain *d = v;

        if (d->recovering && d->sweep_at && now >= d->sweep_at) {
            MapScanPool p = { d->pool.dev, d->pool.ino, d->id };

            if (!scan) {
                scan = mapscan_new();
            }
            g_array_append_val(scan->pools, p);
        }
    }
    if (scan) {
        b->scanning = TRUE;
        mapscan_start(scan, scan_done, b);
    }
}

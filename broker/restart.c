/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Surviving a broker restart without losing guest data or pool memory.
 *
 * A pool is a memfd: it outlives the broker as long as a client maps it or
 * holds its descriptor, but nobody can name it.  So the broker records, in
 * a small state file next to its socket, each pool's identity (device and
 * inode) and its domain: a named domain's name, or that it was private.
 * Each slot belongs to its pool's domain, so this records every slot's
 * domain.  It is rewritten (at the next second's tick) when a pool is made,
 * taken back or freed; a pool made just before a crash and not yet written
 * is only forgotten, which costs sharing, never data.  A new broker that
 * finds the file waits, per pool, restart-grace
 * seconds for a previous client of that domain to reconnect (HELLO with
 * QD_HELLO_RECONNECT, naming its pool descriptor) and takes the pool back
 * from the client's descriptor table (ops.c, peer.c); meanwhile new clients
 * of a named domain get RETRY.  Recovery then goes on in recovery.c.  A
 * pool nobody hands back in time is forgotten: its clients keep their
 * merged pages (private mappings stay valid) and are told POOL_CHANGED.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "broker.h"
#include "peer.h"

#define STATE_HEADER \
    "# qemu-dedup-broker: the pools its clients may hand back after a restart\n"

void restart_read_state(Broker *b)
{
    g_autoptr(GKeyFile) kf = g_key_file_new();
    g_autoptr(GError) err = NULL;
    g_auto(GStrv) groups = NULL;
    gint64 deadline = g_get_monotonic_time() +
                      (gint64)b->cfg->restart_grace * G_USEC_PER_SEC;

    if (!g_key_file_load_from_file(kf, b->cfg->state_path, G_KEY_FILE_NONE, &err)) {
        if (!g_error_matches(err, G_FILE_ERROR, G_FILE_ERROR_NOENT)) {
            g_warning("%s: not a broker state file (%s); ignored", b->cfg->state_path,
                      err->message);
        }
        return;
    }
    groups = g_key_file_get_groups(kf, NULL);
    {
        g_auto(GStrv) procs = g_key_file_get_string_list(kf, "clients", "processes", NULL,
                                                         NULL);

        for (char **p = procs; p && *p; p++) {
            guint64 pid, start = 0;

            if (sscanf(*p, "%" G_GUINT64_FORMAT ":%" G_GUINT64_FORMAT, &pid, &start) >= 1 &&
                pid > 0 && pid < G_MAXINT) {
                g_hash_table_insert(b->prev_clients, GUINT_TO_POINTER((guint)pid),
                                    g_memdup2(&start, sizeof(start)));
            }
        }
    }
    for (char **g = groups; *g; g++) {
        if (!strcmp(*g, "clients")) {
            continue;
        }
        PendingPool *pp;
        g_autofree char *name = g_key_file_get_string(kf, *g, "domain", NULL);
        guint64 dev = g_key_file_get_uint64(kf, *g, "dev", NULL);
        guint64 ino = g_key_file_get_uint64(kf, *g, "ino", NULL);
        gboolean priv = g_key_file_get_boolean(kf, *g, "private", NULL);

        if (!g_str_has_prefix(*g, "pool ") || !ino || (!priv && (!name || !*name))) {
            g_warning("%s: [%s] is not a pool; ignored", b->cfg->state_path, *g);
            continue;
        }
        pp = g_new0(PendingPool, 1);
        pp->name = g_strdup(priv ? "" : name);
        pp->dev = dev;
        pp->ino = ino;
        pp->deadline = deadline;
        g_ptr_array_add(b->pending, pp);
    }
}

/*
 * Every process given a pool descriptor, by this broker or (until they are
 * gone) by the previous one: "pid:start-time".
 */
static void add_clients(Broker *b, GKeyFile *kf)
{
    g_autoptr(GPtrArray) list = g_ptr_array_new_with_free_func(g_free);
    GHashTableIter it;
    gpointer k, v;

    g_hash_table_iter_init(&it, b->clients);
    while (g_hash_table_iter_next(&it, NULL, &v)) {
        BrokerClient *c = v;

        if (c->domain) {
            g_ptr_array_add(list, g_strdup_printf("%d:%" G_GUINT64_FORMAT, (int)c->pid,
                                                  c->start_time));
        }
    }
    g_hash_table_iter_init(&it, b->prev_clients);
    while (g_hash_table_iter_next(&it, &k, &v)) {
        pid_t pid = GPOINTER_TO_UINT(k);
        uint64_t start = *(uint64_t *)v;

        if (peer_start_time(pid) == start || (!start && kill(pid, 0) == 0)) {
            g_ptr_array_add(list, g_strdup_printf("%d:%" G_GUINT64_FORMAT, (int)pid, start));
        } else {
            g_hash_table_iter_remove(&it);      /* exited: it maps nothing */
        }
    }
    if (list->len) {
        g_key_file_set_string_list(kf, "clients", "processes",
                                   (const char *const *)list->pdata, list->len);
    }
}

static void add_pool(GKeyFile *kf, guint n, const char *name, uint64_t dev, uint64_t ino)
{
    g_autofree char *group = g_strdup_printf("pool %u", n);

    if (*name) {
        g_key_file_set_string(kf, group, "domain", name);
    } else {
        g_key_file_set_boolean(kf, group, "private", TRUE);
    }
    g_key_file_set_uint64(kf, group, "dev", dev);
    g_key_file_set_uint64(kf, group, "ino", ino);
}

void restart_write_state(Broker *b)
{
    /* Written at the next tick: a client making domains costs no file writes. */
    b->state_dirty = TRUE;
}

void restart_flush_state(Broker *b)
{
    g_autoptr(GKeyFile) kf = g_key_file_new();
    g_autoptr(GError) err = NULL;
    g_autofree char *text = NULL, *data = NULL;
    GHashTableIter it;
    gpointer v;
    guint n = 0;

    if (!b->state_dirty || b->stopping_state_frozen) {
        return;
    }
    b->state_dirty = FALSE;
    g_hash_table_iter_init(&it, b->domain_ids);
    while (g_hash_table_iter_next(&it, NULL, &v)) {
        Domain *d = v;

        add_pool(kf, n++, d->name, d->pool.dev, d->pool.ino);
    }
    for (guint i = 0; i < b->pending->len; i++) {
        PendingPool *pp = g_ptr_array_index(b->pending, i);

        add_pool(kf, n++, pp->name, pp->dev, pp->ino);
    }
    add_clients(b, kf);
    if (!n) {
        if (unlink(b->cfg->state_path) < 0 && errno != ENOENT) {
            g_warning("cannot remove %s: %s", b->cfg->state_path, g_strerror(errno));
        }
        return;
    }
    data = g_key_file_to_data(kf, NULL, NULL);
    text = g_strconcat(STATE_HEADER, data, NULL);
    if (!g_file_set_contents(b->cfg->state_path, text, -1, &err)) {
        g_warning("cannot write %s (a restart will not recover the pools): %s",
                  b->cfg->state_path, err->message);
    }
}

/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Surviving a broker restart without losing guest data or pool memory.
 *
 * The pool is a memfd: it outlives the broker as long as a client maps it
 * or holds its descriptor, but nobody can name it.  So the broker records
 * the pool's identity (device and inode) in a small state file next to its
 * socket.  A new broker that finds the file does not create a pool at once:
 * for restart-grace seconds it answers new clients RETRY and waits for a
 * previous client to reconnect and hand the pool back (HELLO with
 * QD_HELLO_RECONNECT and the descriptor).  The inode must match the state
 * file and belong to the broker's user (pool.c checks), then the broker
 * reopens it writable and adopts it.  Every client re-registers what it
 * maps (RESTORE: slot and hash; the broker re-hashes the slot and rebuilds
 * index and reference counts).  restart-grace seconds after the adoption,
 * slots nobody claimed are punched, so nothing leaks.  If nobody hands the
 * pool back in time, a new pool is made; clients of the old one keep their
 * merged pages (private mappings stay valid) and are told POOL_CHANGED.
 */
#include <errno.h>
#include <stdio.h>
#include <unistd.h>

#include "broker.h"

gboolean restart_read_state(Broker *b)
{
    g_autofree char *text = NULL;
    unsigned long long dev, ino;

    if (!g_file_get_contents(b->cfg->state_path, &text, NULL, NULL)) {
        return FALSE;
    }
    if (sscanf(text, "pool-dev=%llu pool-ino=%llu", &dev, &ino) != 2) {
        g_warning("%s: not a broker state file; ignored", b->cfg->state_path);
        return FALSE;
    }
    b->state_dev = dev;
    b->state_ino = ino;
    return TRUE;
}

void restart_write_state(Broker *b)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *text = g_strdup_printf(
        "pool-dev=%llu pool-ino=%llu\n"
        "# qemu-dedup-broker: identity of the pool its clients may hand back\n",
        (unsigned long long)b->pool.dev, (unsigned long long)b->pool.ino);

    if (!g_file_set_contents(b->cfg->state_path, text, -1, &err)) {
        g_warning("cannot write %s (a restart will not recover the pool): %s",
                  b->cfg->state_path, err->message);
    }
}

void restart_clear_state(Broker *b)
{
    if (unlink(b->cfg->state_path) < 0 && errno != ENOENT) {
        g_warning("cannot remove %s: %s", b->cfg->state_path, g_strerror(errno));
    }
}

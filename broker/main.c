/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * qemu-dedup-broker: the per-host owner of qdedup's page pool.
 * Runs in the foreground on a glib main loop; logs to standard error (the
 * journal under systemd); stops cleanly on SIGTERM/SIGINT.
 */
#include <glib-unix.h>
#include <signal.h>
#include <stdio.h>

#include "broker.h"
#include "control.h"
#include "server.h"

typedef struct Daemon {
    Broker broker;
    Server server;
    Control control;
    GMainLoop *loop;
} Daemon;

static gboolean on_signal(gpointer opaque)
{
    Daemon *d = opaque;

    g_message("stopping");
    g_main_loop_quit(d->loop);
    return G_SOURCE_REMOVE;
}

static gboolean on_second(gpointer opaque)
{
    Daemon *d = opaque;
    gint64 now = g_get_monotonic_time();

    broker_tick(&d->broker, now);
    server_tick(&d->server, now);
    control_sample(&d->control, now);
    return G_SOURCE_CONTINUE;
}

static gboolean on_rotate(gpointer opaque)
{
    broker_rotate_candidates(&((Daemon *)opaque)->broker);
    return G_SOURCE_CONTINUE;
}

int main(int argc, char **argv)
{
    g_autoptr(GError) err = NULL;
    BrokerConfig cfg;
    Daemon d = { 0 };

    signal(SIGPIPE, SIG_IGN);
    if (!config_load(&cfg, &argc, &argv, &err)) {
        fprintf(stderr, "qemu-dedup-broker: %s\n", err->message);
        return 2;
    }
    if (!broker_init(&d.broker, &cfg, &err) ||
        !server_start(&d.server, &d.broker, &err) ||
        !control_start(&d.control, &d.broker, &err)) {
        fprintf(stderr, "qemu-dedup-broker: %s\n", err->message);
        return 1;
    }
    g_message("qemu-dedup-broker %s: clients on %s, control on %s, a pool per trust "
              "domain up to %" G_GUINT64_FORMAT " MiB, up to %u clients, XXH3 %s",
              QDEDUP_VERSION, cfg.socket_path, cfg.control_path,
              cfg.pool_max * QD_PAGE_SIZE >> 20, d.server.max_clients, qd_hash_variant());

    d.loop = g_main_loop_new(NULL, FALSE);
    g_unix_signal_add(SIGTERM, on_signal, &d);
    g_unix_signal_add(SIGINT, on_signal, &d);
    g_timeout_add_seconds(1, on_second, &d);
    g_timeout_add_seconds(cfg.candidate_lifetime, on_rotate, &d);
    g_main_loop_run(d.loop);

    server_stop(&d.server);
    control_stop(&d.control);
    /* The pools' identities stay in the state file: their clients hand them back. */
    restart_write_state(&d.broker);
    restart_flush_state(&d.broker);
    d.broker.stopping_state_frozen = TRUE;
    broker_destroy(&d.broker);
    config_free(&cfg);
    g_main_loop_unref(d.loop);
    return 0;
}

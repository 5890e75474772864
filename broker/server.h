/* SPDX-License-Identifier: GPL-2.0-or-later */
/* The client socket and its event handling (see server.c). */
#ifndef QDEDUP_BROKER_SERVER_H
#define QDEDUP_BROKER_SERVER_H

#include <glib.h>

#include "broker.h"
#include "uid-limits.h"

typedef struct Server {
    Broker *broker;
    int sock;
    gboolean activated;     /* sock came from systemd: its file is not ours */
    guint watch;
    guint resume;           /* accept paused (out of descriptors) until this fires */
    Limits limits;
    guint max_clients;      /* connections and orphans, from RLIMIT_NOFILE */
    LogLimiter auth_log, refuse_log, fd_log, protocol_log;
} Server;

gboolean server_start(Server *s, Broker *b, GError **errp);
void server_stop(Server *s);
/* Every second: handshake timeouts, orphans without a pidfd, limits. */
void server_tick(Server *s, gint64 now);

/* A listening unix socket at path (parent created, stale socket replaced). */
int server_listen(const char *path, int type, guint mode, GError **errp);

#endif

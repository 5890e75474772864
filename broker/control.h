/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The control socket: operators' view of the broker, one JSON request per
 * connection ({"command": "stats" | "clients" | "domains"}), one JSON reply.
 * qemu-dedup-ctl speaks it; see docs/broker.md for the members.
 */
#ifndef QDEDUP_BROKER_CONTROL_H
#define QDEDUP_BROKER_CONTROL_H

#include <glib.h>

#include "broker.h"

typedef struct Control {
    Broker *broker;
    int sock;
    guint watch;
    /* lookups per second, over the last few seconds */
    uint64_t last_lookups;
    gint64 last_time;
    double lookup_rate;
} Control;

gboolean control_start(Control *ctl, Broker *b, GError **errp);
void control_stop(Control *ctl);
/* Called every second to keep rates current. */
void control_sample(Control *ctl, gint64 now);
/* The reply to a request (exposed for tests); caller frees. */
char *control_reply(Control *ctl, const char *request);

#endif

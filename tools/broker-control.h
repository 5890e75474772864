/* SPDX-License-Identifier: GPL-2.0-or-later */
#ifndef QDEDUP_TOOLS_BROKER_CONTROL_H
#define QDEDUP_TOOLS_BROKER_CONTROL_H

#include <json-glib/json-glib.h>

#define DEFAULT_CONTROL "/run/qemu-dedup/control.sock"

/* COMMAND on the control socket at PATH: the raw reply, or NULL and *errp. */
char *broker_control_ask(const char *path, const char *command, GError **errp);
/* The same, parsed with PARSER: the reply's "return" object (owned by PARSER). */
JsonObject *broker_control_return(JsonParser *parser, const char *path, const char *command,
                                  GError **errp);

#endif

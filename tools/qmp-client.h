/* SPDX-License-Identifier: GPL-2.0-or-later */
#ifndef QDEDUP_TOOLS_QMP_CLIENT_H
#define QDEDUP_TOOLS_QMP_CLIENT_H

#include <json-glib/json-glib.h>

typedef struct QmpClient QmpClient;

/* Connect to a QEMU's QMP socket and leave capabilities negotiation. */
QmpClient *qmp_client_connect(const char *path, GError **errp);
/* Run COMMAND (no arguments); its "return" value (json_node_unref it). */
JsonNode *qmp_client_execute(QmpClient *q, const char *command, GError **errp);
void qmp_client_free(QmpClient *q);

#endif

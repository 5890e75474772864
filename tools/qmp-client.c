/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * A minimal QMP client over a unix socket: the greeting, qmp_capabilities,
 * then one command at a time.  Events that arrive in between are skipped.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "qmp-client.h"

struct QmpClient {
    int sock;
    GString *buf;           /* bytes read past the last line */
    JsonParser *parser;
};

/* The next JSON object from the socket, or NULL (closed, error, timeout). */
static JsonObject *read_object(QmpClient *q)
{
    for (;;) {
        char *nl = memchr(q->buf->str, '\n', q->buf->len);
        char chunk[4096];
        ssize_t n;

        if (nl) {
            g_autofree char *line = g_strndup(q->buf->str, nl - q->buf->str);
            JsonNode *root;

            g_string_erase(q->buf, 0, nl - q->buf->str + 1);
            if (!json_parser_load_from_data(q->parser, line, -1, NULL)) {
                continue;
            }
            root = json_parser_get_root(q->parser);
            if (root && JSON_NODE_HOLDS_OBJECT(root)) {
                return json_node_get_object(root);
            }
            continue;
        }
        n = recv(q->sock, chunk, sizeof(chunk), 0);
        if (n <= 0) {
            return NULL;
        }
        g_string_append_len(q->buf, chunk, n);
    }
}

QmpClient *qmp_client_connect(const char *path, GError **errp)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    struct timeval tv = { .tv_sec = 5 };
    QmpClient *q;
    JsonNode *caps;
    int sock;

    if (strlen(path) >= sizeof(sa.sun_path)) {
        g_set_error(errp, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT, "path too long: %s", path);
        return NULL;
    }
    strcpy(sa.sun_path, path);
    sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0 || connect(sock, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        g_set_error(errp, G_IO_ERROR, g_io_error_from_errno(errno),
                    "cannot connect to QMP at %s: %s", path, g_strerror(errno));
        if (sock >= 0) {
            close(sock);
        }
        return NULL;
    }
    setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    q = g_new0(QmpClient, 1);
    q->sock = sock;
    q->buf = g_string_new(NULL);
    q->parser = json_parser_new();
    if (!read_object(q)) {
        g_set_error(errp, G_IO_ERROR, G_IO_ERROR_FAILED, "%s: no QMP greeting", path);
        qmp_client_free(q);
        return NULL;
    }
    caps = qmp_client_execute(q, "qmp_capabilities", errp);
    if (!caps) {
        qmp_client_free(q);
        return NULL;
    }
    json_node_unref(caps);
    return q;
}

JsonNode *qmp_client_execute(QmpClient *q, const char *command, GError **errp)
{
    g_autofree char *req = g_strdup_printf("{\"execute\": \"%s\"}\n", command);
    JsonObject *o;

    if (send(q->sock, req, strlen(req), MSG_NOSIGNAL) < 0) {
        g_set_error(errp, G_IO_ERROR, g_io_error_from_errno(errno), "QMP: %s",
                    g_strerror(errno));
        return NULL;
    }
    while ((o = read_object(q))) {
        if (json_object_has_member(o, "return")) {
            return json_node_copy(json_object_get_member(o, "return"));
        }
        if (json_object_has_member(o, "error")) {
            JsonObject *e = json_object_get_object_member(o, "error");

            g_set_error(errp, G_IO_ERROR, G_IO_ERROR_FAILED, "%s: %s", command,
                        json_object_get_string_member_with_default(e, "desc", "error"));
            return NULL;
        }
        /* An event: not ours. */
    }
    g_set_error(errp, G_IO_ERROR, G_IO_ERROR_CLOSED, "QMP connection closed");
    return NULL;
}

void qmp_client_free(QmpClient *q)
{
    if (q) {
        close(q->sock);
        g_string_free(q->buf, TRUE);
        g_object_unref(q->parser);
        g_free(q);
    }
}

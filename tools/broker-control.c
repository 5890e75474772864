/* SPDX-License-Identifier: GPL-2.0-or-later */
/* One request on the broker's control socket (docs/broker.md, Control). */
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "broker-control.h"

char *broker_control_ask(const char *path, const char *command, GError **errp)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    g_autofree char *req = g_strdup_printf("{\"command\": \"%s\"}\n", command);
    GString *reply = g_string_new(NULL);
    char buf[4096];
    ssize_t n;
    int sock;

    if (strlen(path) >= sizeof(sa.sun_path)) {
        g_set_error(errp, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT, "path too long: %s", path);
        return g_string_free(reply, TRUE);
    }
    strcpy(sa.sun_path, path);
    sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0 || connect(sock, (struct sockaddr *)&sa, sizeof(sa)) < 0 ||
        send(sock, req, strlen(req), MSG_NOSIGNAL) < 0) {
        g_set_error(errp, G_IO_ERROR, g_io_error_from_errno(errno),
                    "cannot reach the broker at %s: %s", path, g_strerror(errno));
        if (sock >= 0) {
            close(sock);
        }
        return g_string_free(reply, TRUE);
    }
    while ((n = recv(sock, buf, sizeof(buf), 0)) > 0) {
        g_string_append_len(reply, buf, n);
    }
    close(sock);
    return g_string_free(reply, FALSE);
}

JsonObject *broker_control_return(JsonParser *parser, const char *path, const char *command,
                                  GError **errp)
{
    g_autofree char *reply = broker_control_ask(path, command, errp);
    JsonNode *root, *ret;

    if (!reply || (errp && *errp)) {
        return NULL;
    }
    if (!json_parser_load_from_data(parser, reply, -1, errp)) {
        return NULL;
    }
    root = json_parser_get_root(parser);
    if (!root || !JSON_NODE_HOLDS_OBJECT(root) ||
        !(ret = json_object_get_member(json_node_get_object(root), "return")) ||
        !JSON_NODE_HOLDS_OBJECT(ret)) {
        g_set_error(errp, G_IO_ERROR, G_IO_ERROR_INVALID_DATA,
                    "the broker's reply to %s is not what was expected", command);
        return NULL;
    }
    return json_node_get_object(ret);
}

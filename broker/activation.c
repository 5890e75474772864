/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * systemd socket activation (sd_listen_fds(3), without libsystemd): the
 * client socket may come from qemu-dedup-broker.socket as an inherited
 * descriptor named "broker".  systemd then owns the socket file, which
 * outlives broker restarts, so QEMUs reconnecting during a restart find it.
 */
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <glib.h>

#include "activation.h"

#define LISTEN_FDS_START 3

int activation_take(const char *name, int type)
{
    const char *pid = g_getenv("LISTEN_PID");
    const char *fds = g_getenv("LISTEN_FDS");
    g_auto(GStrv) names = g_strsplit(g_getenv("LISTEN_FDNAMES") ?: "", ":", -1);
    int n;

    if (!pid || !fds || strtol(pid, NULL, 10) != getpid()) {
        return -1;
    }
    n = atoi(fds);
    for (int i = 0; i < n; i++) {
        int fd = LISTEN_FDS_START + i, got = 0;
        socklen_t len = sizeof(got);

        /* Unnamed descriptors count as ours when there is just one. */
        if ((names[0] && g_strv_length(names) > (guint)i) ? strcmp(names[i], name) :
            n != 1) {
            continue;
        }
        if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &got, &len) < 0 || got != type) {
            continue;
        }
        fcntl(fd, F_SETFD, FD_CLOEXEC);
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
        return fd;
    }
    return -1;
}

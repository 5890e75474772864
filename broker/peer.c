/* SPDX-License-Identifier: GPL-2.0-or-later */
/* Looking at a client process through the kernel (see peer.h). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "peer.h"

#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77
#endif
#ifndef KCMP_FILE
#define KCMP_FILE 0
#endif

#define POOL_LINK "/memfd:qemu-dedup-pool"

int peer_pidfd(int sock, pid_t pid)
{
    int fd;
    socklen_t len = sizeof(fd);

    if (getsockopt(sock, SOL_SOCKET, SO_PEERPIDFD, &fd, &len) == 0) {
        return fd;
    }
    return syscall(SYS_pidfd_open, pid, 0);
}

gboolean peer_pidfd_alive(int pidfd)
{
    struct pollfd pfd = { .fd = pidfd, .events = POLLIN };

    /* A pidfd becomes readable when the process exits. */
    return poll(&pfd, 1, 0) == 0;
}

gboolean peer_holds_file(int pidfd, pid_t pid, uint32_t their_fd, int our_fd)
{
    /* pidfd alive after the comparison: pid was still this client's. */
    return pidfd >= 0 && their_fd <= INT32_MAX &&
           syscall(SYS_kcmp, getpid(), pid, KCMP_FILE, our_fd, (int)their_fd) == 0 &&
           peer_pidfd_alive(pidfd);
}

static gboolean link_is_pool(const char *path)
{
    char link[128];
    ssize_t n = readlink(path, link, sizeof(link) - 1);

    link[n > 0 ? n : 0] = 0;
    return g_str_has_prefix(link, POOL_LINK);
}

static gboolean fdinfo_ino(pid_t pid, uint32_t fd, uint64_t *ino)
{
    g_autofree char *path = g_strdup_printf("/proc/%d/fdinfo/%u", (int)pid, fd);
    g_autofree char *text = NULL;
    const char *p;

    if (!g_file_get_contents(path, &text, NULL, NULL) || !(p = strstr(text, "\nino:"))) {
        return FALSE;
    }
    *ino = g_ascii_strtoull(p + 5, NULL, 10);
    return TRUE;
}

int peer_take_pool(int pidfd, pid_t pid, uint32_t their_fd, uint64_t dev, uint64_t ino,
                   uid_t uid, char **msg)
{
    g_autofree char *theirs = g_strdup_printf("/proc/%d/fd/%u", (int)pid, their_fd);
    char ours[64];
    struct statx stx;
    uint64_t seen;
    int fd;

    /* First look without taking anything: the name and the inode. */
    if (pidfd < 0 || their_fd > INT32_MAX || !fdinfo_ino(pid, their_fd, &seen) ||
        seen != ino || !link_is_pool(theirs)) {
        *msg = g_strdup_printf("descriptor %u of pid %d is not the pool it names",
                               their_fd, (int)pid);
        return -1;
    }
    fd = syscall(SYS_pidfd_getfd, pidfd, (int)their_fd, 0);
    if (fd < 0) {
        *msg = g_strdup_printf("cannot take the pool from pid %d: %s (the broker needs "
                               "root or CAP_SYS_PTRACE)", (int)pid, g_strerror(errno));
        return -1;
    }
    /*
     * The client may have swapped the descriptor meanwhile: check our copy.
     * AT_STATX_DONT_SYNC answers from the inode without asking a file
     * server, so even a FUSE file cannot make this wait.
     */
    snprintf(ours, sizeof(ours), "/proc/self/fd/%d", fd);
    if (statx(fd, "", AT_EMPTY_PATH | AT_STATX_DONT_SYNC, STATX_TYPE | STATX_INO | STATX_UID,
              &stx) < 0 || !S_ISREG(stx.stx_mode) || stx.stx_ino != ino ||
        makedev(stx.stx_dev_major, stx.stx_dev_minor) != dev || stx.stx_uid != geteuid() ||
        !link_is_pool(ours)) {
        peer_close_later(fd, uid);
        *msg = g_strdup_printf("descriptor %u of pid %d is not the pool it names",
                               their_fd, (int)pid);
        return -1;
    }
    return fd;
}

uint64_t peer_start_time(pid_t pid)
{
    g_autofree char *path = g_strdup_printf("/proc/%d/stat", (int)pid);
    g_autofree char *text = NULL;
    const char *p;
    uint64_t t = 0;

    /* Field 22; the command name (field 2) may hold spaces and ')'. */
    if (g_file_get_contents(path, &text, NULL, NULL) && (p = strrchr(text, ')'))) {
        g_auto(GStrv) f = g_strsplit(p + 2, " ", 22);

        if (g_strv_length(f) >= 20) {
            t = g_ascii_strtoull(f[19], NULL, 10);
        }
    }
    return t;
}

/* ---- the closer thread ---------------------------------------------------- */

typedef struct CloseJob {
    int fd;
    uid_t uid;
} CloseJob;

static GAsyncQueue *close_queue;
static GMutex pending_lock;
static GHashTable *pending;     /* uid -> descriptors waiting */

static void pending_add(uid_t uid, int delta)
{
    guint n;

    g_mutex_lock(&pending_lock);
    if (!pending) {
        pending = g_hash_table_new(g_direct_hash, g_direct_equal);
    }
    n = GPOINTER_TO_UINT(g_hash_table_lookup(pending, GUINT_TO_POINTER(uid))) + delta;
    if (n) {
        g_hash_table_insert(pending, GUINT_TO_POINTER(uid), GUINT_TO_POINTER(n));
    } else {
        g_hash_table_remove(pending, GUINT_TO_POINTER(uid));
    }
    g_mutex_unlock(&pending_lock);
}

static gpointer closer_thread(gpointer opaque)
{
    for (;;) {
        CloseJob *j = g_async_queue_pop(close_queue);

        close(j->fd);
        pending_add(j->uid, -1);
        g_free(j);
    }
    return NULL;
}

void peer_close_later(int fd, uid_t uid)
{
    static gsize started;
    CloseJob *j = g_new(CloseJob, 1);

    if (g_once_init_enter(&started)) {
        close_queue = g_async_queue_new();
        g_thread_unref(g_thread_new("dedup-closer", closer_thread, NULL));
        g_once_init_leave(&started, 1);
    }
    j->fd = fd;
    j->uid = uid;
    pending_add(uid, 1);
    g_async_queue_push(close_queue, j);
}

guint peer_closes_pending(uid_t uid)
{
    guint n;

    g_mutex_lock(&pending_lock);
    n = pending ? GPOINTER_TO_UINT(g_hash_table_lookup(pending, GUINT_TO_POINTER(uid))) : 0;
    g_mutex_unlock(&pending_lock);
    return n;
}

/* SPDX-License-Identifier: GPL-2.0-or-later */
/* Protocol messages over SOCK_SEQPACKET unix sockets (see transport.h). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "qdedup/protocol.h"
#include "qdedup/transport.h"

int qd_send(int sock, const void *msg, size_t len, const void *const *pages,
            uint32_t npages, int fd)
{
    struct iovec iov[1 + QD_MAX_PUBLISH];
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } control;
    struct msghdr mh = { .msg_iov = iov, .msg_iovlen = 1 + npages };
    ssize_t n;

    if (npages > QD_MAX_PUBLISH) {
        return -EINVAL;
    }
    iov[0] = (struct iovec) { .iov_base = (void *)msg, .iov_len = len };
    for (uint32_t i = 0; i < npages; i++) {
        iov[1 + i] = (struct iovec) { .iov_base = (void *)pages[i],
                                      .iov_len = QD_PAGE_SIZE };
    }
    if (fd >= 0) {
        struct cmsghdr *c;

        memset(&control, 0, sizeof(control));
        mh.msg_control = control.buf;
        mh.msg_controllen = sizeof(control.buf);
        c = CMSG_FIRSTHDR(&mh);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof(int));
    }
    do {
        n = sendmsg(sock, &mh, MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        return -errno;
    }
    return 0;
}

ssize_t qd_recv(int sock, void *buf, size_t size, int *fd)
{
    struct iovec iov = { .iov_base = buf, .iov_len = size };
    union {
        char buf[CMSG_SPACE(sizeof(int) * 4)];
        struct cmsghdr align;
    } control;
    struct msghdr mh = {
        .msg_iov = &iov, .msg_iovlen = 1,
        .msg_control = control.buf, .msg_controllen = sizeof(control.buf),
    };
    ssize_t n;

    if (fd) {
        *fd = -1;
    }
    do {
        n = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        return -errno;
    }
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            size_t nfds = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);

            for (size_t i = 0; i < nfds; i++) {
                int f;

                memcpy(&f, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
                /* Keep the first fd if wanted; never leak extra ones. */
                if (fd && *fd < 0) {
                    *fd = f;
                } else {
                    close(f);
                }
            }
        }
    }
    if (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) {
        if (fd && *fd >= 0) {
            close(*fd);
            *fd = -1;
        }
        return -EMSGSIZE;
    }
    return n;
}

int qd_connect(const char *path)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    int sock;

    if (strlen(path) >= sizeof(sa.sun_path)) {
        return -ENAMETOOLONG;
    }
    strcpy(sa.sun_path, path);
    sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (sock < 0) {
        return -errno;
    }
    if (connect(sock, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        int err = errno;

        close(sock);
        return -err;
    }
    return sock;
}

/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Moving protocol messages over a SOCK_SEQPACKET unix socket: one message
 * per packet, optionally with PUBLISH pages gathered from where they lie and
 * one file descriptor (SCM_RIGHTS).  Used by the broker and by clients.
 */
#ifndef QDEDUP_TRANSPORT_H
#define QDEDUP_TRANSPORT_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/*
 * Send msg (len bytes), then npages pages of QD_PAGE_SIZE (may be NULL/0),
 * and fd (or -1), as one packet.  Returns 0 or -errno.
 */
int qd_send(int sock, const void *msg, size_t len, const void *const *pages,
            uint32_t npages, int fd);

/*
 * Receive one packet into buf.  Returns its length, 0 at end of stream, or
 * -errno; -EMSGSIZE if it did not fit (the packet is dropped).  A received
 * fd is stored in *fd (else -1); pass fd NULL to refuse (close) any fd.
 */
ssize_t qd_recv(int sock, void *buf, size_t size, int *fd);

/* Connect a SOCK_SEQPACKET socket to path; returns the fd or -errno. */
int qd_connect(const char *path);

#endif

/* SPDX-License-Identifier: GPL-2.0-or-later */
/* A synchronous broker client (see include/qdedup/client.h). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "qdedup/client.h"
#include "qdedup/transport.h"

/* Wait for the reply to the request just sent; decode it into *m. */
static int wait_reply(QdClient *c, uint32_t want_type, QdMessage *m, int *fd,
                      QdError *err)
{
    ssize_t n = qd_recv(c->sock, c->buf, QD_SMALL_MSG_MAX, fd);

    if (n == 0) {
        return -ECONNRESET;
    }
    if (n < 0) {
        return n;
    }
    if (qd_decode(c->buf, n, m) != QD_DECODE_OK) {
        return -EPROTO;
    }
    /* seq 0: the broker refused the connection itself (limits), before any request. */
    if (m->hdr.seq != c->seq && !(m->hdr.type == QD_MSG_ERROR && m->hdr.seq == 0)) {
        return -EPROTO;
    }
    if (m->hdr.type == QD_MSG_ERROR) {
        if (err) {
            *err = m->u.error;
        }
        return m->u.error.code;
    }
    return m->hdr.type == want_type ? 0 : -EPROTO;
}

/* The ERROR a broker sends as it refuses a connection; 0 if none came. */
static int wait_refusal(QdClient *c, QdError *err)
{
    ssize_t n = recv(c->sock, c->buf, QD_SMALL_MSG_MAX, MSG_DONTWAIT);
    QdMessage m;

    if (n > 0 && qd_decode(c->buf, n, &m) == QD_DECODE_OK && m.hdr.type == QD_MSG_ERROR) {
        if (err) {
            *err = m.u.error;
        }
        return m.u.error.code;
    }
    return 0;
}

/* Send buf[0..len) plus pages, wait for a reply of want_type. */
static int request(QdClient *c, size_t len, const void *const *pages, uint32_t npages,
                   uint32_t want_type, QdMessage *m, QdError *err)
{
    int ret;

    if (len == 0) {
        return -EINVAL;
    }
    ret = qd_send(c->sock, c->buf, len, pages, npages, -1);
    if (ret < 0) {
        return ret;
    }
    return wait_reply(c, want_type, m, NULL, err);
}

static int copy_results(const QdMessage *m, uint32_t n, QdResult *out)
{
    if (m->u.array.count != n) {
        return -EPROTO;
    }
    for (uint32_t i = 0; i < n; i++) {
        qd_result_at(m, i, &out[i]);
    }
    return 0;
}

int qd_client_open(QdClient *c, const char *path, const QdHello *hello, QdError *err)
{
    return qd_client_open_watched(c, path, hello, err, NULL, NULL);
}

int qd_client_open_watched(QdClient *c, const char *path, const QdHello *hello,
                           QdError *err, void (*watch)(void *opaque, int sock),
                           void *opaque)
{
    struct timeval tv = { .tv_sec = QD_CLIENT_TIMEOUT_S };
    QdMessage m;
    size_t len;
    int ret, fd = -1;

    memset(c, 0, sizeof(*c));
    c->sock = -1;
    c->pool_fd = -1;
    c->buf = malloc(QD_SMALL_MSG_MAX);
    if (!c->buf) {
        return -ENOMEM;
    }
    c->sock = qd_connect(path);
    if (c->sock < 0) {
        ret = c->sock;
        c->sock = -1;
        goto fail;
    }
    if (watch) {
        watch(opaque, c->sock);
    }
    /* A broker that accepts and never answers must not hold us. */
    setsockopt(c->sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(c->sock, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    c->seq = 1;
    len = qd_encode_hello(c->buf, QD_SMALL_MSG_MAX, c->seq, hello);
    ret = len ? qd_send(c->sock, c->buf, len, NULL, 0, -1) : -EINVAL;
    if (ret == 0) {
        ret = wait_reply(c, QD_MSG_HELLO_REPLY, &m, &fd, err);
    } else if (ret == -EPIPE || ret == -ECONNRESET) {
        /* Refused at once: the broker's reason may be waiting (seq 0). */
        int why = wait_refusal(c, err);

        ret = why ? why : ret;
    }
    if (ret != 0) {
        goto fail;
    }
    if (fd < 0) {
        ret = -EPROTO;
        goto fail;
    }
    c->info = m.u.hello_reply;
    c->pool_fd = fd;
    if (watch) {
        watch(opaque, -1);
    }
    return 0;

fail:
    if (watch && c->sock >= 0) {
        watch(opaque, -1);
    }
    if (fd >= 0) {
        close(fd);
    }
    qd_client_close(c);
    return ret;
}

void qd_client_close(QdClient *c)
{
    if (c->sock >= 0) {
        close(c->sock);
    }
    if (c->pool_fd >= 0) {
        close(c->pool_fd);
    }
    free(c->buf);
    c->buf = NULL;
    c->sock = -1;
    c->pool_fd = -1;
}

int qd_client_lookup(QdClient *c, const QdLookupEntry *e, uint32_t n,
                     QdResult *out, QdError *err)
{
    QdMessage m;
    int ret = request(c, qd_encode_lookup(c->buf, QD_SMALL_MSG_MAX, ++c->seq, e, n),
                      NULL, 0, QD_MSG_LOOKUP_REPLY, &m, err);

    return ret ? ret : copy_results(&m, n, out);
}

int qd_client_publish(QdClient *c, const QdLookupEntry *e,
                      const void *const *pages, uint32_t n,
                      QdResult *out, QdError *err)
{
    QdMessage m;
    size_t len = qd_encode_publish_meta(c->buf, QD_SMALL_MSG_MAX, ++c->seq, e, n);
    int ret = request(c, len, pages, n, QD_MSG_PUBLISH_REPLY, &m, err);

    return ret ? ret : copy_results(&m, n, out);
}

int qd_client_unref(QdClient *c, const uint64_t *slots, uint32_t n, QdError *err)
{
    QdMessage m;
    int ret = request(c, qd_encode_unref(c->buf, QD_SMALL_MSG_MAX, ++c->seq, slots, n),
                      NULL, 0, QD_MSG_OK, &m, err);

    if (ret == 0 && m.u.ok_count != n) {
        return -EPROTO;
    }
    return ret;
}

int qd_client_restore(QdClient *c, const QdRestoreEntry *e, uint32_t n,
                      QdResult *out, QdError *err)
{
    QdMessage m;
    int ret = request(c, qd_encode_restore(c->buf, QD_SMALL_MSG_MAX, ++c->seq, e, n),
                      NULL, 0, QD_MSG_RESTORE_REPLY, &m, err);

    return ret ? ret : copy_results(&m, n, out);
}

void *qd_client_map(QdClient *c, void *addr, uint64_t slot, size_t nslots)
{
    return mmap(addr, nslots * QD_PAGE_SIZE, PROT_READ | PROT_WRITE,
                MAP_PRIVATE | (addr ? MAP_FIXED : 0), c->pool_fd,
                (off_t)(slot * QD_PAGE_SIZE));
}

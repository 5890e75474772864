/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * A synchronous broker client: one request in flight, each call waits for
 * its reply.  Used by qdedup's test and benchmark programs; it has no
 * threads and no global state, so an engine can own one per connection.
 *
 * Return values of the request calls: 0 when the broker did what was asked
 * (per-entry results may still say MISS/QUOTA/...), a positive QdErrorCode
 * when the broker refused (err->message says why), or -errno when the
 * connection failed or the reply was malformed (-EPROTO).
 */
#ifndef QDEDUP_CLIENT_H
#define QDEDUP_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#include "qdedup/protocol.h"

/* Seconds a request (the HELLO included) waits for its reply. */
#define QD_CLIENT_TIMEOUT_S 5

typedef struct QdClient {
    int sock;
    int pool_fd;            /* read-only pool descriptor from HELLO_REPLY */
    uint32_t seq;
    QdHelloReply info;
    uint8_t *buf;           /* QD_SMALL_MSG_MAX bytes, for requests and replies */
} QdClient;

/*
 * Connect and say HELLO.  To hand the pool back when reconnecting, set
 * QD_HELLO_RECONNECT and hello->pool_fd to the descriptor number of the pool
 * kept from the previous connection (the broker inspects it; nothing is
 * sent).
 */
int qd_client_open(QdClient *c, const char *path, const QdHello *hello, QdError *err);
/*
 * The same, calling watch(opaque, sock) once the socket is connected and
 * watch(opaque, -1) before it returns: meanwhile another thread may
 * shutdown() the socket to make it give up at once.
 */
int qd_client_open_watched(QdClient *c, const char *path, const QdHello *hello,
                           QdError *err, void (*watch)(void *opaque, int sock),
                           void *opaque);
void qd_client_close(QdClient *c);

int qd_client_lookup(QdClient *c, const QdLookupEntry *e, uint32_t n,
                     QdResult *out, QdError *err);
/* Publish n pages: e[i] names page pages[i] (hash and cookie). */
int qd_client_publish(QdClient *c, const QdLookupEntry *e,
                      const void *const *pages, uint32_t n,
                      QdResult *out, QdError *err);
int qd_client_unref(QdClient *c, const uint64_t *slots, uint32_t n, QdError *err);
int qd_client_restore(QdClient *c, const QdRestoreEntry *e, uint32_t n,
                      QdResult *out, QdError *err);

/*
 * Map nslots pool slots from slot on MAP_PRIVATE, read-write (writes copy),
 * at addr (MAP_FIXED) or anywhere when addr is NULL.  MAP_FAILED on error.
 */
void *qd_client_map(QdClient *c, void *addr, uint64_t slot, size_t nslots);

#endif

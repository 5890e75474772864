/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The engine's connection to qemu-dedup-broker.
 *
 * Losing the broker never endangers the guest: merged pages are private
 * mappings of a pool fd we keep open.  The engine stops merging, retries with
 * a backoff (well under the broker's restart-grace), hands the pool fd back on
 * reconnect and, when the broker restarted, re-registers every slot it still
 * maps (RESTORE).  A slot the broker will not take back is unmerged before
 * the broker could punch it.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine-internal.h"

#define BACKOFF_MIN_US      (100 * 1000)
#define BACKOFF_MAX_US      (2 * 1000 * 1000)   /* restart-grace defaults to 10 s */
#define REPLY_TIMEOUT_S     5

const uint8_t *broker_pool_page(DedupEngine *e, uint64_t slot)
{
    Broker *b = &e->broker;

    if (!b->pool_view || (slot + 1) * DEDUP_PAGE > b->pool_view_len) {
        return NULL;
    }
    return b->pool_view + slot * DEDUP_PAGE;
}

void broker_lost(DedupEngine *e, const char *why)
{
    Broker *b = &e->broker;

    if (!b->connected) {
        return;
    }
    g_warning("memory-dedup: lost the broker (%s); merging paused, retrying", why);
    qd_client_close(&b->client);
    b->connected = false;
    b->backoff_us = BACKOFF_MIN_US;
    b->next_attempt_us = g_get_monotonic_time() + b->backoff_us;
    engine_notify(e, DEDUP_EVENT_BROKER_LOST);
}

void broker_unref(DedupEngine *e, const uint64_t *slots, size_t n)
{
    Broker *b = &e->broker;

    if (n) {
        engine_trace(e, DEDUP_TRACE_UNREF, NULL, n, 0);
    }
    for (size_t i = 0; i < n && b->connected; i += QD_MAX_UNREF) {
        QdError err;
        int ret = qd_client_unref(&b->client, slots + i, MIN(n - i, QD_MAX_UNREF), &err);

        if (ret < 0) {
            broker_lost(e, g_strerror(-ret));
        } else if (ret > 0) {
            /* All or nothing, and we only give back what we hold: a bug. */
            g_warning("memory-dedup: broker refused UNREF: %s", err.message);
        }
    }
    /* Disconnected: the broker keeps them until we reconnect (REFS_KEPT). */
}

/* Re-register, after a broker restart, every slot we still map. */
static bool restore_refs(DedupEngine *e)
{
    Broker *b = &e->broker;
    g_autoptr(GArray) entries = g_array_new(FALSE, FALSE, sizeof(QdRestoreEntry));
    g_autoptr(GArray) where = g_array_new(FALSE, FALSE, sizeof(MergeItem));
    QdResult res[QD_MAX_RESTORE];

    for (guint i = 0; i < e->regions->len; i++) {
        Region *r = g_ptr_array_index(e->regions, i);

        for (size_t p = 0; p < r->npages; p++) {
            uint8_t k = r->kind[p] & 0x7f;

            if (k == PAGE_MERGED || k == PAGE_COWED) {
                QdRestoreEntry re = { .slot = r->slot[p],
                                      .hash = qd_hash_page(broker_pool_page(e, r->slot[p])) };
                MergeItem m = { r, p, r->slot[p] };

                g_array_append_val(entries, re);
                g_array_append_val(where, m);
            }
        }
    }
    for (guint i = 0; i < entries->len; i += QD_MAX_RESTORE) {
        uint32_t n = MIN(entries->len - i, QD_MAX_RESTORE);
        QdError err;
        int ret = qd_client_restore(&b->client, &g_array_index(entries, QdRestoreEntry, i),
                                    n, res, &err);

        if (ret) {
            return false;
        }
        for (uint32_t k = 0; k < n; k++) {
            MergeItem *m = &g_array_index(where, MergeItem, i + k);

            if (res[k].result != QD_RESULT_HIT) {
                /* Not ours any more: copy it out before the slot is punched. */
                region_set_page(m->r, m->page, PAGE_COWED, m->r->slot[m->page]);
                if (!restore_page(e, m->r, m->page, false)) {
                    g_warning("memory-dedup: cannot unmerge page %zu of %s",
                              m->page, m->r->name);
                }
            }
        }
    }
    return true;
}

static bool broker_connect(DedupEngine *e)
{
    Broker *b = &e->broker;
    QdHello h = { .version = QD_PROTO_VERSION, .pid = getpid() };
    struct timeval tv = { .tv_sec = REPLY_TIMEOUT_S };
    QdError err = { 0 };
    struct stat st;
    int ret;

    memcpy(h.uuid, e->cfg.uuid, sizeof(h.uuid));
    g_strlcpy(h.name, e->name ? e->name : "", sizeof(h.name));
    g_strlcpy(h.domain, e->domain ? e->domain : "", sizeof(h.domain));
    if (e->secret) {
        h.secret_len = MIN(strlen(e->secret), sizeof(h.secret));
        memcpy(h.secret, e->secret, h.secret_len);
    }
    if (b->pool_fd >= 0) {
        h.flags |= QD_HELLO_RECONNECT;
        h.pool_dev = b->pool_dev;
        h.pool_ino = b->pool_ino;
    }
    ret = qd_client_open(&b->client, e->broker_path, &h, b->pool_fd, &err);
    if (ret) {
        if (!b->ever_connected || b->backoff_us >= BACKOFF_MAX_US) {
            g_debug("memory-dedup: broker %s: %s", e->broker_path,
                    ret > 0 ? err.message : g_strerror(-ret));
        }
        qd_client_close(&b->client);
        return false;
    }
    setsockopt(b->client.sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(b->client.sock, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    if (b->pool_fd < 0) {
        b->pool_fd = b->client.pool_fd;
        b->client.pool_fd = -1;
        fstat(b->pool_fd, &st);
        b->pool_dev = st.st_dev;
        b->pool_ino = st.st_ino;
        b->pool_view_len = b->client.info.pool_slots * DEDUP_PAGE;
        b->pool_view = mmap(NULL, b->pool_view_len, PROT_READ, MAP_SHARED, b->pool_fd, 0);
        if (b->pool_view == MAP_FAILED) {
            b->pool_view = NULL;
            qd_client_close(&b->client);
            return false;
        }
    } else {
        /* Reconnected: the broker answered with our own pool (else POOL_CHANGED). */
        if (b->client.pool_fd >= 0) {
            close(b->client.pool_fd);
            b->client.pool_fd = -1;
        }
        b->connected = true;
        if (!(b->client.info.flags & QD_REPLY_REFS_KEPT) && !restore_refs(e)) {
            b->connected = false;
            qd_client_close(&b->client);
            return false;
        }
    }
    b->connected = true;
    return true;
}

bool broker_usable(DedupEngine *e)
{
    Broker *b = &e->broker;
    int64_t now = g_get_monotonic_time();

    if (b->connected) {
        return true;
    }
    if (now < b->next_attempt_us) {
        return false;
    }
    if (!broker_connect(e)) {
        b->backoff_us = CLAMP(b->backoff_us * 2, BACKOFF_MIN_US, BACKOFF_MAX_US);
        b->next_attempt_us = now + b->backoff_us;
        return false;
    }
    if (b->ever_connected) {
        e->st.broker_reconnects++;
    }
    b->ever_connected = true;
    g_message("memory-dedup: connected to the broker at %s (domain '%s')",
              e->broker_path, e->domain ? e->domain : "");
    engine_notify(e, DEDUP_EVENT_BROKER_REGAINED);
    return true;
}

void broker_close(DedupEngine *e)
{
    Broker *b = &e->broker;

    if (b->connected) {
        qd_client_close(&b->client);
        b->connected = false;
    }
    /* pool_fd and pool_view stay: merged pages may still map the pool. */
}

void broker_release_pool(DedupEngine *e)
{
    Broker *b = &e->broker;

    if (b->pool_view) {
        munmap(b->pool_view, b->pool_view_len);
        b->pool_view = NULL;
    }
    if (b->pool_fd >= 0) {
        close(b->pool_fd);
        b->pool_fd = -1;
    }
}

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
#include <poll.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine-internal.h"

#define BACKOFF_MIN_US      (100 * 1000)
#define BACKOFF_MAX_US      (2 * 1000 * 1000)   /* restart-grace defaults to 10 s */
/*
 * Refused (wrong secret, domain not declared, uid not allowed): asking
 * again soon changes nothing, and the broker counts failed authentications
 * per user, so a VM retrying fast would lock out the other VMs of its user.
 */
#define DENIED_BACKOFF_US   (60 * 1000 * 1000)
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

/*
 * Between passes: has the broker closed our connection (it died or was
 * restarted)?  It sends nothing unasked, so anything to read now is its
 * end of file.  Without this an idle VM notices only at its next request,
 * perhaps after a restarted broker's restart-grace ran out, and its pool
 * is then forgotten instead of handed back.
 */
void broker_check_closed(DedupEngine *e)
{
    Broker *b = &e->broker;
    struct pollfd pfd = { .fd = b->client.sock, .events = POLLIN | POLLRDHUP };

    if (b->connected && poll(&pfd, 1, 0) > 0) {
        broker_lost(e, "the broker closed the connection");
    }
}

/* Send UNREFs for slots whose last use went; the broker gives nothing back. */
static void send_unref(DedupEngine *e, const uint64_t *slots, size_t n)
{
    Broker *b = &e->broker;

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
}

bool broker_took(DedupEngine *e, uint64_t slot)
{
    Broker *b = &e->broker;

    if (qd_slot_uses_add(&b->uses, slot) > 0) {
        return true;
    }
    /* Not counted (no memory): the page will not map it; if it was the
     * broker's new reference, give it back at once. */
    if (qd_slot_uses_count(&b->uses, slot) == 0) {
        send_unref(e, &slot, 1);
    }
    return false;
}

void broker_unref(DedupEngine *e, const uint64_t *slots, size_t n)
{
    Broker *b = &e->broker;
    g_autoptr(GArray) last = g_array_new(FALSE, FALSE, sizeof(uint64_t));

    if (!n) {
        return;
    }
    engine_trace(e, DEDUP_TRACE_UNREF, NULL, n, 0);
    for (size_t i = 0; i < n; i++) {
        int64_t left = qd_slot_uses_drop(&b->uses, slots[i]);

        if (left == 0) {
            g_array_append_val(last, slots[i]);
        } else if (left < 0) {
            g_warning("memory-dedup: released slot %" G_GUINT64_FORMAT
                      " that no page used", slots[i]);
        }
    }
    if (!b->connected) {
        /* The broker keeps them until we reconnect (REFS_KEPT): send then. */
        g_array_append_vals(b->unsent, last->data, last->len);
        return;
    }
    send_unref(e, (uint64_t *)last->data, last->len);
}

typedef struct RestoreList {
    DedupEngine *e;
    GArray *entries;        /* QdRestoreEntry, one per slot we use */
} RestoreList;

static void add_restore(uint64_t slot, uint64_t uses, void *opaque)
{
    RestoreList *l = opaque;
    const uint8_t *page = broker_pool_page(l->e, slot);
    QdRestoreEntry re = { .slot = slot };

    if (page) {
        re.hash = qd_hash_page(page);
    }
    g_array_append_val(l->entries, re);
}

/*
 * Re-register, after a broker restart, every slot we still map (one entry
 * per slot).  Pages of a slot the broker does not take back are copied out
 * before it could be reused or punched.
 */
static bool restore_refs(DedupEngine *e)
{
    Broker *b = &e->broker;
    g_autoptr(GArray) entries = g_array_new(FALSE, FALSE, sizeof(QdRestoreEntry));
    g_autoptr(GHashTable) refused = g_hash_table_new(g_direct_hash, g_direct_equal);
    RestoreList list = { e, entries };
    QdResult res[QD_MAX_RESTORE];

    /* What went while we were away belonged to the old broker. */
    g_array_set_size(b->unsent, 0);
    qd_slot_uses_foreach(&b->uses, add_restore, &list);
    for (guint i = 0; i < entries->len; i += QD_MAX_RESTORE) {
        uint32_t n = MIN(entries->len - i, QD_MAX_RESTORE);
        QdError err;
        int ret = qd_client_restore(&b->client, &g_array_index(entries, QdRestoreEntry, i),
                                    n, res, &err);

        if (ret) {
            return false;
        }
        for (uint32_t k = 0; k < n; k++) {
            if (res[k].result != QD_RESULT_HIT) {
                uint64_t slot = g_array_index(entries, QdRestoreEntry, i + k).slot;

                g_hash_table_add(refused, GSIZE_TO_POINTER(slot));
            }
        }
    }
    if (!g_hash_table_size(refused)) {
        return true;
    }
    for (guint i = 0; i < e->regions->len; i++) {
        Region *r = g_ptr_array_index(e->regions, i);

        for (size_t p = 0; p < r->npages; p++) {
            if (pool_mapped(r, p) &&
                g_hash_table_contains(refused, GSIZE_TO_POINTER((gsize)r->slot[p]))) {
                /* Not ours any more: copy it out (the broker holds no reference). */
                region_set_page(r, p, PAGE_COWED, r->slot[p]);
                if (!restore_page(e, r, p, false)) {
                    g_warning("memory-dedup: cannot unmerge page %zu of %s", p, r->name);
                }
            }
        }
    }
    {
        GHashTableIter it;
        gpointer key;

        g_hash_table_iter_init(&it, refused);
        while (g_hash_table_iter_next(&it, &key, NULL)) {
            qd_slot_uses_forget(&b->uses, GPOINTER_TO_SIZE(key));
        }
    }
    return true;
}

/*
 * The broker does not have the pool we kept (it lost its state file, or
 * nobody handed the pool back within its restart-grace): our slot numbers
 * mean nothing to it and nobody will take them back.  Our merged pages are
 * private mappings of that pool and stay correct, but they cannot be
 * merged or accounted against a new pool, so they are copied out, and the
 * next attempt connects afresh.  Pages that cannot move now (no memory, no
 * VMA left) keep the old pool, and we try again next time: when in doubt,
 * do not merge.  Called with e->lock held, from the scanner.
 */
static void leave_old_pool(DedupEngine *e)
{
    Broker *b = &e->broker;
    uint64_t left = unmerge_locked(e, UINT64_MAX);

    /* The UNREFs unmerging queued were for a pool no broker counts. */
    g_array_set_size(b->unsent, 0);
    if (left) {
        g_warning("memory-dedup: the broker has a new pool; %" G_GUINT64_FORMAT
                  " pages still map the old one, trying again", left);
        return;
    }
    broker_release_pool(e);
    b->backoff_us = BACKOFF_MIN_US;
    g_message("memory-dedup: the broker has a new pool: pages of the old one unmerged, "
              "merging again");
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
        /* The broker looks at our descriptor through /proc: nothing is sent. */
        h.flags |= QD_HELLO_RECONNECT;
        h.pool_dev = b->pool_dev;
        h.pool_ino = b->pool_ino;
        h.pool_fd = b->pool_fd;
    }
    ret = qd_client_open(&b->client, e->broker_path, &h, &err);
    b->denied = ret == QD_ERR_DENIED;
    if (ret) {
        if (b->denied) {
            g_warning("memory-dedup: the broker refused this VM: %s; trying again in %d s",
                      err.message, DENIED_BACKOFF_US / 1000000);
        } else if (!b->ever_connected || b->backoff_us >= BACKOFF_MAX_US) {
            g_debug("memory-dedup: broker %s: %s", e->broker_path,
                    ret > 0 ? err.message : g_strerror(-ret));
        }
        qd_client_close(&b->client);
        if (ret == QD_ERR_POOL_CHANGED && b->pool_fd >= 0) {
            leave_old_pool(e);
        }
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
        if (b->pool_view == MAP_FAILED ||
            qd_slot_uses_init(&b->uses, b->client.info.pool_slots) < 0) {
            if (b->pool_view != MAP_FAILED) {
                munmap(b->pool_view, b->pool_view_len);
            }
            b->pool_view = NULL;
            close(b->pool_fd);
            b->pool_fd = -1;
            qd_client_close(&b->client);
            return false;
        }
        /* A host core dump must hold no pool page (dump-guest-core=off). */
        madvise(b->pool_view, b->pool_view_len, MADV_DONTDUMP);
    } else {
        /* Reconnected: the broker answered with our own pool (else POOL_CHANGED). */
        if (b->client.pool_fd >= 0) {
            close(b->client.pool_fd);
            b->client.pool_fd = -1;
        }
        b->connected = true;
        if (b->client.info.flags & QD_REPLY_REFS_KEPT) {
            /* Same broker: give back what went while we were away. */
            g_autoptr(GArray) unsent = b->unsent;

            b->unsent = g_array_new(FALSE, FALSE, sizeof(uint64_t));
            send_unref(e, (uint64_t *)unsent->data, unsent->len);
        } else if (!restore_refs(e)) {
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
        b->next_attempt_us = now + (b->denied ? DENIED_BACKOFF_US : b->backoff_us);
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
    qd_slot_uses_destroy(&b->uses);
}

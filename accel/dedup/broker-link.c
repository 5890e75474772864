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

/*
 * Send UNREFs (scanner, e->lock not held); the broker gives nothing back.
 * A chunk whose answer is lost (timeout, disconnect) may or may not have
 * been done: it goes to unref_uncertain, the chunks not sent back to
 * unref_due.  Returns false if the connection was lost.
 */
static bool send_unref(DedupEngine *e, const uint64_t *slots, size_t n)
{
    Broker *b = &e->broker;

    for (size_t i = 0; i < n; i += QD_MAX_UNREF) {
        size_t k = MIN(n - i, QD_MAX_UNREF);
        QdError err;
        int ret = qd_client_unref(&b->client, slots + i, k, &err);

        if (ret < 0) {
            g_mutex_lock(&e->lock);
            g_array_append_vals(b->unref_uncertain, slots + i, k);
            for (size_t j = i + k; j < n; j++) {
                g_hash_table_add(b->unref_due, GSIZE_TO_POINTER((gsize)slots[j]));
            }
            broker_lost(e, g_strerror(-ret));
            g_mutex_unlock(&e->lock);
            return false;
        } else if (ret > 0) {
            /* All or nothing, and we only give back what we hold: a bug. */
            g_warning("memory-dedup: broker refused UNREF: %s", err.message);
        }
    }
    return true;
}

void broker_flush_unrefs(DedupEngine *e)
{
    Broker *b = &e->broker;
    g_autoptr(GArray) out = g_array_new(FALSE, FALSE, sizeof(uint64_t));
    GHashTableIter it;
    gpointer key;

    g_mutex_lock(&e->lock);
    if (b->connected) {
        g_hash_table_iter_init(&it, b->unref_due);
        while (g_hash_table_iter_next(&it, &key, NULL)) {
            uint64_t slot = GPOINTER_TO_SIZE(key);

            g_array_append_val(out, slot);
        }
        g_hash_table_remove_all(b->unref_due);
    }
    engine_unlock(e);
    if (out->len) {
        send_unref(e, (uint64_t *)out->data, out->len);
    }
}

/*
 * Back with the same broker (REFS_KEPT), UNREFs whose fate we do not know
 * go one at a time: one done already is answered NOT_HELD and changes
 * nothing, so none is released twice and none is left behind.
 */
static void settle_uncertain_unrefs(DedupEngine *e)
{
    Broker *b = &e->broker;
    g_autoptr(GArray) todo = g_array_new(FALSE, FALSE, sizeof(uint64_t));

    for (guint i = 0; i < b->unref_uncertain->len; i++) {
        uint64_t slot = g_array_index(b->unref_uncertain, uint64_t, i);

        /* Used again since (before the loss): its reference is needed. */
        if (qd_slot_uses_count(&b->uses, slot) == 0) {
            g_array_append_val(todo, slot);
        }
    }
    g_array_set_size(b->unref_uncertain, 0);
    engine_unlock(e);           /* I10, as for every request */
    for (guint i = 0; i < todo->len; i++) {
        uint64_t slot = g_array_index(todo, uint64_t, i);
        QdError err;
        int ret;

        broker_io(e, b->client.sock);
        ret = qd_client_unref(&b->client, &slot, 1, &err);
        broker_io(e, -1);
        if (ret < 0) {
            /* Still uncertain; the next request notices the loss. */
            g_mutex_lock(&e->lock);
            g_array_append_vals(b->unref_uncertain, &g_array_index(todo, uint64_t, i),
                                todo->len - i);
            return;
        }
    }
    g_mutex_lock(&e->lock);
}

bool broker_took(DedupEngine *e, uint64_t slot)
{
    Broker *b = &e->broker;

    if (qd_slot_uses_add(&b->uses, slot) > 0) {
        /* Used again before its UNREF left: the broker still holds it for us. */
        g_hash_table_remove(b->unref_due, GSIZE_TO_POINTER((gsize)slot));
        return true;
    }
    /* Not counted (no memory): the page will not map it; if it was the
     * broker's new reference, give it back. */
    if (qd_slot_uses_count(&b->uses, slot) == 0) {
        g_hash_table_add(b->unref_due, GSIZE_TO_POINTER((gsize)slot));
    }
    return false;
}

/* Any thread, e->lock held: queues, never waits for the broker (I10). */
void broker_unref(DedupEngine *e, const uint64_t *slots, size_t n)
{
    Broker *b = &e->broker;

    if (!n) {
        return;
    }
    engine_trace(e, DEDUP_TRACE_UNREF, NULL, n, 0);
    for (size_t i = 0; i < n; i++) {
        int64_t left = qd_slot_uses_drop(&b->uses, slots[i]);

        if (left == 0) {
            g_hash_table_add(b->unref_due, GSIZE_TO_POINTER((gsize)slots[i]));
        } else if (left < 0) {
            g_warning("memory-dedup: released slot %" G_GUINT64_FORMAT
                      " that no page used", slots[i]);
        }
    }
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
    g_hash_table_remove_all(b->unref_due);
    g_array_set_size(b->unref_uncertain, 0);
    qd_slot_uses_foreach(&b->uses, add_restore, &list);
    /*
     * Without e->lock while the broker answers (I10).  Meanwhile other
     * threads may only let slots go (their UNREFs queue): one restored
     * here is given back later, one refused is taken off the queue below.
     */
    engine_unlock(e);
    for (guint i = 0; i < entries->len; i += QD_MAX_RESTORE) {
        uint32_t n = MIN(entries->len - i, QD_MAX_RESTORE);
        QdError err;
        int ret;

        broker_io(e, b->client.sock);
        ret = qd_client_restore(&b->client, &g_array_index(entries, QdRestoreEntry, i),
                                n, res, &err);
        broker_io(e, -1);
        if (ret) {
            g_mutex_lock(&e->lock);
            return false;
        }
        for (uint32_t k = 0; k < n; k++) {
            if (res[k].result != QD_RESULT_HIT) {
                uint64_t slot = g_array_index(entries, QdRestoreEntry, i + k).slot;

                g_hash_table_add(refused, GSIZE_TO_POINTER(slot));
            }
        }
    }
    g_mutex_lock(&e->lock);
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

        /* The broker holds no reference to them: none to give back. */
        g_hash_table_iter_init(&it, refused);
        while (g_hash_table_iter_next(&it, &key, NULL)) {
            qd_slot_uses_forget(&b->uses, GPOINTER_TO_SIZE(key));
            g_hash_table_remove(b->unref_due, key);
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
    g_hash_table_remove_all(b->unref_due);
    g_array_set_size(b->unref_uncertain, 0);
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

static void watch_hello(void *opaque, int sock)
{
    broker_io(opaque, sock);
}

/*
 * Connect and say HELLO: scanner, e->lock not held (the answer may take
 * the client's 5 s timeout).  Reads only what the scanner alone changes.
 */
static int broker_hello(DedupEngine *e, QdError *err)
{
    Broker *b = &e->broker;
    QdHello h = { .version = QD_PROTO_VERSION, .pid = getpid() };

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
    return qd_client_open_watched(&b->client, e->broker_path, &h, err, watch_hello, e);
}

/* After broker_hello() answered ret: e->lock held. */
static bool broker_connect(DedupEngine *e, int ret, QdError *errp)
{
    Broker *b = &e->broker;
    struct timeval tv = { .tv_sec = REPLY_TIMEOUT_S };
    QdError err = *errp;
    struct stat st;

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
            /* Same broker: what went while we were away is due (the scanner
             * sends it); what may have gone already, one at a time. */
            settle_uncertain_unrefs(e);
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
    QdError err = { 0 };
    int ret;

    if (b->connected) {
        return true;
    }
    if (now < b->next_attempt_us) {
        return false;
    }
    ret = broker_hello(e, &err);
    g_mutex_lock(&e->lock);
    if (!broker_connect(e, ret, &err)) {
        b->backoff_us = CLAMP(b->backoff_us * 2, BACKOFF_MIN_US, BACKOFF_MAX_US);
        b->next_attempt_us = now + (b->denied ? DENIED_BACKOFF_US : b->backoff_us);
        engine_unlock(e);
        return false;
    }
    if (b->ever_connected) {
        e->st.broker_reconnects++;
    }
    b->ever_connected = true;
    g_message("memory-dedup: connected to the broker at %s (domain '%s')",
              e->broker_path, e->domain ? e->domain : "");
    engine_notify(e, DEDUP_EVENT_BROKER_REGAINED);
    engine_unlock(e);
    return true;
}

typedef struct UnrefHandover {
    QdClient client;
    GArray *slots;
} UnrefHandover;

static gpointer unref_handover_thread(gpointer opaque)
{
    UnrefHandover *h = opaque;
    uint64_t *slots = (uint64_t *)h->slots->data;

    for (guint i = 0; i < h->slots->len; i += QD_MAX_UNREF) {
        QdError err;

        if (qd_client_unref(&h->client, slots + i, MIN(h->slots->len - i, QD_MAX_UNREF),
                            &err) < 0) {
            break;      /* the broker keeps them until this process exits */
        }
    }
    qd_client_close(&h->client);
    g_array_free(h->slots, TRUE);
    g_free(h);
    return NULL;
}

/*
 * The engine goes (object-del) with UNREFs still due: a thread of their
 * own sends them on our connection and closes it, so that the monitor,
 * which deletes the object under the BQL, does not wait for the broker
 * (I10).  Threads stopped; e->lock not needed.
 */
void broker_hand_over_unrefs(DedupEngine *e)
{
    Broker *b = &e->broker;
    UnrefHandover *h;
    GHashTableIter it;
    gpointer key;

    if (!b->connected || !g_hash_table_size(b->unref_due)) {
        return;
    }
    h = g_new0(UnrefHandover, 1);
    h->slots = g_array_new(FALSE, FALSE, sizeof(uint64_t));
    g_hash_table_iter_init(&it, b->unref_due);
    while (g_hash_table_iter_next(&it, &key, NULL)) {
        uint64_t slot = GPOINTER_TO_SIZE(key);

        g_array_append_val(h->slots, slot);
    }
    g_hash_table_remove_all(b->unref_due);
    h->client = b->client;
    b->client.sock = -1;
    b->client.pool_fd = -1;
    b->client.buf = NULL;
    b->connected = false;
    g_thread_unref(g_thread_new("dedup-release", unref_handover_thread, h));
}

/*
 * Scanner: a request to the broker is starting (fd) or over (-1).  While
 * one is in flight, dedup_engine_stop() shuts the socket down so that the
 * scanner does not keep object-del waiting for the reply's timeout.
 */
void broker_io(DedupEngine *e, int fd)
{
    g_mutex_lock(&e->ctl_lock);
    e->broker.io_fd = fd;
    if (fd >= 0 && e->stopping) {
        shutdown(fd, SHUT_RDWR);
    }
    g_mutex_unlock(&e->ctl_lock);
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

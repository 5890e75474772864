/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * What the broker does for each request (see broker.h for the invariants).
 *
 * A page's way into the pool:
 *  1. LOOKUP of its hash.  Found in the domain's index: HIT, the client
 *     now holds a reference and compares the slot with its page itself
 *     (the broker never vouches for the client's hash).  Not found: the
 *     hash is remembered as a candidate (MISS), at no pool cost, unless a
 *     different page already left the same hash there: then PUBLISH.
 *  2. PUBLISH of the content: received straight into a new slot, hashed by
 *     the broker, indexed if the hash is the one claimed (STORED).
 * So a page enters the pool only once a second identical page exists.
 */
#include <poll.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "broker.h"

#define MAX_WANTED 65536    /* outstanding PUBLISH requests per client */

static void client_forget(BrokerClient *c);

/* Internal result: a page repeating an earlier one of the same PUBLISH. */
#define RESULT_DUPLICATE (QD_RESULT_MAX + 1)

static gboolean same_as_earlier(const QdMessage *m, uint32_t i, const QdResult *out)
{
    QdLookupEntry e, f;

    qd_lookup_entry_at(m, i, &e);
    for (uint32_t j = 0; j < i; j++) {
        qd_lookup_entry_at(m, j, &f);
        if (out[j].result == QD_RESULT_STORED && qd_hash_equal(e.hash, f.hash)) {
            return TRUE;
        }
    }
    return FALSE;
}

gboolean broker_init(Broker *b, BrokerConfig *cfg, GError **errp)
{
    memset(b, 0, sizeof(*b));
    b->cfg = cfg;
    b->pool.fd = -1;
    slot_table_init(&b->slots);
    b->domains = g_hash_table_new(g_str_hash, g_str_equal);
    b->domain_ids = g_ptr_array_new();
    b->clients = g_hash_table_new(g_direct_hash, g_direct_equal);
    b->next_client_id = 1;
    if (restart_read_state(b)) {
        /* A previous broker's pool may come back with its clients. */
        b->recovering = TRUE;
        b->recover_deadline = g_get_monotonic_time() + cfg->restart_grace * G_USEC_PER_SEC;
        g_message("a previous pool exists; waiting up to %u s for its clients "
                  "to hand it back", cfg->restart_grace);
        return TRUE;
    }
    if (!pool_create(&b->pool, cfg->pool_max, errp)) {
        return FALSE;
    }
    b->have_pool = TRUE;
    restart_write_state(b);
    return TRUE;
}

void broker_destroy(Broker *b)
{
    GHashTableIter it;
    gpointer v;

    /* Clients keep mapping their slots across a broker restart: free only
     * our bookkeeping, never a slot. */
    g_hash_table_iter_init(&it, b->clients);
    while (g_hash_table_iter_next(&it, NULL, &v)) {
        client_forget(v);
        g_hash_table_iter_steal(&it);
    }
    g_hash_table_destroy(b->clients);
    g_hash_table_destroy(b->domains);
    g_ptr_array_free(b->domain_ids, TRUE);
    slot_table_destroy(&b->slots);
    if (b->have_pool) {
        pool_destroy(&b->pool);
    }
}

gboolean broker_peer_allowed(Broker *b, uid_t uid, gid_t gid, const GArray *groups)
{
    return uid == 0 || uid == geteuid() ||
           config_ids_admit(b->cfg->allow_uids, b->cfg->allow_gids, uid, gid, groups);
}

BrokerClient *broker_client_new(Broker *b, int sock, pid_t pid, uid_t uid, gid_t gid)
{
    BrokerClient *c = g_new0(BrokerClient, 1);

    c->id = b->next_client_id++;
    c->sock = sock;
    c->pidfd = -1;
    c->pid = pid;
    c->uid = uid;
    c->gid = gid;
    c->connected_at = g_get_monotonic_time();
    c->wanted = g_hash_table_new(g_direct_hash, g_direct_equal);
    g_hash_table_insert(b->clients, GUINT_TO_POINTER(c->id), c);
    b->stats.clients_total++;
    return c;
}

/* Drop one reference to slot; free the slot at zero (I2). */
static void slot_release(Broker *b, uint64_t slot, uint32_t count)
{
    SlotInfo *si = &b->slots.info[slot];
    Domain *d;

    g_assert(si->refs >= count);
    si->refs -= count;
    if (si->refs) {
        return;
    }
    d = g_ptr_array_index(b->domain_ids, si->domain);
    if (si->flags & SLOT_INDEXED) {
        index_remove(&d->index, &b->slots, slot);
        d->slots--;
    }
    pool_free(&b->pool, slot);
    memset(si, 0, sizeof(*si));
    b->stats.frees++;
    domain_leave(b, d);
}

static void release_one(uint64_t slot, uint32_t count, void *opaque)
{
    slot_release(opaque, slot, count);
}

/* Free the client's bookkeeping without touching its slots. */
static void client_forget(BrokerClient *c)
{
    if (c->refs.chunks) {
        refs_destroy(&c->refs);
    }
    if (c->pid_watch) {
        g_source_remove(c->pid_watch);
    }
    if (c->pidfd >= 0) {
        close(c->pidfd);
    }
    g_hash_table_destroy(c->wanted);
    g_free(c);
}

void broker_client_free(Broker *b, BrokerClient *c)
{
    if (c->refs.chunks) {
        refs_foreach(&c->refs, release_one, b);
    }
    if (c->domain) {
        c->domain->nclients--;
        domain_leave(b, c->domain);
    }
    g_hash_table_remove(b->clients, GUINT_TO_POINTER(c->id));
    client_forget(c);
}

/* Is the client's process still running? */
static gboolean process_alive(BrokerClient *c)
{
    struct pollfd pfd = { .fd = c->pidfd, .events = POLLIN };

    /* A pidfd becomes readable when the process exits. */
    return c->pidfd >= 0 && poll(&pfd, 1, 0) == 0;
}

gboolean broker_client_orphan(Broker *b, BrokerClient *c)
{
    if (!c->domain || c->refs.total == 0 || !process_alive(c)) {
        return FALSE;
    }
    c->sock = -1;
    g_hash_table_remove_all(c->wanted);
    return TRUE;
}

/* An orphan left by this very process (alive, so its pid is its own). */
static BrokerClient *find_orphan(Broker *b, pid_t pid, Domain *d)
{
    GHashTableIter it;
    gpointer v;

    g_hash_table_iter_init(&it, b->clients);
    while (g_hash_table_iter_next(&it, NULL, &v)) {
        BrokerClient *o = v;

        if (o->sock < 0 && o->pid == pid && o->domain == d && process_alive(o)) {
            return o;
        }
    }
    return NULL;
}

/* Constant-time comparison, so a wrong secret's timing tells nothing. */
static gboolean secret_ok(GBytes *want, const uint8_t *got, uint32_t len)
{
    gsize n;
    const uint8_t *w = g_bytes_get_data(want, &n);
    uint8_t diff = n != len;

    for (gsize i = 0; i < n; i++) {
        diff |= w[i] ^ (i < len ? got[i] : 0);
    }
    return diff == 0;
}

static gboolean domain_allowed(Broker *b, BrokerClient *c, const QdHello *h,
                               const GArray *groups, char **msg)
{
    const DomainPolicy *p;

    if (!*h->domain) {
        return TRUE;
    }
    p = g_hash_table_lookup(b->cfg->domains, h->domain);
    if (!p) {
        if (!b->cfg->open_domains) {
            *msg = g_strdup_printf("domain '%s' is not configured on this broker",
                                   h->domain);
            return FALSE;
        }
        return TRUE;
    }
    if ((p->uids || p->gids) &&
        !config_ids_admit(p->uids, p->gids, c->uid, c->gid, groups)) {
        *msg = g_strdup_printf("uid %u may not join domain '%s'",
                               (unsigned)c->uid, h->domain);
        return FALSE;
    }
    if (p->secret && !secret_ok(p->secret, h->secret, h->secret_len)) {
        *msg = g_strdup_printf("wrong or missing secret for domain '%s'", h->domain);
        return FALSE;
    }
    return TRUE;
}

/* A reconnecting client hands the pool back: adopt it or check it. */
static int take_back_pool(Broker *b, int fd, char **msg)
{
    struct stat st;
    g_autoptr(GError) err = NULL;

    if (fd < 0 || fstat(fd, &st) < 0) {
        *msg = g_strdup("HELLO with the reconnect flag must carry the pool descriptor");
        return QD_ERR_PROTOCOL;
    }
    if (b->have_pool) {
        if (st.st_dev == b->pool.dev && st.st_ino == b->pool.ino) {
            return 0;
        }
        *msg = g_strdup("this broker has another pool: the handed-back one is gone");
        return QD_ERR_POOL_CHANGED;
    }
    if (st.st_dev != b->state_dev || st.st_ino != b->state_ino) {
        *msg = g_strdup("the handed-back pool is not the one this host's broker had");
        return QD_ERR_POOL_CHANGED;
    }
    if (!pool_adopt(&b->pool, fd, b->cfg->pool_max, &err)) {
        *msg = g_strdup(err->message);
        return QD_ERR_POOL_CHANGED;
    }
    b->have_pool = TRUE;
    b->recovering = FALSE;
    b->sweep_at = g_get_monotonic_time() + b->cfg->restart_grace * G_USEC_PER_SEC;
    g_message("adopted the previous pool (inode %lu); slots not restored within "
              "%u s will be freed", (unsigned long)st.st_ino, b->cfg->restart_grace);
    return 0;
}

int broker_hello(Broker *b, BrokerClient *c, const QdHello *h, int handed_fd,
                 const GArray *groups, QdHelloReply *reply, int *ro_fd, char **msg)
{
    g_autoptr(GError) err = NULL;
    gboolean reconnect = h->flags & QD_HELLO_RECONNECT;
    int ret;

    *ro_fd = -1;
    if (c->domain) {
        *msg = g_strdup("HELLO sent twice");
        return QD_ERR_STATE;
    }
    if (h->version != QD_PROTO_VERSION) {
        *msg = g_strdup_printf("protocol version %u is not supported (this broker: %u)",
                               h->version, QD_PROTO_VERSION);
        return QD_ERR_VERSION;
    }
    if (!domain_allowed(b, c, h, groups, msg)) {
        return QD_ERR_DENIED;
    }
    if (reconnect) {
        gboolean had_pool = b->have_pool;

        ret = take_back_pool(b, handed_fd, msg);
        if (ret) {
            return ret;
        }
        if (!had_pool) {
            reply->flags |= QD_REPLY_ADOPTED;
        }
    } else if (!b->have_pool) {
        gint64 left = (b->recover_deadline - g_get_monotonic_time()) / G_USEC_PER_SEC;

        *msg = g_strdup_printf("broker restarting: retry in %" G_GINT64_FORMAT " s",
                               MAX(left, 1));
        return QD_ERR_RETRY;
    }
    *ro_fd = pool_open_readonly(&b->pool, &err);
    if (*ro_fd < 0) {
        *msg = g_strdup(err->message);
        return QD_ERR_INTERNAL;
    }
    c->domain = domain_join(b, h->domain);
    if (!c->domain) {
        close(*ro_fd);
        *ro_fd = -1;
        *msg = g_strdup("too many domains");
        return QD_ERR_INTERNAL;
    }
    g_strlcpy(c->name, h->name, sizeof(c->name));
    memcpy(c->uuid, h->uuid, sizeof(c->uuid));
    if (h->pid && h->pid != (uint32_t)c->pid) {
        g_message("client %u says pid %u, kernel says %d", c->id, h->pid, (int)c->pid);
    }
    refs_init(&c->refs, b->cfg->pool_max);
    if (reconnect) {
        BrokerClient *o = find_orphan(b, c->pid, c->domain);

        if (o) {
            /* Same process, same mappings: its references carry over. */
            ClientRefs keep = c->refs;

            c->refs = o->refs;
            o->refs = keep;
            reply->flags |= QD_REPLY_REFS_KEPT;
            broker_client_free(b, o);
        }
    }

    reply->version = QD_PROTO_VERSION;
    reply->client_id = c->id;
    reply->page_size = QD_PAGE_SIZE;
    reply->max_lookup = QD_MAX_LOOKUP;
    reply->max_publish = QD_MAX_PUBLISH;
    reply->pool_slots = b->pool.max_slots;
    reply->client_quota = b->cfg->client_quota;
    reply->domain_quota = c->domain->quota;
    reply->pool_dev = b->pool.dev;
    reply->pool_ino = b->pool.ino;
    return 0;
}

/* May the client take one more reference to slot? */
static gboolean client_may_ref(Broker *b, BrokerClient *c, uint64_t slot)
{
    return !b->cfg->client_quota || refs_count(&c->refs, slot) ||
           c->refs.distinct < b->cfg->client_quota;
}

static void take_ref(Broker *b, BrokerClient *c, uint64_t slot)
{
    refs_add(&c->refs, slot);
    b->slots.info[slot].refs++;
}

void broker_lookup(Broker *b, BrokerClient *c, const QdMessage *m, QdResult *out)
{
    Domain *d = c->domain;

    for (uint32_t i = 0; i < m->u.array.count; i++) {
        QdLookupEntry e;
        uint64_t slot;

        qd_lookup_entry_at(m, i, &e);
        out[i] = (QdResult) { .result = QD_RESULT_MISS };
        slot = index_find(&d->index, &b->slots, e.hash);
        if (slot != INDEX_NONE) {
            if (!client_may_ref(b, c, slot)) {
                out[i].result = QD_RESULT_QUOTA;
                continue;
            }
            take_ref(b, c, slot);
            out[i] = (QdResult) { .result = QD_RESULT_HIT, .slot = slot };
            c->hits++;
            d->hits++;
            b->stats.hits++;
        } else if (candidates_check(&d->cand, e.hash, c->id, e.cookie) == CAND_MATCH) {
            if (g_hash_table_size(c->wanted) >= MAX_WANTED) {
                g_hash_table_remove_all(c->wanted);
            }
            g_hash_table_add(c->wanted, GSIZE_TO_POINTER(e.hash.lo));
            out[i].result = QD_RESULT_PUBLISH;
            c->asked++;
            b->stats.asked++;
        } else {
            c->misses++;
            b->stats.misses++;
        }
    }
    c->lookups += m->u.array.count;
    d->lookups += m->u.array.count;
    b->stats.lookups += m->u.array.count;
}

void broker_publish_plan(Broker *b, BrokerClient *c, const QdMessage *m,
                         uint64_t *dest, QdResult *out)
{
    Domain *d = c->domain;
    uint32_t n = m->u.array.count, need = 0;
    uint64_t run = POOL_NO_SLOT;

    for (uint32_t i = 0; i < n; i++) {
        QdLookupEntry e;
        uint64_t slot;
        gboolean wanted, duplicate;

        qd_lookup_entry_at(m, i, &e);
        dest[i] = POOL_NO_SLOT;
        out[i] = (QdResult) { .result = QD_RESULT_UNWANTED };
        duplicate = same_as_earlier(m, i, out);
        /* Asked for once, answered once, whatever the outcome. */
        wanted = g_hash_table_remove(c->wanted, GSIZE_TO_POINTER(e.hash.lo)) || duplicate;
        slot = index_find(&d->index, &b->slots, e.hash);
        if (slot != INDEX_NONE) {
            /* Someone stored it meanwhile: same as a lookup hit. */
            if (client_may_ref(b, c, slot)) {
                take_ref(b, c, slot);
                out[i] = (QdResult) { .result = QD_RESULT_HIT, .slot = slot };
            } else {
                out[i].result = QD_RESULT_QUOTA;
            }
        } else if (!wanted) {
            /* Not asked for: unique pages never cost a pool page. */
        } else if (duplicate) {
            /* The same content earlier in this batch: resolved at commit. */
            out[i].result = RESULT_DUPLICATE;
        } else if ((d->quota && d->slots + need >= d->quota) ||
                   (b->cfg->client_quota &&
                    c->refs.distinct + need >= b->cfg->client_quota)) {
            out[i].result = QD_RESULT_QUOTA;
        } else {
            out[i].result = QD_RESULT_STORED;   /* tentatively; commit checks */
            need++;
        }
    }
    if (need) {
        /* One run for the whole batch keeps a merged run in one VMA. */
        run = pool_alloc_run(&b->pool, need);
    }
    for (uint32_t i = 0, k = 0; i < n; i++) {
        if (out[i].result != QD_RESULT_STORED) {
            continue;
        }
        dest[i] = run != POOL_NO_SLOT ? run + k++ : pool_alloc_run(&b->pool, 1);
        if (dest[i] == POOL_NO_SLOT) {
            out[i].result = QD_RESULT_FULL;
        }
    }
    b->stats.published += n;
}

void broker_publish_commit(Broker *b, BrokerClient *c, const QdMessage *m,
                           const uint64_t *dest, QdResult *out)
{
    Domain *d = c->domain;

    for (uint32_t i = 0; i < m->u.array.count; i++) {
        QdLookupEntry e;
        SlotInfo *si;
        QdHash h;

        qd_lookup_entry_at(m, i, &e);
        if (out[i].result == RESULT_DUPLICATE) {
            /* Its twin earlier in the batch is committed by now. */
            uint64_t slot = index_find(&d->index, &b->slots, e.hash);

            out[i] = (QdResult) { .result = QD_RESULT_MISMATCH };
            if (slot != INDEX_NONE) {
                take_ref(b, c, slot);
                out[i] = (QdResult) { .result = QD_RESULT_HIT, .slot = slot };
            }
            continue;
        }
        if (dest[i] == POOL_NO_SLOT) {
            continue;
        }
        /* I1: what enters the pool is what the broker hashed itself. */
        h = qd_hash_page(pool_page(&b->pool, dest[i]));
        if (!qd_hash_equal(h, e.hash)) {
            pool_free(&b->pool, dest[i]);
            out[i] = (QdResult) { .result = QD_RESULT_MISMATCH };
            c->mismatches++;
            b->stats.mismatches++;
            continue;
        }
        si = slot_table_get(&b->slots, dest[i]);
        *si = (SlotInfo) { .hash = h, .domain = d->id, .flags = SLOT_INDEXED };
        index_insert(&d->index, &b->slots, dest[i]);
        d->slots++;
        candidates_forget(&d->cand, h);
        take_ref(b, c, dest[i]);
        out[i] = (QdResult) { .result = QD_RESULT_STORED, .slot = dest[i] };
        c->stored++;
        d->stored++;
        b->stats.stored++;
    }
}

int broker_unref(Broker *b, BrokerClient *c, const QdMessage *m)
{
    uint32_t n = m->u.array.count;
    g_autoptr(GHashTable) want = g_hash_table_new(g_direct_hash, g_direct_equal);

    /* Validate first (a slot may be named several times): all or nothing. */
    for (uint32_t i = 0; i < n; i++) {
        gpointer key = GSIZE_TO_POINTER(qd_unref_slot_at(m, i));
        guint k = GPOINTER_TO_UINT(g_hash_table_lookup(want, key)) + 1;

        if (qd_unref_slot_at(m, i) >= b->pool.max_slots ||
            refs_count(&c->refs, qd_unref_slot_at(m, i)) < k) {
            return QD_ERR_NOT_HELD;
        }
        g_hash_table_insert(want, key, GUINT_TO_POINTER(k));
    }
    for (uint32_t i = 0; i < n; i++) {
        uint64_t slot = qd_unref_slot_at(m, i);

        refs_remove(&c->refs, slot);
        slot_release(b, slot, 1);
    }
    c->unrefs += n;
    b->stats.unrefs += n;
    return 0;
}

void broker_restore(Broker *b, BrokerClient *c, const QdMessage *m, QdResult *out)
{
    Domain *d = c->domain;

    for (uint32_t i = 0; i < m->u.array.count; i++) {
        QdRestoreEntry e;
        SlotInfo *si;

        qd_restore_entry_at(m, i, &e);
        out[i] = (QdResult) { .result = QD_RESULT_MISMATCH };
        if (e.slot >= b->pool.max_slots) {
            continue;
        }
        si = slot_table_get(&b->slots, e.slot);
        if (pool_slot_used(&b->pool, e.slot)) {
            /* Known already (restored by another client or stored since):
             * only the same content, and only within the same domain. */
            if (si->domain != d->id || !qd_hash_equal(si->hash, e.hash)) {
                continue;
            }
        } else {
            QdHash h = qd_hash_page(pool_page(&b->pool, e.slot));

            if (!qd_hash_equal(h, e.hash) || !pool_claim(&b->pool, e.slot)) {
                continue;
            }
            *si = (SlotInfo) { .hash = h, .domain = d->id };
            if (index_find(&d->index, &b->slots, h) == INDEX_NONE) {
                si->flags = SLOT_INDEXED;
                index_insert(&d->index, &b->slots, e.slot);
                d->slots++;
            }
        }
        /* No quota check: the client maps this slot already. */
        take_ref(b, c, e.slot);
        out[i] = (QdResult) { .result = QD_RESULT_HIT, .slot = e.slot };
        c->restored++;
        b->stats.restored++;
    }
}

void broker_rotate_candidates(Broker *b)
{
    for (guint i = 0; i < b->domain_ids->len; i++) {
        Domain *d = g_ptr_array_index(b->domain_ids, i);

        if (d) {
            candidates_rotate(&d->cand);
        }
    }
}

void broker_tick(Broker *b, gint64 now)
{
    g_autoptr(GError) err = NULL;

    if (b->recovering && now >= b->recover_deadline) {
        g_message("no client handed the previous pool back within %u s: "
                  "starting a new pool", b->cfg->restart_grace);
        b->recovering = FALSE;
        if (!pool_create(&b->pool, b->cfg->pool_max, &err)) {
            g_critical("%s", err->message);
            return;
        }
        b->have_pool = TRUE;
        restart_write_state(b);
    }
    if (b->sweep_at && now >= b->sweep_at) {
        uint64_t n = pool_punch_unused(&b->pool);

        b->sweep_at = 0;
        b->stats.frees += n;
        g_message("restart complete: %" G_GUINT64_FORMAT " slots restored, %"
                  G_GUINT64_FORMAT " unclaimed slots freed", b->pool.nused, n);
        restart_write_state(b);
    }
}

MetadataBytes broker_metadata_bytes(Broker *b)
{
    MetadataBytes mb = { .slot_table = slot_table_bytes(&b->slots) };
    GHashTableIter it;
    gpointer v;

    if (b->have_pool) {
        mb.pool_bitmap = (b->pool.max_slots + 63) / 64 * 8;
    }
    for (guint i = 0; i < b->domain_ids->len; i++) {
        Domain *d = g_ptr_array_index(b->domain_ids, i);

        if (d) {
            mb.index += index_bytes(&d->index);
            mb.candidates += candidates_bytes(&d->cand);
            mb.other += sizeof(*d);
        }
    }
    g_hash_table_iter_init(&it, b->clients);
    while (g_hash_table_iter_next(&it, NULL, &v)) {
        BrokerClient *c = v;

        mb.client_refs += c->refs.chunks ? refs_bytes(&c->refs) : 0;
        mb.other += sizeof(*c) + g_hash_table_size(c->wanted) * 3 * sizeof(void *);
    }
    mb.total = mb.slot_table + mb.pool_bitmap + mb.index + mb.candidates +
               mb.client_refs + mb.other;
    return mb;
}

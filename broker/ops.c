/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * What the broker does for each request (see broker.h for the invariants).
 *
 * A page's way into its domain's pool:
 *  1. LOOKUP of its hash.  Found in the domain's index: HIT, the client
 *     now holds a reference and compares the slot with its page itself
 *     (the broker never vouches for the client's hash).  Not found: the
 *     hash is remembered as a candidate (MISS), at no pool cost, unless a
 *     different page already left the same hash there: then PUBLISH.
 *  2. PUBLISH of the content: received straight into a new slot, hashed by
 *     the broker, indexed if the hash is the one claimed (STORED).
 * So a page enters the pool only once a second identical page exists.
 *
 * Every table a request touches is placed by the broker's keyed hash
 * (keyed.h) and bounded: candidates per user by uid-candidates,
 * outstanding PUBLISH requests by MAX_WANTED, references by client-quota.
 */
#include <string.h>
#include <unistd.h>

#include "broker.h"
#include "peer.h"

#define MAX_WANTED 65536    /* outstanding PUBLISH requests per client */

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
    keyed_init(&b->key, cfg->hash_seed);
    b->domains = g_hash_table_new(g_str_hash, g_str_equal);
    b->domain_ids = g_hash_table_new(g_direct_hash, g_direct_equal);
    b->next_domain_id = 1;
    b->pending = g_ptr_array_new();
    b->prev_clients = g_hash_table_new_full(g_direct_hash, g_direct_equal, NULL, g_free);
    b->clients = g_hash_table_new(g_direct_hash, g_direct_equal);
    b->budgets = g_hash_table_new_full(g_direct_hash, g_direct_equal, NULL, g_free);
    b->cand_gen = 1;
    b->scan_owner = b;
    restart_read_state(b);
    if (b->pending->len) {
        g_message("%u pools of the previous broker may come back; waiting up to %u s "
                  "for their clients to hand them back", b->pending->len,
                  cfg->restart_grace);
    }
    return TRUE;
}

static void pending_free(gpointer p)
{
    PendingPool *pp = p;

    g_free(pp->name);
    g_free(pp);
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

void broker_destroy(Broker *b)
{
    GHashTableIter it;
    gpointer v;

    /* Clients keep mapping their slots across a broker restart: free only
     * our bookkeeping, never a slot (the state file names the pools). */
    g_hash_table_iter_init(&it, b->clients);
    while (g_hash_table_iter_next(&it, NULL, &v)) {
        client_forget(v);
        g_hash_table_iter_steal(&it);
    }
    g_hash_table_destroy(b->clients);
    g_hash_table_destroy(b->budgets);
    g_hash_table_iter_init(&it, b->domain_ids);
    while (g_hash_table_iter_next(&it, NULL, &v)) {
        Domain *d = v;

        pool_destroy(&d->pool);
        index_destroy(&d->index);
        candidates_destroy(&d->cand);
        slot_table_destroy(&d->slots);
        if (d->open_secret) {
            g_bytes_unref(d->open_secret);
        }
        g_free(d->name);
        g_free(d);
    }
    g_hash_table_destroy(b->domain_ids);
    g_hash_table_destroy(b->domains);
    for (guint i = 0; i < b->pending->len; i++) {
        pending_free(g_ptr_array_index(b->pending, i));
    }
    g_ptr_array_free(b->pending, TRUE);
    g_hash_table_destroy(b->prev_clients);
    b->scan_owner = NULL;
}

gboolean broker_peer_allowed(Broker *b, uid_t uid, gid_t gid, const GArray *groups)
{
    return uid == 0 || uid == geteuid() ||
           config_ids_admit(b->cfg->allow_uids, b->cfg->allow_gids, uid, gid, groups);
}

BrokerClient *broker_client_new(Broker *b, int sock, pid_t pid, uid_t uid, gid_t gid)
{
    BrokerClient *c = g_new0(BrokerClient, 1);

    /* Random ids: a sequence would tell a client how many others came. */
    do {
        c->id = g_random_int();
    } while (c->id == 0 || g_hash_table_contains(b->clients, GUINT_TO_POINTER(c->id)));
    c->cand_owner = c->id;
    c->sock = sock;
    c->pidfd = -1;
    c->pid = pid;
    c->uid = uid;
    c->gid = gid;
    c->connected_at = g_get_monotonic_time();
    c->wanted = g_hash_table_new(g_direct_hash, g_direct_equal);
    c->cand_budget = g_hash_table_lookup(b->budgets, GUINT_TO_POINTER(uid));
    if (!c->cand_budget) {
        c->cand_budget = g_new0(CandBudget, 1);
        c->cand_budget->max = b->cfg->uid_candidates;
        g_hash_table_insert(b->budgets, GUINT_TO_POINTER(uid), c->cand_budget);
    }
    g_hash_table_insert(b->clients, GUINT_TO_POINTER(c->id), c);
    b->stats.clients_total++;
    return c;
}

typedef struct Release {
    Broker *b;
    Domain *d;
} Release;

static void release_one(uint64_t slot, void *opaque)
{
    Release *r = opaque;

    domain_slot_release(r->b, r->d, slot);
}

void broker_client_free(Broker *b, BrokerClient *c)
{
    Domain *d = c->domain;

    if (d) {
        Release r = { b, d };

        refs_foreach(&c->refs, release_one, &r);
        d->nclients--;
    }
    g_hash_table_remove(b->clients, GUINT_TO_POINTER(c->id));
    client_forget(c);
    if (d) {
        domain_maybe_free(b, d);
    }
}

gboolean broker_process_alive(BrokerClient *c)
{
    /* Without a pidfd we cannot tell: never free what a live process may map. */
    return c->pidfd < 0 || peer_pidfd_alive(c->pidfd);
}

static BrokerClient *find_orphan(Broker *b, pid_t pid, Domain *d, BrokerClient *not);

/* Move c's references into o (same process, same domain); free c. */
static void merge_orphan(Broker *b, BrokerClient *o, BrokerClient *c)
{
    for (uint64_t k = 0; k < c->refs.nchunks; k++) {
        for (uint64_t w = 0; c->refs.chunks[k] && w < 32768 / 64; w++) {
            for (uint64_t bits = c->refs.chunks[k][w]; bits; bits &= bits - 1) {
                uint64_t slot = k * 32768 + w * 64 + __builtin_ctzll(bits);

                if (!refs_add(&o->refs, slot)) {
                    /* Both held it: one reference for the one process now. */
                    c->domain->slots.info[slot].refs--;
                }
            }
        }
    }
    refs_destroy(&c->refs);
    c->domain->nclients--;
    g_hash_table_remove(b->clients, GUINT_TO_POINTER(c->id));
    client_forget(c);
}

gboolean broker_client_orphan(Broker *b, BrokerClient *c, gboolean *merged)
{
    BrokerClient *o;

    *merged = FALSE;
    if (!c->domain || c->refs.held == 0 || !broker_process_alive(c)) {
        return FALSE;
    }
    c->sock = -1;
    g_hash_table_remove_all(c->wanted);
    o = find_orphan(b, c->pid, c->domain, c);
    if (o) {
        merge_orphan(b, o, c);
        *merged = TRUE;
        return FALSE;
    }
    return TRUE;
}

/*
 * An orphan left by this very process (alive, so its pid is its own).  One
 * the broker could not watch (no pidfd) may be of an earlier process with
 * the same pid: handing its references over is still safe, they are only
 * released later, when this process exits.
 */
static BrokerClient *find_orphan(Broker *b, pid_t pid, Domain *d, BrokerClient *not)
{
    GHashTableIter it;
    gpointer v;

    g_hash_table_iter_init(&it, b->clients);
    while (g_hash_table_iter_next(&it, NULL, &v)) {
        BrokerClient *o = v;

        if (o != not && o->sock < 0 && o->pid == pid && o->domain == d &&
            broker_process_alive(o)) {
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

/*
 * May this client join the domain it names?  The host declares domains
 * ([domain NAME] in the configuration); with open-domains, a domain not
 * configured exists only with a secret, set by its first client.
 */
static int domain_allowed(Broker *b, BrokerClient *c, const QdHello *h,
                          const GArray *groups, char **msg, gboolean *auth_failed)
{
    const DomainPolicy *p;
    Domain *d;

    if (!*h->domain) {
        return 0;
    }
    p = g_hash_table_lookup(b->cfg->domains, h->domain);
    if (!p) {
        if (!b->cfg->open_domains) {
            *msg = g_strdup_printf("domain '%s' is not configured on this broker "
                                   "(add [domain %s] to its configuration)",
                                   h->domain, h->domain);
            *auth_failed = TRUE;
            return QD_ERR_DENIED;
        }
        if (h->secret_len < OPEN_DOMAIN_SECRET_MIN) {
            *msg = g_strdup_printf("domain '%s' is not configured on this broker: with "
                                   "open-domains it needs a secret of at least %u bytes",
                                   h->domain, OPEN_DOMAIN_SECRET_MIN);
            *auth_failed = TRUE;
            return QD_ERR_DENIED;
        }
        d = g_hash_table_lookup(b->domains, h->domain);
        if (d && d->open_secret && !secret_ok(d->open_secret, h->secret, h->secret_len)) {
            *msg = g_strdup_printf("wrong secret for domain '%s'", h->domain);
            *auth_failed = TRUE;
            return QD_ERR_DENIED;
        }
        return 0;
    }
    if ((p->uids || p->gids) &&
        !config_ids_admit(p->uids, p->gids, c->uid, c->gid, groups)) {
        *msg = g_strdup_printf("uid %u may not join domain '%s'",
                               (unsigned)c->uid, h->domain);
        *auth_failed = TRUE;
        return QD_ERR_DENIED;
    }
    if (p->secret && !secret_ok(p->secret, h->secret, h->secret_len)) {
        *msg = g_strdup_printf("wrong or missing secret for domain '%s'", h->domain);
        *auth_failed = TRUE;
        return QD_ERR_DENIED;
    }
    return 0;
}

static PendingPool *pending_find(Broker *b, uint64_t dev, uint64_t ino, const char *name)
{
    for (guint i = 0; i < b->pending->len; i++) {
        PendingPool *pp = g_ptr_array_index(b->pending, i);

        if (name ? (*name && !strcmp(pp->name, name)) : (pp->dev == dev && pp->ino == ino)) {
            return pp;
        }
    }
    return NULL;
}

/*
 * HELLO with RECONNECT: the client names, by descriptor number, the pool
 * it kept.  It may join that pool's domain only if it holds that very pool
 * (a descriptor is a capability), and only the domain it names.
 */
static int take_back_pool(Broker *b, BrokerClient *c, const QdHello *h, Domain **dp,
                          QdHelloReply *reply, char **msg)
{
    Domain *d = domain_by_pool(b, h->pool_dev, h->pool_ino);
    PendingPool *pp;
    int fd;

    if (d) {
        if (strcmp(d->name, h->domain)) {
            *msg = g_strdup_printf("the handed-back pool is not the pool of domain '%s'",
                                   h->domain);
            return QD_ERR_DENIED;
        }
        if (!peer_holds_file(c->pidfd, c->pid, h->pool_fd, d->pool.ro_fd)) {
            *msg = g_strdup_printf("descriptor %u of pid %d is not the pool it names",
                                   h->pool_fd, (int)c->pid);
            return QD_ERR_DENIED;
        }
        *dp = d;
        return 0;
    }
    pp = pending_find(b, h->pool_dev, h->pool_ino, NULL);
    if (!pp) {
        *msg = g_strdup("this broker does not have the handed-back pool any more");
        return QD_ERR_POOL_CHANGED;
    }
    if (strcmp(pp->name, h->domain)) {
        *msg = g_strdup_printf("the handed-back pool is not the pool of domain '%s'",
                               h->domain);
        return QD_ERR_DENIED;
    }
    fd = peer_take_pool(c->pidfd, c->pid, h->pool_fd, pp->dev, pp->ino, c->uid, msg);
    if (fd < 0) {
        return QD_ERR_DENIED;
    }
    d = domain_adopt(b, pp->name, fd, msg);
    if (!d) {
        close(fd);      /* our own copy of a memfd: closing it cannot block */
        return QD_ERR_INTERNAL;
    }
    g_ptr_array_remove_fast(b->pending, pp);
    pending_free(pp);
    restart_write_state(b);
    g_message("adopted the previous pool of %s (inode %" G_GUINT64_FORMAT ") from pid %d; "
              "%" G_GUINT64_FORMAT " slots held until restored or unmapped",
              *d->name ? d->name : "a private domain", (uint64_t)d->pool.ino, (int)c->pid,
              d->pool.nheld);
    reply->flags |= QD_REPLY_ADOPTED;
    *dp = d;
    return 0;
}

int broker_hello(Broker *b, BrokerClient *c, const QdHello *h, const GArray *groups,
                 QdHelloReply *reply, int *ro_fd, char **msg, gboolean *auth_failed)
{
    gboolean reconnect = h->flags & QD_HELLO_RECONNECT;
    Domain *d = NULL;
    int ret;

    *ro_fd = -1;
    *auth_failed = FALSE;
    if (c->domain) {
        *msg = g_strdup("HELLO sent twice");
        return QD_ERR_STATE;
    }
    if (h->version != QD_PROTO_VERSION) {
        *msg = g_strdup_printf("protocol version %u is not supported (this broker: %u)",
                               h->version, QD_PROTO_VERSION);
        return QD_ERR_VERSION;
    }
    ret = domain_allowed(b, c, h, groups, msg, auth_failed);
    if (ret) {
        return ret;
    }
    if (reconnect) {
        ret = take_back_pool(b, c, h, &d, reply, msg);
        if (ret) {
            return ret;
        }
    } else if (*h->domain) {
        d = g_hash_table_lookup(b->domains, h->domain);
        if (!d) {
            PendingPool *pp = pending_find(b, 0, 0, h->domain);

            if (pp) {
                gint64 left = (pp->deadline - g_get_monotonic_time()) / G_USEC_PER_SEC;

                *msg = g_strdup_printf("broker restarting, domain '%s' not recovered yet: "
                                       "retry in %" G_GINT64_FORMAT " s", h->domain,
                                       MAX(left, 1));
                return QD_ERR_RETRY;
            }
            d = domain_create(b, h->domain, msg);
            if (!d) {
                return QD_ERR_DENIED;
            }
        }
    } else {
        d = domain_create(b, "", msg);
        if (!d) {
            return QD_ERR_DENIED;
        }
    }
    if (!d->policy && *d->name && !d->open_secret) {
        /* open-domains: the first client sets the secret (domain_allowed checked it). */
        d->open_secret = g_bytes_new(h->secret, h->secret_len);
    }
    c->domain = d;
    d->nclients++;
    c->start_time = peer_start_time(c->pid);
    restart_write_state(b);     /* it may map the pool from now on: recorded */
    g_strlcpy(c->name, h->name, sizeof(c->name));
    memcpy(c->uuid, h->uuid, sizeof(c->uuid));
    if (h->pid && h->pid != (uint32_t)c->pid && b->cfg->verbose) {
        g_message("client %u says pid %u, kernel says %d", c->id, h->pid, (int)c->pid);
    }
    refs_init(&c->refs, d->pool.max_slots);
    if (reconnect) {
        BrokerClient *o = find_orphan(b, c->pid, d, c);

        if (o) {
            /* Same process, same mappings: its references carry over. */
            ClientRefs keep = c->refs;

            c->refs = o->refs;
            o->refs = keep;
            c->cand_owner = o->cand_owner;
            reply->flags |= QD_REPLY_REFS_KEPT;
            broker_client_free(b, o);
        }
    }

    reply->version = QD_PROTO_VERSION;
    reply->client_id = c->id;
    reply->page_size = QD_PAGE_SIZE;
    reply->max_lookup = QD_MAX_LOOKUP;
    reply->max_publish = QD_MAX_PUBLISH;
    reply->pool_slots = d->pool.max_slots;
    reply->client_quota = b->cfg->client_quota;
    reply->domain_quota = d->quota;
    reply->pool_dev = d->pool.dev;
    reply->pool_ino = d->pool.ino;
    *ro_fd = d->pool.ro_fd;
    return 0;
}

/* May the client take a reference to slot (one it does not hold yet)? */
static gboolean client_may_ref(Broker *b, BrokerClient *c, uint64_t slot)
{
    return !b->cfg->client_quota || refs_held(&c->refs, slot) ||
           c->refs.held < b->cfg->client_quota;
}

static void take_ref(Domain *d, BrokerClient *c, uint64_t slot)
{
    if (refs_add(&c->refs, slot)) {
        d->slots.info[slot].refs++;
    }
}

/* Entries ahead whose table cells are fetched while one is looked up. */
#define PREFETCH_AHEAD 8

void broker_lookup(Broker *b, BrokerClient *c, const QdMessage *m, QdResult *out)
{
    Domain *d = c->domain;
    uint64_t khs[QD_MAX_LOOKUP];
    uint32_t n = MIN(m->u.array.count, QD_MAX_LOOKUP);

    /*
     * Keyed positions are random, so each lookup would wait for a cache
     * miss or two: compute them all first and fetch the cells a few
     * entries ahead, so that the misses overlap.
     */
    for (uint32_t i = 0; i < n; i++) {
        QdLookupEntry e;

        qd_lookup_entry_at(m, i, &e);
        khs[i] = keyed_hash(&b->key, e.hash);
        if (i < PREFETCH_AHEAD) {
            index_prefetch(&d->index, khs[i]);
            candidates_prefetch(&d->cand, khs[i]);
        }
    }
    for (uint32_t i = 0; i < n; i++) {
        QdLookupEntry e;
        uint64_t slot, kh = khs[i];

        if (i + PREFETCH_AHEAD < n) {
            index_prefetch(&d->index, khs[i + PREFETCH_AHEAD]);
            candidates_prefetch(&d->cand, khs[i + PREFETCH_AHEAD]);
        }
        qd_lookup_entry_at(m, i, &e);
        out[i] = (QdResult) { .result = QD_RESULT_MISS };
        slot = index_find(&d->index, &d->slots, e.hash, kh);
        if (slot != INDEX_NONE) {
            if (!client_may_ref(b, c, slot)) {
                out[i].result = QD_RESULT_QUOTA;
                continue;
            }
            take_ref(d, c, slot);
            out[i] = (QdResult) { .result = QD_RESULT_HIT, .slot = slot };
            c->hits++;
            d->hits++;
            b->stats.hits++;
            continue;
        }
        switch (candidates_check(&d->cand, kh, c->cand_owner, e.cookie, c->cand_budget,
                                 b->cand_gen)) {
        case CAND_MATCH:
            if (g_hash_table_size(c->wanted) >= MAX_WANTED) {
                g_hash_table_remove_all(c->wanted);
            }
            g_hash_table_add(c->wanted, GSIZE_TO_POINTER(kh));
            out[i].result = QD_RESULT_PUBLISH;
            c->asked++;
            b->stats.asked++;
            break;
        case CAND_OVER:
            b->stats.candidates_refused++;
            /* fall through */
        default:
            c->misses++;
            b->stats.misses++;
            break;
        }
    }
    c->lookups += n;
    d->lookups += n;
    b->stats.lookups += n;
}

void broker_publish_plan(Broker *b, BrokerClient *c, const QdMessage *m,
                         uint64_t *dest, QdResult *out)
{
    Domain *d = c->domain;
    uint32_t n = m->u.array.count, need = 0;
    uint64_t run = POOL_NO_SLOT;

    for (uint32_t i = 0; i < n; i++) {
        QdLookupEntry e;
        uint64_t slot, kh;
        gboolean wanted, duplicate;

        qd_lookup_entry_at(m, i, &e);
        kh = keyed_hash(&b->key, e.hash);
        dest[i] = POOL_NO_SLOT;
        out[i] = (QdResult) { .result = QD_RESULT_UNWANTED };
        duplicate = same_as_earlier(m, i, out);
        /* Asked for once, answered once, whatever the outcome. */
        wanted = g_hash_table_remove(c->wanted, GSIZE_TO_POINTER(kh)) || duplicate;
        slot = index_find(&d->index, &d->slots, e.hash, kh);
        if (slot != INDEX_NONE) {
            /* Someone stored it meanwhile: same as a lookup hit. */
            if (client_may_ref(b, c, slot)) {
                take_ref(d, c, slot);
                out[i] = (QdResult) { .result = QD_RESULT_HIT, .slot = slot };
            } else {
                out[i].result = QD_RESULT_QUOTA;
            }
        } else if (!wanted) {
            /* Not asked for: unique pages never cost a pool page. */
        } else if (duplicate) {
            /* The same content earlier in this batch: resolved at commit. */
            out[i].result = RESULT_DUPLICATE;
        } else if ((d->quota && d->pool.nused + need >= d->quota) ||
                   (b->cfg->client_quota &&
                    c->refs.held + need >= b->cfg->client_quota)) {
            out[i].result = QD_RESULT_QUOTA;
        } else {
            out[i].result = QD_RESULT_STORED;   /* tentatively; commit checks */
            need++;
        }
    }
    if (need) {
        /* One run for the whole batch keeps a merged run in one VMA. */
        run = pool_alloc_run(&d->pool, need);
    }
    for (uint32_t i = 0, k = 0; i < n; i++) {
        if (out[i].result != QD_RESULT_STORED) {
            continue;
        }
        dest[i] = run != POOL_NO_SLOT ? run + k++ : pool_alloc_run(&d->pool, 1);
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
        uint64_t kh;
        QdHash h;

        qd_lookup_entry_at(m, i, &e);
        kh = keyed_hash(&b->key, e.hash);
        if (out[i].result == RESULT_DUPLICATE) {
            /* Its twin earlier in the batch is committed by now. */
            uint64_t slot = index_find(&d->index, &d->slots, e.hash, kh);

            out[i] = (QdResult) { .result = QD_RESULT_MISMATCH };
            if (slot != INDEX_NONE && client_may_ref(b, c, slot)) {
                take_ref(d, c, slot);
                out[i] = (QdResult) { .result = QD_RESULT_HIT, .slot = slot };
            }
            continue;
        }
        if (dest[i] == POOL_NO_SLOT) {
            continue;
        }
        /* I1: what enters the pool is what the broker hashed itself. */
        h = qd_hash_page(pool_page(&d->pool, dest[i]));
        if (!qd_hash_equal(h, e.hash)) {
            pool_free(&d->pool, dest[i]);
            out[i] = (QdResult) { .result = QD_RESULT_MISMATCH };
            c->mismatches++;
            b->stats.mismatches++;
            continue;
        }
        si = slot_table_get(&d->slots, dest[i]);
        *si = (SlotInfo) { .hash = h, .flags = SLOT_INDEXED };
        index_insert(&d->index, &d->slots, dest[i]);
        d->indexed++;
        candidates_forget(&d->cand, kh);
        take_ref(d, c, dest[i]);
        out[i] = (QdResult) { .result = QD_RESULT_STORED, .slot = dest[i] };
        c->stored++;
        d->stored++;
        b->stats.stored++;
    }
}

int broker_unref(Broker *b, BrokerClient *c, const QdMessage *m)
{
    Domain *d = c->domain;
    uint32_t n = m->u.array.count, done;

    /*
     * All or nothing: take the bits off as we check them (a slot named
     * twice fails the second time), and put them back if one fails.
     */
    for (done = 0; done < n; done++) {
        if (!refs_remove(&c->refs, qd_unref_slot_at(m, done))) {
            break;
        }
    }
    if (done < n) {
        for (uint32_t i = 0; i < done; i++) {
            refs_add(&c->refs, qd_unref_slot_at(m, i));
        }
        return QD_ERR_NOT_HELD;
    }
    for (uint32_t i = 0; i < n; i++) {
        domain_slot_release(b, d, qd_unref_slot_at(m, i));
    }
    c->unrefs += n;
    b->stats.unrefs += n;
    return 0;
}

/*
 * RESTORE, after a restart: a client of the domain re-registers a slot it
 * still maps.  Only while the domain recovers, only for slots held since
 * the adoption, only with the content's exact hash, and within the
 * client's quota; anything else is refused and changes nothing.
 */
static uint32_t restore_one(Broker *b, BrokerClient *c, const QdRestoreEntry *e)
{
    Domain *d = c->domain;
    SlotInfo *si;

    if (!d->recovering || !pool_slot_held(&d->pool, e->slot)) {
        return QD_RESULT_REFUSED;
    }
    if (refs_held(&c->refs, e->slot)) {
        return qd_hash_equal(d->slots.info[e->slot].hash, e->hash) ? QD_RESULT_HIT
                                                                   : QD_RESULT_MISMATCH;
    }
    if (!client_may_ref(b, c, e->slot)) {
        return QD_RESULT_QUOTA;
    }
    if (pool_slot_used(&d->pool, e->slot)) {
        /* Restored by another client of the domain already. */
        if (!qd_hash_equal(d->slots.info[e->slot].hash, e->hash)) {
            return QD_RESULT_MISMATCH;
        }
    } else {
        /* Held slots hold data: hashing them allocates nothing. */
        QdHash h = qd_hash_page(pool_page(&d->pool, e->slot));

        if (!qd_hash_equal(h, e->hash) || !pool_claim(&d->pool, e->slot)) {
            return QD_RESULT_MISMATCH;
        }
        si = slot_table_get(&d->slots, e->slot);
        *si = (SlotInfo) { .hash = h };
        if (index_find(&d->index, &d->slots, h, keyed_hash(&b->key, h)) == INDEX_NONE) {
            si->flags = SLOT_INDEXED;
            index_insert(&d->index, &d->slots, e->slot);
            d->indexed++;
        }
    }
    take_ref(d, c, e->slot);
    return QD_RESULT_HIT;
}

void broker_restore(Broker *b, BrokerClient *c, const QdMessage *m, QdResult *out)
{
    for (uint32_t i = 0; i < m->u.array.count; i++) {
        QdRestoreEntry e;

        qd_restore_entry_at(m, i, &e);
        out[i] = (QdResult) { .result = restore_one(b, c, &e) };
        if (out[i].result == QD_RESULT_HIT) {
            out[i].slot = e.slot;
            c->restored++;
            c->domain->restored++;
            b->stats.restored++;
        } else {
            c->domain->refused_restores++;
            b->stats.restores_refused++;
        }
    }
}

void broker_rotate_candidates(Broker *b)
{
    GHashTableIter it;
    gpointer v;

    g_hash_table_iter_init(&it, b->domain_ids);
    while (g_hash_table_iter_next(&it, NULL, &v)) {
        candidates_rotate(&((Domain *)v)->cand);
    }
    b->cand_gen++;
}

void broker_tick(Broker *b, gint64 now)
{
    for (guint i = 0; i < b->pending->len;) {
        PendingPool *pp = g_ptr_array_index(b->pending, i);

        if (now < pp->deadline) {
            i++;
            continue;
        }
        g_message("nobody handed back the previous pool of %s within %u s: %s",
                  *pp->name ? pp->name : "a private domain", b->cfg->restart_grace,
                  *pp->name ? "its clients start a new one" : "forgotten");
        g_ptr_array_remove_index_fast(b->pending, i);
        pending_free(pp);
        restart_write_state(b);
    }
    recovery_tick(b, now);
    restart_flush_state(b);
}

MetadataBytes broker_metadata_bytes(Broker *b)
{
    MetadataBytes mb = { 0 };
    GHashTableIter it;
    gpointer v;

    g_hash_table_iter_init(&it, b->domain_ids);
    while (g_hash_table_iter_next(&it, NULL, &v)) {
        Domain *d = v;

        mb.slot_table += slot_table_bytes(&d->slots);
        mb.pool_bitmap += pool_bitmap_bytes(&d->pool);
        mb.index += index_bytes(&d->index);
        mb.candidates += candidates_bytes(&d->cand);
        mb.other += sizeof(*d);
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

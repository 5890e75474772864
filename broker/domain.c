/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Trust domains (ARCHITECTURE I11).  Clients that name the same domain
 * share pages; a client that names none gets a private domain of its own,
 * so it shares with nobody (its own identical pages still merge).  Each
 * domain owns its pool file, so what a client can read through its
 * descriptor is its own domain's pages and nothing else.  A domain lives as
 * long as it has clients, slots, or slots held for recovery.
 */
#include <string.h>

#include "broker.h"

static Domain *domain_new(Broker *b, const char *name, char **msg)
{
    Domain *d;

    if (g_hash_table_size(b->domain_ids) >= b->cfg->max_domains) {
        *msg = g_strdup_printf("this broker has as many trust domains as it may "
                               "(max-domains = %u)", b->cfg->max_domains);
        return NULL;
    }
    d = g_new0(Domain, 1);
    do {
        d->id = b->next_domain_id++;
    } while (d->id == 0 || g_hash_table_contains(b->domain_ids, GUINT_TO_POINTER(d->id)));
    d->name = g_strdup(name);
    d->policy = *name ? g_hash_table_lookup(b->cfg->domains, name) : NULL;
    d->quota = d->policy && d->policy->quota ? d->policy->quota : b->cfg->domain_quota;
    slot_table_init(&d->slots);
    index_init(&d->index, &b->key);
    candidates_init(&d->cand);
    return d;
}

static void domain_register(Broker *b, Domain *d)
{
    g_hash_table_insert(b->domain_ids, GUINT_TO_POINTER(d->id), d);
    if (*d->name) {
        g_hash_table_insert(b->domains, d->name, d);
    }
    restart_write_state(b);
    if (d->policy) {
        /*
         * A declared domain's pool is recorded before its first client can
         * map it: a crash in the next second would otherwise leave every
         * VM of the domain holding a pool no broker takes back.  Declared
         * domains are few (the configuration's); private and open ones
         * wait for the tick, so that clients making them cost no writes.
         */
        restart_flush_state(b);
    }
}

static void domain_free_struct(Domain *d)
{
    index_destroy(&d->index);
    candidates_destroy(&d->cand);
    slot_table_destroy(&d->slots);
    if (d->open_secret) {
        g_bytes_unref(d->open_secret);
    }
    g_free(d->name);
    g_free(d);
}

Domain *domain_create(Broker *b, const char *name, char **msg)
{
    g_autoptr(GError) err = NULL;
    Domain *d = domain_new(b, name, msg);

    if (!d) {
        return NULL;
    }
    if (!pool_create(&d->pool, b->cfg->pool_max, &err)) {
        *msg = g_strdup(err->message);
        domain_free_struct(d);
        return NULL;
    }
    domain_register(b, d);
    return d;
}

Domain *domain_adopt(Broker *b, const char *name, int ro_fd, char **msg)
{
    g_autoptr(GError) err = NULL;
    Domain *d = domain_new(b, name, msg);

    if (!d) {
        return NULL;
    }
    if (!pool_adopt(&d->pool, ro_fd, b->cfg->pool_max, &err)) {
        *msg = g_strdup(err->message);
        domain_free_struct(d);
        return NULL;
    }
    domain_register(b, d);
    recovery_start(b, d);
    return d;
}

Domain *domain_by_pool(Broker *b, uint64_t dev, uint64_t ino)
{
    GHashTableIter it;
    gpointer v;

    g_hash_table_iter_init(&it, b->domain_ids);
    while (g_hash_table_iter_next(&it, NULL, &v)) {
        Domain *d = v;

        if (d->pool.dev == dev && d->pool.ino == ino) {
            return d;
        }
    }
    return NULL;
}

void domain_maybe_free(Broker *b, Domain *d)
{
    if (d->nclients || d->pool.nused || d->pool.nheld) {
        return;
    }
    g_hash_table_remove(b->domain_ids, GUINT_TO_POINTER(d->id));
    if (*d->name) {
        g_hash_table_remove(b->domains, d->name);
    }
    /* Nobody maps it: the memory goes with the last descriptor. */
    pool_destroy(&d->pool);
    domain_free_struct(d);
    restart_write_state(b);
}

void domain_slot_release(Broker *b, Domain *d, uint64_t slot)
{
    SlotInfo *si = &d->slots.info[slot];

    if (si->refs == 0) {
        return;     /* cannot happen: refs counts the clients' bits */
    }
    if (--si->refs) {
        return;
    }
    if (si->flags & SLOT_INDEXED) {
        index_remove(&d->index, &d->slots, slot);
        d->indexed--;
    }
    pool_free(&d->pool, slot);
    memset(si, 0, sizeof(*si));
    b->stats.frees++;
    domain_maybe_free(b, d);
}

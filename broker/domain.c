/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Trust domains.  Clients that name the same domain share pages; a client
 * that names none gets a private domain of its own, so it shares with
 * nobody (its pages may still merge with each other).  A domain lives as
 * long as it has clients or slots.
 */
#include "broker.h"

static Domain *domain_new(Broker *b, const char *name)
{
    Domain *d = g_new0(Domain, 1);
    guint id;

    /* Lowest free id; ids are 16-bit (SlotInfo.domain). */
    for (id = 0; id < b->domain_ids->len && g_ptr_array_index(b->domain_ids, id); id++) {
    }
    if (id > UINT16_MAX) {
        g_free(d);
        return NULL;
    }
    if (id == b->domain_ids->len) {
        g_ptr_array_add(b->domain_ids, NULL);
    }
    g_ptr_array_index(b->domain_ids, id) = d;
    d->id = id;
    d->name = g_strdup(name);
    d->policy = *name ? g_hash_table_lookup(b->cfg->domains, name) : NULL;
    d->quota = d->policy && d->policy->quota ? d->policy->quota : b->cfg->domain_quota;
    index_init(&d->index);
    candidates_init(&d->cand);
    if (*name) {
        g_hash_table_insert(b->domains, d->name, d);
    }
    return d;
}

Domain *domain_join(Broker *b, const char *name)
{
    Domain *d = *name ? g_hash_table_lookup(b->domains, name) : NULL;

    if (!d) {
        d = domain_new(b, name);
        if (!d) {
            return NULL;
        }
    }
    d->nclients++;
    return d;
}

/* Called when a client leaves and when a domain's last slot is freed. */
void domain_leave(Broker *b, Domain *d)
{
    if (d->nclients || d->slots) {
        return;
    }
    if (*d->name) {
        g_hash_table_remove(b->domains, d->name);
    }
    g_ptr_array_index(b->domain_ids, d->id) = NULL;
    index_destroy(&d->index);
    candidates_destroy(&d->cand);
    g_free(d->name);
    g_free(d);
}

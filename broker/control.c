/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The control socket (see control.h).  Only root, the broker's own user
 * and control-uids may use it (SO_PEERCRED; the socket is also mode 0600).
 * Requests are tiny and answered at once; a peer gets one second to send
 * its request line, so a stuck operator tool cannot stall the broker.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <glib-unix.h>
#include <json-glib/json-glib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "control.h"
#include "server.h"

#define REQUEST_MAX 1024

static void add_int(JsonBuilder *jb, const char *name, uint64_t v)
{
    json_builder_set_member_name(jb, name);
    json_builder_add_int_value(jb, (gint64)v);
}

static const char *domain_label(const Domain *d)
{
    return *d->name ? d->name : "";
}

/* Slots of d and the references to them: the saving is refs - slots pages. */
static uint64_t domain_refs(const Domain *d)
{
    uint64_t refs = 0;

    for (uint64_t s = 0; s < d->pool.high_water && s < d->slots.len; s++) {
        if (pool_slot_used(&d->pool, s)) {
            refs += d->slots.info[s].refs;
        }
    }
    return refs;
}

static void build_stats(Control *ctl, JsonBuilder *jb)
{
    Broker *b = ctl->broker;
    uint64_t used = 0, held = 0, refs = 0, orphans = 0, cands = 0, resident = 0, probes = 0;
    uint64_t recovering = 0;
    MetadataBytes mb = broker_metadata_bytes(b);
    GHashTableIter it;
    gpointer v;

    g_hash_table_iter_init(&it, b->clients);
    while (g_hash_table_iter_next(&it, NULL, &v)) {
        BrokerClient *c = v;

        orphans += c->sock < 0;
    }
    g_hash_table_iter_init(&it, b->domain_ids);
    while (g_hash_table_iter_next(&it, NULL, &v)) {
        Domain *d = v;

        used += d->pool.nused;
        held += d->pool.nheld;
        refs += domain_refs(d);
        cands += candidates_count(&d->cand);
        resident += pool_resident_bytes(&d->pool);
        probes += d->cand.probes + d->index.probes;
        recovering += d->recovering;
    }
    json_builder_begin_object(jb);
    json_builder_set_member_name(jb, "version");
    json_builder_add_string_value(jb, QDEDUP_VERSION);
    json_builder_set_member_name(jb, "recovering");
    json_builder_add_boolean_value(jb, recovering || b->pending->len);
    add_int(jb, "pools-pending", b->pending->len);
    add_int(jb, "domains-recovering", recovering);
    add_int(jb, "slots-held", held);
    add_int(jb, "pool-max-bytes", b->cfg->pool_max * QD_PAGE_SIZE);
    add_int(jb, "pool-bytes", used * QD_PAGE_SIZE);
    add_int(jb, "pool-resident-bytes", resident);
    add_int(jb, "slots-max", b->cfg->pool_max);
    add_int(jb, "slots-used", used);
    add_int(jb, "clients", g_hash_table_size(b->clients) - orphans);
    add_int(jb, "orphans", orphans);
    add_int(jb, "domains", g_hash_table_size(b->domain_ids));
    add_int(jb, "pages-shared", refs);
    add_int(jb, "saved-bytes", (refs > used ? refs - used : 0) * QD_PAGE_SIZE);
    add_int(jb, "candidates", cands);
    add_int(jb, "lookups", b->stats.lookups);
    json_builder_set_member_name(jb, "lookups-per-second");
    json_builder_add_double_value(jb, ctl->lookup_rate);
    add_int(jb, "table-probes", probes);
    add_int(jb, "hits", b->stats.hits);
    add_int(jb, "misses", b->stats.misses);
    add_int(jb, "publish-requests", b->stats.asked);
    add_int(jb, "publishes", b->stats.published);
    add_int(jb, "stored", b->stats.stored);
    add_int(jb, "mismatches", b->stats.mismatches);
    add_int(jb, "frees", b->stats.frees);
    add_int(jb, "unrefs", b->stats.unrefs);
    add_int(jb, "restored", b->stats.restored);
    add_int(jb, "restores-refused", b->stats.restores_refused);
    add_int(jb, "candidates-refused", b->stats.candidates_refused);
    add_int(jb, "clients-total", b->stats.clients_total);
    add_int(jb, "clients-refused", b->stats.clients_refused);
    add_int(jb, "auth-failures", b->stats.auth_failures);
    add_int(jb, "protocol-errors", b->stats.protocol_errors);
    add_int(jb, "metadata-bytes", mb.total);
    json_builder_set_member_name(jb, "metadata-bytes-per-slot");
    json_builder_add_double_value(jb, used ? (double)mb.total / used : 0);
    json_builder_set_member_name(jb, "metadata");
    json_builder_begin_object(jb);
    add_int(jb, "slot-table", mb.slot_table);
    add_int(jb, "pool-bitmap", mb.pool_bitmap);
    add_int(jb, "index", mb.index);
    add_int(jb, "candidates", mb.candidates);
    add_int(jb, "client-refs", mb.client_refs);
    add_int(jb, "other", mb.other);
    json_builder_end_object(jb);
    json_builder_end_object(jb);
}

typedef struct ClientSaving {
    const Domain *d;
    double pages;
} ClientSaving;

/* A slot held by n clients saves n - 1 pages; each client gets its share. */
static void add_saving(uint64_t slot, void *opaque)
{
    ClientSaving *cs = opaque;
    uint32_t refs = cs->d->slots.info[slot].refs;

    if (refs) {
        cs->pages += 1 - 1.0 / refs;
    }
}

static uint64_t client_saved_bytes(const BrokerClient *c)
{
    ClientSaving cs = { c->domain, 0 };

    if (!c->domain) {
        return 0;
    }
    refs_foreach(&c->refs, add_saving, &cs);
    return (uint64_t)(cs.pages * QD_PAGE_SIZE + 0.5);
}

static void build_clients(Control *ctl, JsonBuilder *jb)
{
    Broker *b = ctl->broker;
    GHashTableIter it;
    gpointer v;
    gint64 now = g_get_monotonic_time();

    json_builder_begin_array(jb);
    g_hash_table_iter_init(&it, b->clients);
    while (g_hash_table_iter_next(&it, NULL, &v)) {
        BrokerClient *c = v;
        g_autofree char *uuid = g_strdup_printf(
            "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
            c->uuid[0], c->uuid[1], c->uuid[2], c->uuid[3], c->uuid[4], c->uuid[5],
            c->uuid[6], c->uuid[7], c->uuid[8], c->uuid[9], c->uuid[10], c->uuid[11],
            c->uuid[12], c->uuid[13], c->uuid[14], c->uuid[15]);

        json_builder_begin_object(jb);
        add_int(jb, "id", c->id);
        add_int(jb, "pid", c->pid);
        add_int(jb, "uid", c->uid);
        json_builder_set_member_name(jb, "name");
        json_builder_add_string_value(jb, c->name);
        json_builder_set_member_name(jb, "uuid");
        json_builder_add_string_value(jb, uuid);
        json_builder_set_member_name(jb, "domain");
        json_builder_add_string_value(jb, c->domain ? domain_label(c->domain) : "");
        add_int(jb, "domain-id", c->domain ? c->domain->id : 0);
        json_builder_set_member_name(jb, "state");
        json_builder_add_string_value(jb, c->sock < 0 ? "orphan" :
                                      c->domain ? "connected" : "handshake");
        add_int(jb, "slots", c->refs.held);
        add_int(jb, "saved-bytes", client_saved_bytes(c));
        add_int(jb, "lookups", c->lookups);
        add_int(jb, "hits", c->hits);
        add_int(jb, "misses", c->misses);
        add_int(jb, "publish-requests", c->asked);
        add_int(jb, "stored", c->stored);
        add_int(jb, "mismatches", c->mismatches);
        add_int(jb, "unrefs", c->unrefs);
        add_int(jb, "restored", c->restored);
        add_int(jb, "connected-seconds", (now - c->connected_at) / G_USEC_PER_SEC);
        json_builder_end_object(jb);
    }
    json_builder_end_array(jb);
}

static void build_domains(Control *ctl, JsonBuilder *jb)
{
    Broker *b = ctl->broker;
    GHashTableIter it;
    gpointer v;

    json_builder_begin_array(jb);
    g_hash_table_iter_init(&it, b->domain_ids);
    while (g_hash_table_iter_next(&it, NULL, &v)) {
        Domain *d = v;
        uint64_t refs = domain_refs(d);

        json_builder_begin_object(jb);
        add_int(jb, "id", d->id);
        json_builder_set_member_name(jb, "name");
        json_builder_add_string_value(jb, domain_label(d));
        json_builder_set_member_name(jb, "private");
        json_builder_add_boolean_value(jb, !*d->name);
        json_builder_set_member_name(jb, "configured");
        json_builder_add_boolean_value(jb, d->policy != NULL);
        json_builder_set_member_name(jb, "recovering");
        json_builder_add_boolean_value(jb, d->recovering);
        add_int(jb, "pool-inode", d->pool.ino);
        add_int(jb, "clients", d->nclients);
        add_int(jb, "slots", d->pool.nused);
        add_int(jb, "slots-held", d->pool.nheld);
        add_int(jb, "pool-resident-bytes", pool_resident_bytes(&d->pool));
        add_int(jb, "pages-shared", refs);
        add_int(jb, "saved-bytes",
                (refs > d->pool.nused ? refs - d->pool.nused : 0) * QD_PAGE_SIZE);
        add_int(jb, "quota-bytes", d->quota * QD_PAGE_SIZE);
        add_int(jb, "candidates", candidates_count(&d->cand));
        add_int(jb, "lookups", d->lookups);
        add_int(jb, "hits", d->hits);
        add_int(jb, "stored", d->stored);
        add_int(jb, "restored", d->restored);
        add_int(jb, "restores-refused", d->refused_restores);
        json_builder_end_object(jb);
    }
    json_builder_end_array(jb);
}

char *control_reply(Control *ctl, const char *request)
{
    g_autoptr(JsonParser) parser = json_parser_new();
    g_autoptr(JsonBuilder) jb = json_builder_new();
    g_autoptr(JsonGenerator) gen = json_generator_new();
    g_autoptr(JsonNode) root = NULL;
    JsonNode *req;
    const char *cmd = NULL;

    if (json_parser_load_from_data(parser, request, -1, NULL) &&
        (req = json_parser_get_root(parser)) && JSON_NODE_HOLDS_OBJECT(req)) {
        JsonObject *o = json_node_get_object(req);

        if (json_object_has_member(o, "command")) {
            cmd = json_object_get_string_member_with_default(o, "command", NULL);
        }
    }
    json_builder_begin_object(jb);
    if (g_strcmp0(cmd, "stats") == 0) {
        json_builder_set_member_name(jb, "return");
        build_stats(ctl, jb);
    } else if (g_strcmp0(cmd, "clients") == 0) {
        json_builder_set_member_name(jb, "return");
        build_clients(ctl, jb);
    } else if (g_strcmp0(cmd, "domains") == 0) {
        json_builder_set_member_name(jb, "return");
        build_domains(ctl, jb);
    } else {
        json_builder_set_member_name(jb, "error");
        json_builder_add_string_value(jb, cmd ? "unknown command (known: stats, clients, domains)"
                                              : "expected {\"command\": NAME}");
    }
    json_builder_end_object(jb);
    root = json_builder_get_root(jb);
    json_generator_set_root(gen, root);
    return json_generator_to_data(gen, NULL);
}

/* One descriptor kept spare, so the control socket answers at the limit. */
static int reserve_fd = -1;

static int accept_with_reserve(int lsock)
{
    int sock = accept4(lsock, NULL, NULL, SOCK_CLOEXEC);

    if (sock < 0 && (errno == EMFILE || errno == ENFILE) && reserve_fd >= 0) {
        close(reserve_fd);
        reserve_fd = -1;
        sock = accept4(lsock, NULL, NULL, SOCK_CLOEXEC);
    }
    return sock;
}

static gboolean on_accept(int lsock, GIOCondition cond, gpointer opaque)
{
    Control *ctl = opaque;
    struct ucred cred;
    socklen_t len = sizeof(cred);
    struct timeval tv = { .tv_sec = 1 };
    char req[REQUEST_MAX + 1];
    size_t got = 0;
    g_autofree char *reply = NULL;
    int sock = accept_with_reserve(lsock);

    if (sock < 0) {
        return G_SOURCE_CONTINUE;
    }
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0 ||
        (cred.uid != 0 && cred.uid != geteuid() &&
         !config_id_listed(ctl->broker->cfg->control_uids, cred.uid))) {
        reply = g_strdup("{\"error\": \"not allowed (control-uids)\"}");
    } else {
        setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
        while (got < REQUEST_MAX && !memchr(req, '\n', got)) {
            ssize_t n = recv(sock, req + got, REQUEST_MAX - got, 0);

            if (n <= 0) {
                break;
            }
            got += n;
        }
        req[got] = 0;
        reply = control_reply(ctl, req);
    }
    send(sock, reply, strlen(reply), MSG_NOSIGNAL);
    send(sock, "\n", 1, MSG_NOSIGNAL);
    close(sock);
    if (reserve_fd < 0) {
        reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    }
    return G_SOURCE_CONTINUE;
}

void control_sample(Control *ctl, gint64 now)
{
    uint64_t lookups = ctl->broker->stats.lookups;

    if (ctl->last_time && now > ctl->last_time) {
        double rate = (lookups - ctl->last_lookups) * 1e6 / (now - ctl->last_time);

        /* Smooth over a few seconds. */
        ctl->lookup_rate = ctl->lookup_rate * 0.5 + rate * 0.5;
    }
    ctl->last_lookups = lookups;
    ctl->last_time = now;
}

gboolean control_start(Control *ctl, Broker *b, GError **errp)
{
    memset(ctl, 0, sizeof(*ctl));
    ctl->broker = b;
    ctl->sock = server_listen(b->cfg->control_path, SOCK_STREAM, 0600, errp);
    if (ctl->sock < 0) {
        return FALSE;
    }
    ctl->watch = g_unix_fd_add(ctl->sock, G_IO_IN, on_accept, ctl);
    if (reserve_fd < 0) {
        reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    }
    return TRUE;
}

void control_stop(Control *ctl)
{
    if (ctl->watch) {
        g_source_remove(ctl->watch);
    }
    if (ctl->sock >= 0) {
        close(ctl->sock);
        unlink(ctl->broker->cfg->control_path);
    }
}

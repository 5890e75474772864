/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The broker's state and the operations behind each request.  Nothing
 * here touches a socket (server.c does), so the logic is tested directly.
 *
 * Invariants kept by ops.c:
 *  - I1: the pool changes only when the broker writes a new slot; content
 *    enters the pool only after the broker hashed it itself.
 *  - I2: SlotInfo.refs is the sum over clients of their references to the
 *    slot; a slot is freed (punched) only when it reaches zero, and a
 *    client that goes away gives back exactly what it held.
 *  - A domain's index and candidates hold only its own pages: no request
 *    of one domain can tell anything about another's.
 */
#ifndef QDEDUP_BROKER_H
#define QDEDUP_BROKER_H

#include <glib.h>
#include <stdint.h>
#include <sys/types.h>

#include "candidates.h"
#include "config.h"
#include "index.h"
#include "pool.h"
#include "qdedup/protocol.h"
#include "refs.h"
#include "slots.h"

typedef struct Domain {
    uint16_t id;
    char *name;                 /* "" for a client's private domain */
    const DomainPolicy *policy; /* NULL when not configured */
    uint64_t quota;             /* slots; 0 = none */
    HashIndex index;
    Candidates cand;
    uint64_t slots;             /* slots indexed here */
    uint32_t nclients;
    uint64_t lookups, hits, stored;
} Domain;

/*
 * A connected client, or an orphan: a client whose connection is gone but
 * whose process still lives and so may still map pool slots (I2).  An
 * orphan's references are released when its process exits (pidfd), or
 * handed to the same process when it reconnects.
 */
typedef struct BrokerClient {
    uint32_t id;
    int sock;                   /* -1 for an orphan */
    guint watch;
    gpointer server;            /* the Server it came through */
    int pidfd;                  /* -1 if the kernel gave none */
    guint pid_watch;
    pid_t pid;
    uid_t uid;
    gid_t gid;
    char name[QD_NAME_MAX + 1];
    uint8_t uuid[16];
    Domain *domain;             /* NULL until HELLO succeeded */
    ClientRefs refs;
    GHashTable *wanted;         /* hash.lo of pages we asked it to publish */
    gint64 connected_at;        /* monotonic, us */
    uint64_t lookups, hits, misses, asked, stored, mismatches, unrefs, restored;
} BrokerClient;

typedef struct BrokerStats {
    uint64_t lookups, hits, misses, asked, published, stored, mismatches;
    uint64_t frees, unrefs, restored, clients_total, clients_refused, protocol_errors;
} BrokerStats;

typedef struct Broker {
    BrokerConfig *cfg;
    Pool pool;
    gboolean have_pool;
    SlotTable slots;
    GHashTable *domains;        /* name -> Domain, named domains only */
    GPtrArray *domain_ids;      /* id -> Domain or NULL */
    GHashTable *clients;        /* id -> BrokerClient */
    uint32_t next_client_id;
    BrokerStats stats;
    /* Restart: waiting for clients to hand the previous pool back. */
    gboolean recovering;
    gint64 recover_deadline;    /* monotonic, us */
    uint64_t state_dev, state_ino;
    gint64 sweep_at;            /* punch unclaimed slots then; 0 = none */
} Broker;

gboolean broker_init(Broker *b, BrokerConfig *cfg, GError **errp);
void broker_destroy(Broker *b);

BrokerClient *broker_client_new(Broker *b, int sock, pid_t pid, uid_t uid, gid_t gid);
/* Release everything the client held and forget it. */
void broker_client_free(Broker *b, BrokerClient *c);
/* The connection is gone: keep the references while the process lives. */
gboolean broker_client_orphan(Broker *b, BrokerClient *c);

/* Is this peer allowed to connect at all? */
gboolean broker_peer_allowed(Broker *b, uid_t uid, gid_t gid, const GArray *groups);

/*
 * HELLO: join the domain, hand the pool back when reconnecting (handed_fd,
 * may be -1).  Returns 0 with *reply filled and *ro_fd a read-only pool
 * descriptor, or a QdErrorCode with *msg saying why.
 */
int broker_hello(Broker *b, BrokerClient *c, const QdHello *h, int handed_fd,
                 const GArray *groups, QdHelloReply *reply, int *ro_fd, char **msg);

void broker_lookup(Broker *b, BrokerClient *c, const QdMessage *m, QdResult *out);

/*
 * PUBLISH in two steps around the data transfer: plan decides where each
 * page goes (dest[i] a new slot, or POOL_NO_SLOT to discard it) and fills
 * the results known already; commit checks each stored page's hash.
 */
void broker_publish_plan(Broker *b, BrokerClient *c, const QdMessage *m,
                         uint64_t *dest, QdResult *out);
void broker_publish_commit(Broker *b, BrokerClient *c, const QdMessage *m,
                           const uint64_t *dest, QdResult *out);

/* UNREF: all or nothing; QD_ERR_NOT_HELD if any reference is not held. */
int broker_unref(Broker *b, BrokerClient *c, const QdMessage *m);
void broker_restore(Broker *b, BrokerClient *c, const QdMessage *m, QdResult *out);

/* Timers: candidate generations, recovery deadline, sweep after adoption. */
void broker_rotate_candidates(Broker *b);
void broker_tick(Broker *b, gint64 now);

/* What the broker allocates for its bookkeeping, by structure. */
typedef struct MetadataBytes {
    uint64_t slot_table, pool_bitmap, index, candidates, client_refs, other, total;
} MetadataBytes;
MetadataBytes broker_metadata_bytes(Broker *b);

/* domain.c */
Domain *domain_join(Broker *b, const char *name);
void domain_leave(Broker *b, Domain *d);

/* restart.c */
gboolean restart_read_state(Broker *b);
void restart_write_state(Broker *b);
void restart_clear_state(Broker *b);

#endif

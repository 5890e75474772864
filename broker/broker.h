/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The broker's state and the operations behind each request.  Nothing
 * here touches a socket (server.c does), so the logic is tested directly.
 *
 * Invariants kept by ops.c (docs/broker.md; ARCHITECTURE I1, I2, I11):
 *  - I11: every trust domain has its own pool file, slot numbers, slot
 *    table, index and candidates.  A client is given only its own domain's
 *    descriptor, and no answer it gets depends on another domain.
 *  - I1: a pool changes only when the broker writes a new slot; content
 *    enters the pool only after the broker hashed it itself.
 *  - I2: SlotInfo.refs is the number of clients holding the slot (one
 *    reference per client and slot); a slot is punched only when it reaches
 *    zero and, after a restart, only once the kernel says no process maps
 *    it (recovery.c).  A client that goes away gives back exactly what it
 *    held, and only once its process has exited.
 *  - No client request can reach an assertion, wrap a counter, or make the
 *    broker allocate more than its quotas allow.
 */
#ifndef QDEDUP_BROKER_H
#define QDEDUP_BROKER_H

#include <glib.h>
#include <stdint.h>
#include <sys/types.h>

#include "candidates.h"
#include "config.h"
#include "index.h"
#include "keyed.h"
#include "pool.h"
#include "qdedup/protocol.h"
#include "refs.h"
#include "slots.h"

typedef struct Domain {
    uint32_t id;                /* the broker's name for it, in logs and stats */
    char *name;                 /* "" for a private domain */
    const DomainPolicy *policy; /* NULL when not configured */
    GBytes *open_secret;        /* open-domains: the secret its first client set */
    uint64_t quota;             /* slots; 0 = none */
    Pool pool;
    SlotTable slots;
    HashIndex index;
    Candidates cand;
    uint64_t indexed;           /* slots in the index */
    uint32_t nclients;          /* clients and orphans in it */
    /* Adopted after a restart: held slots remain (recovery.c). */
    gboolean recovering;
    gint64 sweep_at;            /* next sweep, monotonic us; 0 = none */
    guint sweep_round;          /* sweeps so far: later ones back off */
    uint64_t lookups, hits, stored, restored, refused_restores;
} Domain;

/* A pool of the previous broker, named in the state file, not handed back yet. */
typedef struct PendingPool {
    char *name;                 /* domain; "" = a private domain */
    uint64_t dev, ino;
    gint64 deadline;            /* monotonic us: forget it then */
} PendingPool;

/*
 * A connected client, or an orphan: a client whose connection is gone but
 * whose process still lives and so may still map pool slots (I2).  An
 * orphan's references are released when its process exits (pidfd), or
 * handed to the same process when it reconnects.  A process the broker
 * cannot watch (no pidfd: out of descriptors) is taken to be alive.
 */
typedef struct BrokerClient {
    uint32_t id;                /* random: tells a client nothing of others */
    /*
     * Owner of its candidates: its id, or that of the orphan whose
     * references it took.  The same process asks about the same pages
     * again; under a new owner each would look like a second page.
     */
    uint32_t cand_owner;
    int sock;                   /* -1 for an orphan */
    guint watch;
    gpointer server;            /* the Server it came through */
    int pidfd;                  /* -1 if the kernel gave none (yet) */
    guint pid_watch;
    pid_t pid;
    uint64_t start_time;        /* of the process (peer.h): pid + this = one process */
    uid_t uid;
    gid_t gid;
    char name[QD_NAME_MAX + 1];
    uint8_t uuid[16];
    Domain *domain;             /* NULL until HELLO succeeded */
    ClientRefs refs;
    GHashTable *wanted;         /* keyed hashes of pages we asked it to publish */
    CandBudget *cand_budget;    /* its user's (Broker.budgets) */
    gint64 connected_at;        /* monotonic, us */
    uint64_t lookups, hits, misses, asked, stored, mismatches, unrefs, restored;
} BrokerClient;

typedef struct BrokerStats {
    uint64_t lookups, hits, misses, asked, published, stored, mismatches;
    uint64_t frees, unrefs, restored, restores_refused, clients_total, clients_refused;
    uint64_t protocol_errors, auth_failures, candidates_refused;
} BrokerStats;

typedef struct Broker {
    BrokerConfig *cfg;
    KeyedHash key;
    GHashTable *domains;        /* name -> Domain, named domains only */
    GHashTable *domain_ids;     /* id -> Domain, all */
    uint32_t next_domain_id;
    GPtrArray *pending;         /* PendingPool: the previous broker's pools */
    /*
     * Processes the previous broker gave a pool descriptor to (pid -> start
     * time, from the state file): after a restart, only they can map a
     * pool, so only their unreadable maps keep a sweep from punching.
     */
    GHashTable *prev_clients;
    GHashTable *clients;        /* id -> BrokerClient */
    GHashTable *budgets;        /* uid -> CandBudget, for as long as the broker runs */
    uint64_t cand_gen;          /* candidate generations started */
    BrokerStats stats;
    /* Recovery sweeps: one scan of /proc at a time (recovery.c). */
    gboolean scanning;
    gpointer scan_owner;        /* set while the broker lives */
    gboolean state_dirty;       /* the state file is to be rewritten */
    gboolean stopping_state_frozen; /* stopping: the state file stays as written */
} Broker;

gboolean broker_init(Broker *b, BrokerConfig *cfg, GError **errp);
void broker_destroy(Broker *b);

BrokerClient *broker_client_new(Broker *b, int sock, pid_t pid, uid_t uid, gid_t gid);
/* Release everything the client held and forget it. */
void broker_client_free(Broker *b, BrokerClient *c);
/*
 * The connection is gone: keep the references while the process lives, as
 * an orphan; one per process and domain (a second one is merged into the
 * first, so that a process cannot pile them up).  FALSE if the client is
 * to be freed; *merged says it was merged into another (and freed).
 */
gboolean broker_client_orphan(Broker *b, BrokerClient *c, gboolean *merged);
/* Is the client's process still running?  TRUE when the broker cannot tell. */
gboolean broker_process_alive(BrokerClient *c);

/* Is this peer allowed to connect at all? */
gboolean broker_peer_allowed(Broker *b, uid_t uid, gid_t gid, const GArray *groups);

/*
 * HELLO: join the domain (after a restart, taking the pool back from the
 * client's descriptor table).  Returns 0 with *reply filled and *ro_fd the
 * domain's read-only pool descriptor (still owned by the broker), or a
 * QdErrorCode with *msg saying why; *auth_failed tells a refused secret.
 */
int broker_hello(Broker *b, BrokerClient *c, const QdHello *h, const GArray *groups,
                 QdHelloReply *reply, int *ro_fd, char **msg, gboolean *auth_failed);

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

/* Timers: candidate generations, pending pools, recovery sweeps. */
void broker_rotate_candidates(Broker *b);
void broker_tick(Broker *b, gint64 now);

/* What the broker allocates for its bookkeeping, by structure. */
typedef struct MetadataBytes {
    uint64_t slot_table, pool_bitmap, index, candidates, client_refs, other, total;
} MetadataBytes;
MetadataBytes broker_metadata_bytes(Broker *b);

/* domain.c */
/* A new domain with a new pool; NULL with *msg when over max-domains or out of memory. */
Domain *domain_create(Broker *b, const char *name, char **msg);
/* A domain around a pool taken back after a restart (pool_adopt). */
Domain *domain_adopt(Broker *b, const char *name, int ro_fd, char **msg);
Domain *domain_by_pool(Broker *b, uint64_t dev, uint64_t ino);
/* Called when a client leaves and when a slot is freed: frees an empty domain. */
void domain_maybe_free(Broker *b, Domain *d);
/* Drop one reference to slot of d; free the slot at zero (I2). */
void domain_slot_release(Broker *b, Domain *d, uint64_t slot);

/* restart.c */
void restart_read_state(Broker *b);
/* The pools changed: rewrite the state file soon (restart_flush_state). */
void restart_write_state(Broker *b);
void restart_flush_state(Broker *b);

/* recovery.c */
void recovery_start(Broker *b, Domain *d);
void recovery_tick(Broker *b, gint64 now);

#endif

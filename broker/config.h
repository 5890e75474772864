/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Broker configuration: built-in defaults, then the config file (glib key
 * file, --config, default /etc/qemu-dedup/broker.conf when it exists), then
 * command-line options.  See docs/broker.md for every key.
 */
#ifndef QDEDUP_BROKER_CONFIG_H
#define QDEDUP_BROKER_CONFIG_H

#include <glib.h>
#include <stdint.h>
#include <sys/types.h>

#include "qdedup/protocol.h"

#define DEFAULT_SOCKET  QD_DEFAULT_SOCKET
#define DEFAULT_CONTROL "/run/qemu-dedup/control.sock"
#define DEFAULT_CONFIG  "/etc/qemu-dedup/broker.conf"

typedef struct DomainPolicy {
    char *name;
    GArray *uids, *gids;    /* of uid_t/gid_t; NULL = no restriction */
    GBytes *secret;         /* NULL = none required */
    uint64_t quota;         /* slots; 0 = none */
} DomainPolicy;

/* With open-domains, a domain not configured needs a secret this long. */
#define OPEN_DOMAIN_SECRET_MIN 16u

typedef struct BrokerConfig {
    char *socket_path, *control_path, *state_path, *config_path;
    uint64_t pool_max;          /* slots, per domain */
    uint64_t client_quota;      /* slots; 0 = none */
    uint64_t domain_quota;      /* slots, for domains without their own; 0 = none */
    GArray *allow_uids, *allow_gids, *control_uids;
    gboolean open_domains;      /* may clients name domains not configured (with a secret)? */
    guint candidate_lifetime;   /* seconds */
    guint restart_grace;        /* seconds */
    guint socket_mode;
    guint max_domains;          /* pools at once */
    guint uid_connections;      /* connections per uid */
    guint uid_handshakes;       /* connections per uid before HELLO */
    guint handshake_timeout;    /* seconds to say HELLO */
    guint auth_failures;        /* failed authentications per uid per minute */
    uint64_t uid_candidates;    /* candidates one user's clients may place per generation */
    uint64_t hash_seed;         /* 0: random key (tests fix it) */
    gboolean verbose;
    GHashTable *domains;        /* name -> DomainPolicy */
} BrokerConfig;

/* Parse argv and the config file; FALSE with errp set on any bad value. */
gboolean config_load(BrokerConfig *cfg, int *argc, char ***argv, GError **errp);
void config_free(BrokerConfig *cfg);

/* "16G", "512M", "4096" (bytes; K/M/G/T are powers of 1024) -> bytes. */
gboolean config_parse_size(const char *s, uint64_t *bytes);

gboolean config_id_listed(const GArray *ids, guint id);
/* Does uid, gid or one of groups (supplementary gids) appear in uids/gids? */
gboolean config_ids_admit(const GArray *uids, const GArray *gids, guint uid, guint gid,
                          const GArray *groups);

#endif

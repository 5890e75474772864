/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * What one user may take of the broker: connections, connections that
 * have not said HELLO yet, and failed authentications (token buckets, so
 * guessing a domain's secret gets auth-failures tries a minute per user and
 * domain, and four times that per user over all domains).  And a log
 * limiter, so that failures are always logged but a flood of them cannot
 * flood the journal.
 */
#ifndef QDEDUP_BROKER_LIMITS_H
#define QDEDUP_BROKER_LIMITS_H

#include <glib.h>
#include <sys/types.h>

typedef struct AuthBucket {
    double tokens;          /* failed authentications still allowed */
    gint64 refilled;        /* monotonic us */
} AuthBucket;

typedef struct UidUsage {
    uid_t uid;
    guint connections;      /* connected, with or without HELLO */
    guint handshakes;       /* connected, no HELLO yet */
    AuthBucket auth;        /* over all domains */
} UidUsage;

typedef struct Limits {
    GHashTable *uids;       /* uid -> UidUsage */
    GHashTable *auth;       /* "uid/domain" -> AuthBucket */
    guint auth_per_minute;
} Limits;

void limits_init(Limits *l, guint auth_per_minute);
void limits_destroy(Limits *l);
UidUsage *limits_uid(Limits *l, uid_t uid);
/* Forget uids that hold nothing (called from time to time). */
void limits_prune(Limits *l, gint64 now);
/* May uid try to join domain now?  If not, *wait_s says when. */
gboolean limits_auth_allowed(Limits *l, uid_t uid, const char *domain, gint64 now,
                             guint *wait_s);
void limits_auth_failed(Limits *l, uid_t uid, const char *domain, gint64 now);

typedef struct LogLimiter {
    guint per_minute;
    guint used;
    gint64 window;          /* start of the current minute, monotonic us */
    guint suppressed;
} LogLimiter;

/* Log (g_message) unless over the limit this minute; says what was dropped. */
void log_limited(LogLimiter *ll, const char *fmt, ...) G_GNUC_PRINTF(2, 3);

#endif

/* SPDX-License-Identifier: GPL-2.0-or-later */
/* Per-user limits and a log limiter (see limits.h). */
#include <stdarg.h>

#include "uid-limits.h"

#define UID_AUTH_FACTOR 4       /* per user, over all domains */

void limits_init(Limits *l, guint auth_per_minute)
{
    l->uids = g_hash_table_new_full(g_direct_hash, g_direct_equal, NULL, g_free);
    l->auth = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, g_free);
    l->auth_per_minute = auth_per_minute;
}

void limits_destroy(Limits *l)
{
    g_hash_table_destroy(l->uids);
    g_hash_table_destroy(l->auth);
}

UidUsage *limits_uid(Limits *l, uid_t uid)
{
    UidUsage *u = g_hash_table_lookup(l->uids, GUINT_TO_POINTER(uid));

    if (!u) {
        u = g_new0(UidUsage, 1);
        u->uid = uid;
        u->auth.tokens = l->auth_per_minute * UID_AUTH_FACTOR;
        u->auth.refilled = g_get_monotonic_time();
        g_hash_table_insert(l->uids, GUINT_TO_POINTER(uid), u);
    }
    return u;
}

static void refill(AuthBucket *a, double per_minute, gint64 now)
{
    a->tokens = MIN(per_minute, a->tokens + (now - a->refilled) * per_minute /
                                (60.0 * G_USEC_PER_SEC));
    a->refilled = now;
}

/* The bucket of (uid, domain); made only on a failure (create), so that
 * names a client makes up cost nothing until they fail. */
static AuthBucket *domain_bucket(Limits *l, uid_t uid, const char *domain, gint64 now,
                                 gboolean create)
{
    g_autofree char *key = g_strdup_printf("%u/%s", (unsigned)uid, domain);
    AuthBucket *a = g_hash_table_lookup(l->auth, key);

    if (!a && !create) {
        return NULL;
    }
    if (!a) {
        a = g_new0(AuthBucket, 1);
        a->tokens = l->auth_per_minute;
        a->refilled = now;
        g_hash_table_insert(l->auth, g_steal_pointer(&key), a);
    }
    refill(a, l->auth_per_minute, now);
    return a;
}

void limits_prune(Limits *l, gint64 now)
{
    GHashTableIter it;
    gpointer v;

    g_hash_table_iter_init(&it, l->uids);
    while (g_hash_table_iter_next(&it, NULL, &v)) {
        UidUsage *u = v;

        refill(&u->auth, l->auth_per_minute * UID_AUTH_FACTOR, now);
        if (!u->connections && !u->handshakes &&
            u->auth.tokens >= l->auth_per_minute * UID_AUTH_FACTOR) {
            g_hash_table_iter_remove(&it);
        }
    }
    g_hash_table_iter_init(&it, l->auth);
    while (g_hash_table_iter_next(&it, NULL, &v)) {
        AuthBucket *a = v;

        refill(a, l->auth_per_minute, now);
        if (a->tokens >= l->auth_per_minute) {
            g_hash_table_iter_remove(&it);
        }
    }
}

static guint wait_for(const AuthBucket *a, double per_minute)
{
    return (guint)((1 - a->tokens) * 60 / per_minute) + 1;
}

gboolean limits_auth_allowed(Limits *l, uid_t uid, const char *domain, gint64 now,
                             guint *wait_s)
{
    UidUsage *u = limits_uid(l, uid);
    AuthBucket *a;

    refill(&u->auth, l->auth_per_minute * UID_AUTH_FACTOR, now);
    if (u->auth.tokens < 1) {
        *wait_s = wait_for(&u->auth, l->auth_per_minute * UID_AUTH_FACTOR);
        return FALSE;
    }
    a = domain_bucket(l, uid, domain, now, FALSE);
    if (a && a->tokens < 1) {
        *wait_s = wait_for(a, l->auth_per_minute);
        return FALSE;
    }
    return TRUE;
}

void limits_auth_failed(Limits *l, uid_t uid, const char *domain, gint64 now)
{
    UidUsage *u = limits_uid(l, uid);
    AuthBucket *a = domain_bucket(l, uid, domain, now, TRUE);

    refill(&u->auth, l->auth_per_minute * UID_AUTH_FACTOR, now);
    u->auth.tokens = MAX(0.0, u->auth.tokens - 1);
    a->tokens = MAX(0.0, a->tokens - 1);
}

void log_limited(LogLimiter *ll, const char *fmt, ...)
{
    gint64 now = g_get_monotonic_time();
    g_autofree char *text = NULL;
    va_list ap;

    if (now - ll->window >= 60 * G_USEC_PER_SEC) {
        if (ll->suppressed) {
            g_message("(%u similar messages suppressed in the last minute)", ll->suppressed);
        }
        ll->window = now;
        ll->used = 0;
        ll->suppressed = 0;
    }
    if (ll->used >= ll->per_minute) {
        ll->suppressed++;
        return;
    }
    ll->used++;
    va_start(ap, fmt);
    text = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    g_message("%s", text);
}

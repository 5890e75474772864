/* SPDX-License-Identifier: GPL-2.0-or-later */
/* Per-user limits and a log limiter (see limits.h). */
#include <stdarg.h>

#include "uid-limits.h"

void limits_init(Limits *l, guint auth_per_minute)
{
    l->uids = g_hash_table_new_full(g_direct_hash, g_direct_equal, NULL, g_free);
    l->auth_per_minute = auth_per_minute;
}

void limits_destroy(Limits *l)
{
    g_hash_table_destroy(l->uids);
}

UidUsage *limits_uid(Limits *l, uid_t uid)
{
    UidUsage *u = g_hash_table_lookup(l->uids, GUINT_TO_POINTER(uid));

    if (!u) {
        u = g_new0(UidUsage, 1);
        u->uid = uid;
        u->auth_tokens = l->auth_per_minute;
        u->auth_refilled = g_get_monotonic_time();
        g_hash_table_insert(l->uids, GUINT_TO_POINTER(uid), u);
    }
    return u;
}

static void refill(Limits *l, UidUsage *u, gint64 now)
{
    u->auth_tokens = MIN((double)l->auth_per_minute, u->auth_tokens +
                         (now - u->auth_refilled) * (double)l->auth_per_minute /
                         (60.0 * G_USEC_PER_SEC));
    u->auth_refilled = now;
}

void limits_prune(Limits *l, gint64 now)
{
    GHashTableIter it;
    gpointer v;

    g_hash_table_iter_init(&it, l->uids);
    while (g_hash_table_iter_next(&it, NULL, &v)) {
        UidUsage *u = v;

        refill(l, u, now);
        if (!u->connections && !u->handshakes && u->auth_tokens >= l->auth_per_minute) {
            g_hash_table_iter_remove(&it);
        }
    }
}

gboolean limits_auth_allowed(Limits *l, uid_t uid, gint64 now, guint *wait_s)
{
    UidUsage *u = limits_uid(l, uid);

    refill(l, u, now);
    if (u->auth_tokens >= 1) {
        return TRUE;
    }
    *wait_s = (guint)((1 - u->auth_tokens) * 60 / l->auth_per_minute) + 1;
    return FALSE;
}

void limits_auth_failed(Limits *l, uid_t uid, gint64 now)
{
    UidUsage *u = limits_uid(l, uid);

    refill(l, u, now);
    u->auth_tokens = MAX(0.0, u->auth_tokens - 1);
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

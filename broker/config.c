/* SPDX-License-Identifier: GPL-2.0-or-later */
/* Broker configuration: defaults, key file, command line (see config.h). */
#include <errno.h>
#include <grp.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "qdedup/protocol.h"

#define MAX_POOL_SLOTS ((uint64_t)UINT32_MAX - 1)   /* index cells are 32-bit */
#define MAX_POOLS_BYTES (64ull << 40)                /* all pools, mapped in the broker */

static const char help_description[] =
"qemu-dedup-broker owns the pools of memory pages shared by QEMU guests that\n"
"use -object memory-dedup on this host: it keeps the canonical copy of each\n"
"shared page in one memfd per trust domain, indexes pages by XXH3-128 hash,\n"
"counts references per client, frees dead pages, and enforces quotas.  It\n"
"runs in the foreground, logs to standard error, and exits cleanly on\n"
"SIGTERM or SIGINT.\n"
"\n"
"SIZES\n"
"  Sizes are bytes with an optional K, M, G or T suffix (powers of 1024),\n"
"  rounded down to whole 4 KiB pages: --pool-max=16G.\n"
"\n"
"CONFIGURATION FILE\n"
"  A glib key file; command-line options override it.  [broker] holds the\n"
"  keys socket, control, state, pool-max (per domain), client-quota,\n"
"  domain-quota, allow-uids, allow-gids, control-uids (lists of names or\n"
"  numbers, separated by ';'), open-domains (true/false), candidate-lifetime,\n"
"  restart-grace and handshake-timeout (seconds), socket-mode (octal), and\n"
"  the limits max-domains, uid-connections, uid-handshakes, auth-failures\n"
"  (per uid per minute) and uid-candidates.  Each [domain NAME] group\n"
"  declares trust domain NAME: allow-uids, allow-gids, secret-file (a file\n"
"  whose content a client must present, e.g. from a QEMU secret object),\n"
"  quota (size).  See docs/broker.md.\n"
"\n"
"ACCESS\n"
"  Clients are identified by SO_PEERCRED.  Only root, the broker's own user\n"
"  and the users and groups in allow-uids/allow-gids may connect.  A client\n"
"  shares pages only with clients of the same trust domain, which must be\n"
"  declared in the configuration; one that names no domain shares with\n"
"  nobody.  The broker runs as root (or with CAP_SYS_PTRACE): after a\n"
"  restart it asks the kernel which processes map which pool pages.\n"
"\n"
"FILES\n"
"  " DEFAULT_CONFIG "     configuration (read when present)\n"
"  " DEFAULT_SOCKET "     client socket\n"
"  " DEFAULT_CONTROL "    control socket (qemu-dedup-ctl)\n"
"  <socket>.state                  pool identity, kept across restarts\n"
"\n"
"SIGNALS\n"
"  SIGTERM, SIGINT  stop: close the sockets; clients keep their merged pages\n"
"                   and hand the pool back to the next broker.\n"
"\n"
"EXAMPLE\n"
"  qemu-dedup-broker --pool-max=8G --socket=/run/qemu-dedup/broker.sock\n"
"  qemu-system-x86_64 ... -object memory-dedup,id=d0,domain=tenant-a\n"
"  qemu-dedup-ctl stats\n";

gboolean config_parse_size(const char *s, uint64_t *bytes)
{
    char *end;
    uint64_t v, mult = 1;

    if (!s || !g_ascii_isdigit(*s)) {
        return FALSE;
    }
    errno = 0;
    v = g_ascii_strtoull(s, &end, 10);
    if (errno) {
        return FALSE;
    }
    switch (g_ascii_toupper(*end)) {
    case 'T': mult <<= 10; /* fall through */
    case 'G': mult <<= 10; /* fall through */
    case 'M': mult <<= 10; /* fall through */
    case 'K': mult <<= 10; end++; break;
    case 0: break;
    default: return FALSE;
    }
    if (*end == 'B' || *end == 'b') {
        end++;
    }
    if (*end || (v && mult > UINT64_MAX / v)) {
        return FALSE;
    }
    *bytes = v * mult;
    return TRUE;
}

gboolean config_id_listed(const GArray *ids, guint id)
{
    for (guint i = 0; ids && i < ids->len; i++) {
        if (g_array_index(ids, guint, i) == id) {
            return TRUE;
        }
    }
    return FALSE;
}

gboolean config_ids_admit(const GArray *uids, const GArray *gids, guint uid, guint gid,
                          const GArray *groups)
{
    if (config_id_listed(uids, uid) || config_id_listed(gids, gid)) {
        return TRUE;
    }
    for (guint i = 0; groups && i < groups->len; i++) {
        if (config_id_listed(gids, g_array_index(groups, guint, i))) {
            return TRUE;
        }
    }
    return FALSE;
}

/* Names or numbers -> ids appended to *out. */
static gboolean parse_ids(const char *what, gboolean groups, char **items,
                          GArray **out, GError **errp)
{
    if (!*out) {
        *out = g_array_new(FALSE, FALSE, sizeof(guint));
    }
    for (; items && *items; items++) {
        const char *s = g_strstrip(*items);
        char *end;
        guint64 id;

        if (!*s) {
            continue;
        }
        id = g_ascii_strtoull(s, &end, 10);
        if (*end || end == s) {
            if (groups) {
                struct group *gr = getgrnam(s);

                if (!gr) {
                    g_set_error(errp, G_KEY_FILE_ERROR, G_KEY_FILE_ERROR_INVALID_VALUE,
                                "%s: no such group '%s'", what, s);
                    return FALSE;
                }
                id = gr->gr_gid;
            } else {
                struct passwd *pw = getpwnam(s);

                if (!pw) {
                    g_set_error(errp, G_KEY_FILE_ERROR, G_KEY_FILE_ERROR_INVALID_VALUE,
                                "%s: no such user '%s'", what, s);
                    return FALSE;
                }
                id = pw->pw_uid;
            }
        }
        g_array_append_val(*out, (guint) { id });
    }
    return TRUE;
}

static gboolean size_to_slots(const char *what, const char *s, gboolean zero_ok,
                              uint64_t *slots, GError **errp)
{
    uint64_t bytes;

    if (!config_parse_size(s, &bytes) || (!zero_ok && bytes < QD_PAGE_SIZE)) {
        g_set_error(errp, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                    "%s: '%s' is not a valid size; use bytes with an optional "
                    "K, M, G or T suffix%s, e.g. 16G", what, s ? s : "",
                    zero_ok ? " (0 = no limit)" : ", at least 4K");
        return FALSE;
    }
    *slots = bytes / QD_PAGE_SIZE;
    return TRUE;
}

/* An integer key of [broker] from lo to hi; what names it in errors. */
static gboolean number(const char *file, GKeyFile *kf, const char *key, guint64 lo,
                       guint64 hi, const char *unit, guint64 *out, GError **errp)
{
    g_autofree char *s = g_key_file_get_value(kf, "broker", key, NULL);
    char *end;
    guint64 v;

    if (!s) {
        return TRUE;
    }
    v = g_ascii_strtoull(s, &end, 10);
    if (*end || end == s || v < lo || v > hi) {
        g_set_error(errp, G_KEY_FILE_ERROR, G_KEY_FILE_ERROR_INVALID_VALUE,
                    "%s: %s: '%s' must be a number of %s from %" G_GUINT64_FORMAT
                    " to %" G_GUINT64_FORMAT, file, key, s, unit, lo, hi);
        return FALSE;
    }
    *out = v;
    return TRUE;
}

static gboolean uint_key(const char *file, GKeyFile *kf, const char *key, guint lo,
                         guint hi, const char *unit, guint *out, GError **errp)
{
    guint64 v = *out;

    if (!number(file, kf, key, lo, hi, unit, &v, errp)) {
        return FALSE;
    }
    *out = v;
    return TRUE;
}

static gboolean load_domain(BrokerConfig *cfg, GKeyFile *kf, const char *group,
                            GError **errp)
{
    DomainPolicy *d = g_new0(DomainPolicy, 1);
    g_autofree char *what = g_strdup_printf("%s: [%s]", cfg->config_path, group);
    g_auto(GStrv) keys = g_key_file_get_keys(kf, group, NULL, NULL);

    d->name = g_strdup(group + strlen("domain "));
    g_strstrip(d->name);
    g_hash_table_insert(cfg->domains, d->name, d);
    if (!*d->name || strlen(d->name) > QD_NAME_MAX) {
        g_set_error(errp, G_KEY_FILE_ERROR, G_KEY_FILE_ERROR_INVALID_VALUE,
                    "%s: a domain name has 1 to %u characters", what, QD_NAME_MAX);
        return FALSE;
    }
    for (char **k = keys; k && *k; k++) {
        g_autofree char *v = g_key_file_get_value(kf, group, *k, NULL);
        g_auto(GStrv) list = g_key_file_get_string_list(kf, group, *k, NULL, NULL);
        g_autofree char *wk = g_strdup_printf("%s %s", what, *k);

        if (!strcmp(*k, "allow-uids")) {
            if (!parse_ids(wk, FALSE, list, &d->uids, errp)) {
                return FALSE;
            }
        } else if (!strcmp(*k, "allow-gids")) {
            if (!parse_ids(wk, TRUE, list, &d->gids, errp)) {
                return FALSE;
            }
        } else if (!strcmp(*k, "quota")) {
            if (!size_to_slots(wk, v, TRUE, &d->quota, errp)) {
                return FALSE;
            }
        } else if (!strcmp(*k, "secret-file")) {
            g_autofree char *data = NULL;
            gsize len;

            if (!g_file_get_contents(v, &data, &len, errp)) {
                g_prefix_error(errp, "%s: ", wk);
                return FALSE;
            }
            while (len && g_ascii_isspace(data[len - 1])) {   /* as memory-dedup does */
                len--;
            }
            if (len == 0 || len > QD_SECRET_MAX) {
                g_set_error(errp, G_KEY_FILE_ERROR, G_KEY_FILE_ERROR_INVALID_VALUE,
                            "%s: the secret must have 1 to %u bytes", wk, QD_SECRET_MAX);
                return FALSE;
            }
            d->secret = g_bytes_new(data, len);
        } else {
            g_set_error(errp, G_KEY_FILE_ERROR, G_KEY_FILE_ERROR_KEY_NOT_FOUND,
                        "%s: unknown key '%s' (known: allow-uids, allow-gids, "
                        "secret-file, quota)", what, *k);
            return FALSE;
        }
    }
    return TRUE;
}

static const char *const broker_keys[] = {
    "socket", "control", "state", "pool-max", "client-quota", "domain-quota",
    "allow-uids", "allow-gids", "control-uids", "open-domains",
    "candidate-lifetime", "restart-grace", "socket-mode", "max-domains",
    "uid-connections", "uid-handshakes", "handshake-timeout", "auth-failures",
    "uid-candidates", NULL,
};

static gboolean load_file(BrokerConfig *cfg, GError **errp)
{
    g_autoptr(GKeyFile) kf = g_key_file_new();
    g_auto(GStrv) groups = NULL;
    g_auto(GStrv) keys = NULL;
    const char *f = cfg->config_path;
    char *v;

    if (!g_key_file_load_from_file(kf, f, G_KEY_FILE_NONE, errp)) {
        g_prefix_error(errp, "%s: ", f);
        return FALSE;
    }
    groups = g_key_file_get_groups(kf, NULL);
    for (char **g = groups; *g; g++) {
        if (g_str_has_prefix(*g, "domain ")) {
            if (!load_domain(cfg, kf, *g, errp)) {
                return FALSE;
            }
        } else if (strcmp(*g, "broker")) {
            g_set_error(errp, G_KEY_FILE_ERROR, G_KEY_FILE_ERROR_GROUP_NOT_FOUND,
                        "%s: unknown group [%s] (known: [broker], [domain NAME])", f, *g);
            return FALSE;
        }
    }
    keys = g_key_file_get_keys(kf, "broker", NULL, NULL);
    for (char **k = keys; k && *k; k++) {
        if (!g_strv_contains(broker_keys, *k)) {
            g_autofree char *known = g_strjoinv(", ", (char **)broker_keys);

            g_set_error(errp, G_KEY_FILE_ERROR, G_KEY_FILE_ERROR_KEY_NOT_FOUND,
                        "%s: unknown key '%s' in [broker] (known: %s)", f, *k, known);
            return FALSE;
        }
    }

#define STR(key, field) \
    if ((v = g_key_file_get_string(kf, "broker", key, NULL))) { \
        g_free(cfg->field); cfg->field = v; }
    STR("socket", socket_path);
    STR("control", control_path);
    STR("state", state_path);
#undef STR

#define SIZE(key, field, zero_ok) \
    if ((v = g_key_file_get_value(kf, "broker", key, NULL))) { \
        g_autofree char *what = g_strdup_printf("%s: %s", f, key); \
        gboolean ok = size_to_slots(what, v, zero_ok, &cfg->field, errp); \
        g_free(v); \
        if (!ok) { return FALSE; } }
    SIZE("pool-max", pool_max, FALSE);
    SIZE("client-quota", client_quota, TRUE);
    SIZE("domain-quota", domain_quota, TRUE);
#undef SIZE

#define IDS(key, field, groups_) { \
        g_auto(GStrv) l = g_key_file_get_string_list(kf, "broker", key, NULL, NULL); \
        g_autofree char *what = g_strdup_printf("%s: %s", f, key); \
        if (l && !parse_ids(what, groups_, l, &cfg->field, errp)) { return FALSE; } }
    IDS("allow-uids", allow_uids, FALSE);
    IDS("allow-gids", allow_gids, TRUE);
    IDS("control-uids", control_uids, FALSE);
#undef IDS

    if (g_key_file_has_key(kf, "broker", "open-domains", NULL)) {
        GError *e = NULL;

        cfg->open_domains = g_key_file_get_boolean(kf, "broker", "open-domains", &e);
        if (e) {
            g_set_error(errp, G_KEY_FILE_ERROR, G_KEY_FILE_ERROR_INVALID_VALUE,
                        "%s: open-domains must be true or false", f);
            g_error_free(e);
            return FALSE;
        }
    }
    if (!uint_key(f, kf, "candidate-lifetime", 1, 86400, "seconds",
                  &cfg->candidate_lifetime, errp) ||
        !uint_key(f, kf, "restart-grace", 1, 86400, "seconds", &cfg->restart_grace, errp) ||
        !uint_key(f, kf, "handshake-timeout", 1, 3600, "seconds",
                  &cfg->handshake_timeout, errp) ||
        !uint_key(f, kf, "max-domains", 1, 65536, "domains", &cfg->max_domains, errp) ||
        !uint_key(f, kf, "uid-connections", 1, 1 << 20, "connections",
                  &cfg->uid_connections, errp) ||
        !uint_key(f, kf, "uid-handshakes", 1, 1 << 20, "connections",
                  &cfg->uid_handshakes, errp) ||
        !uint_key(f, kf, "auth-failures", 1, 1000000, "failures per minute",
                  &cfg->auth_failures, errp) ||
        !number(f, kf, "uid-candidates", 1, (guint64)1 << 40, "candidates",
                &cfg->uid_candidates, errp)) {
        return FALSE;
    }
    if ((v = g_key_file_get_value(kf, "broker", "socket-mode", NULL))) {
        char *end;
        guint64 mode = g_ascii_strtoull(v, &end, 8);
        gboolean bad = *end || end == v || mode > 0777;

        g_free(v);
        if (bad) {
            g_set_error(errp, G_KEY_FILE_ERROR, G_KEY_FILE_ERROR_INVALID_VALUE,
                        "%s: socket-mode must be an octal mode such as 0660", f);
            return FALSE;
        }
        cfg->socket_mode = mode;
    }
    return TRUE;
}

gboolean config_load(BrokerConfig *cfg, int *argc, char ***argv, GError **errp)
{
    g_autofree char *socket = NULL, *control = NULL, *state = NULL, *config = NULL;
    g_autofree char *pool_max = NULL, *client_quota = NULL;
    g_auto(GStrv) allow_uids = NULL, allow_gids = NULL, domains = NULL;
    gboolean verbose = FALSE, version = FALSE;
    GOptionEntry entries[] = {
        { "socket", 0, 0, G_OPTION_ARG_FILENAME, &socket,
          "client socket [" DEFAULT_SOCKET "]", "PATH" },
        { "control", 0, 0, G_OPTION_ARG_FILENAME, &control,
          "control socket for qemu-dedup-ctl [" DEFAULT_CONTROL "]", "PATH" },
        { "config", 0, 0, G_OPTION_ARG_FILENAME, &config,
          "configuration file [" DEFAULT_CONFIG ", when present]", "FILE" },
        { "pool-max", 0, 0, G_OPTION_ARG_STRING, &pool_max,
          "largest pool of one trust domain [16G]", "SIZE" },
        { "client-quota", 0, 0, G_OPTION_ARG_STRING, &client_quota,
          "most pool memory one client may reference [0 = no limit]", "SIZE" },
        { "allow-uid", 0, 0, G_OPTION_ARG_STRING_ARRAY, &allow_uids,
          "also accept clients of this user (repeatable)", "USER" },
        { "allow-gid", 0, 0, G_OPTION_ARG_STRING_ARRAY, &allow_gids,
          "also accept clients of this group (repeatable)", "GROUP" },
        { "domain", 0, 0, G_OPTION_ARG_STRING_ARRAY, &domains,
          "declare trust domain NAME, open to every client admitted (repeatable; "
          "[domain NAME] in the file can restrict it)", "NAME" },
        { "state", 0, 0, G_OPTION_ARG_FILENAME, &state,
          "pool identity file kept across restarts [SOCKET.state]", "PATH" },
        { "verbose", 'v', 0, G_OPTION_ARG_NONE, &verbose, "log every client", NULL },
        { "version", 0, 0, G_OPTION_ARG_NONE, &version, "print the version and exit", NULL },
        { NULL }
    };
    g_autoptr(GOptionContext) ctx =
        g_option_context_new("- page pool broker for qdedup memory deduplication");

    g_option_context_add_main_entries(ctx, entries, NULL);
    g_option_context_set_description(ctx, help_description);
    if (!g_option_context_parse(ctx, argc, argv, errp)) {
        return FALSE;
    }
    if (version) {
        printf("qemu-dedup-broker %s (protocol %u)\n", QDEDUP_VERSION, QD_PROTO_VERSION);
        exit(0);
    }
    if (*argc > 1) {
        g_set_error(errp, G_OPTION_ERROR, G_OPTION_ERROR_FAILED,
                    "unexpected argument '%s' (see --help)", (*argv)[1]);
        return FALSE;
    }

    memset(cfg, 0, sizeof(*cfg));
    cfg->socket_path = g_strdup(DEFAULT_SOCKET);
    cfg->control_path = g_strdup(DEFAULT_CONTROL);
    cfg->pool_max = (16ull << 30) / QD_PAGE_SIZE;
    cfg->open_domains = FALSE;
    cfg->candidate_lifetime = 60;
    cfg->restart_grace = 10;
    cfg->socket_mode = 0660;
    cfg->max_domains = 1024;
    cfg->uid_connections = 256;
    cfg->uid_handshakes = 8;
    cfg->handshake_timeout = 5;
    cfg->auth_failures = 5;
    cfg->uid_candidates = 16 << 20;
    cfg->domains = g_hash_table_new(g_str_hash, g_str_equal);

    if (config) {
        cfg->config_path = g_strdup(config);
    } else if (g_file_test(DEFAULT_CONFIG, G_FILE_TEST_EXISTS)) {
        cfg->config_path = g_strdup(DEFAULT_CONFIG);
    }
    if (cfg->config_path && !load_file(cfg, errp)) {
        return FALSE;
    }

    if (socket) {
        g_free(cfg->socket_path);
        cfg->socket_path = g_steal_pointer(&socket);
    }
    if (control) {
        g_free(cfg->control_path);
        cfg->control_path = g_steal_pointer(&control);
    }
    if (state) {
        g_free(cfg->state_path);
        cfg->state_path = g_steal_pointer(&state);
    }
    if (!cfg->state_path) {
        cfg->state_path = g_strdup_printf("%s.state", cfg->socket_path);
    }
    if ((pool_max && !size_to_slots("--pool-max", pool_max, FALSE, &cfg->pool_max, errp)) ||
        (client_quota &&
         !size_to_slots("--client-quota", client_quota, TRUE, &cfg->client_quota, errp))) {
        return FALSE;
    }
    if (cfg->pool_max > MAX_POOL_SLOTS) {
        g_set_error(errp, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                    "--pool-max: at most 16T");
        return FALSE;
    }
    /* Every domain's pool is mapped whole in the broker: keep them in 64 TiB. */
    if (cfg->pool_max * QD_PAGE_SIZE > (MAX_POOLS_BYTES / cfg->max_domains)) {
        g_set_error(errp, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                    "pool-max (%" G_GUINT64_FORMAT " MiB) times max-domains (%u) is over "
                    "64 TiB of address space: lower one of them",
                    cfg->pool_max * QD_PAGE_SIZE >> 20, cfg->max_domains);
        return FALSE;
    }
    if (!parse_ids("--allow-uid", FALSE, allow_uids, &cfg->allow_uids, errp) ||
        !parse_ids("--allow-gid", TRUE, allow_gids, &cfg->allow_gids, errp)) {
        return FALSE;
    }
    for (char **d = domains; d && *d; d++) {
        DomainPolicy *p;

        if (!**d || strlen(*d) > QD_NAME_MAX) {
            g_set_error(errp, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                        "--domain: a domain name has 1 to %u characters", QD_NAME_MAX);
            return FALSE;
        }
        if (g_hash_table_contains(cfg->domains, *d)) {
            continue;       /* the file's [domain NAME] says more */
        }
        p = g_new0(DomainPolicy, 1);
        p->name = g_strdup(*d);
        g_hash_table_insert(cfg->domains, p->name, p);
    }
    if (!cfg->control_uids) {
        cfg->control_uids = g_array_new(FALSE, FALSE, sizeof(guint));
    }
    cfg->verbose = verbose;
    return TRUE;
}

static void domain_policy_free(gpointer p)
{
    DomainPolicy *d = p;

    if (d->uids) {
        g_array_unref(d->uids);
    }
    if (d->gids) {
        g_array_unref(d->gids);
    }
    if (d->secret) {
        g_bytes_unref(d->secret);
    }
    g_free(d->name);
    g_free(d);
}

void config_free(BrokerConfig *cfg)
{
    g_free(cfg->socket_path);
    g_free(cfg->control_path);
    g_free(cfg->state_path);
    g_free(cfg->config_path);
    if (cfg->allow_uids) {
        g_array_unref(cfg->allow_uids);
    }
    if (cfg->allow_gids) {
        g_array_unref(cfg->allow_gids);
    }
    if (cfg->control_uids) {
        g_array_unref(cfg->control_uids);
    }
    if (cfg->domains) {
        GHashTableIter it;
        gpointer v;

        g_hash_table_iter_init(&it, cfg->domains);
        while (g_hash_table_iter_next(&it, NULL, &v)) {
            domain_policy_free(v);
        }
        g_hash_table_destroy(cfg->domains);
    }
    memset(cfg, 0, sizeof(*cfg));
}

/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The broker's lookup logic alone, in one process, no sockets: the ceiling
 * that any event loop (glib, io_uring) could approach.  Compared with the
 * end-to-end rate per broker CPU second (broker-bench.py), it bounds what a
 * different request loop could gain.  Prints "lookups N seconds S".
 */
#include <glib.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "broker.h"

static uint8_t msgbuf[QD_SMALL_MSG_MAX];

int main(int argc, char **argv)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *dir = g_dir_make_tmp("qdedup-inproc-XXXXXX", &err);
    BrokerConfig cfg = { .pool_max = 1u << 18, .restart_grace = 1, .max_domains = 4,
                         .uid_candidates = 1u << 22 };
    gboolean auth_failed;
    QdHello h = { .version = QD_PROTO_VERSION };
    QdHelloReply reply = { 0 };
    static QdLookupEntry e[QD_MAX_LOOKUP];
    static QdResult r[QD_MAX_LOOKUP];
    g_autofree char *msg = NULL;
    BrokerClient *c;
    Broker b;
    QdMessage m;
    uint64_t lookups = 0;
    double seconds = argc > 1 ? g_ascii_strtod(argv[1], NULL) : 3;
    gint64 start, end;
    int ro;

    cfg.domains = g_hash_table_new(g_str_hash, g_str_equal);
    g_hash_table_insert(cfg.domains, (char *)"bench", g_new0(DomainPolicy, 1));
    cfg.state_path = g_build_filename(dir, "state", NULL);
    if (!broker_init(&b, &cfg, &err)) {
        fprintf(stderr, "%s\n", err->message);
        return 1;
    }
    strcpy(h.domain, "bench");
    c = broker_client_new(&b, -1, getpid(), 0, 0);
    if (broker_hello(&b, c, &h, NULL, &reply, &ro, &msg, &auth_failed)) {
        fprintf(stderr, "hello: %s\n", msg);
        return 1;
    }
    start = g_get_monotonic_time();
    end = start + seconds * G_USEC_PER_SEC;
    for (uint64_t round = 0; g_get_monotonic_time() < end; round++) {
        size_t len;

        /* Same encode + decode work per batch as over the socket. */
        for (uint32_t i = 0; i < QD_MAX_LOOKUP; i++) {
            uint64_t n = (round * QD_MAX_LOOKUP + i) % 65536;

            e[i] = (QdLookupEntry) { .hash = { (n + 1) * 0x9e3779b97f4a7c15ull, n },
                                     .cookie = n };
        }
        len = qd_encode_lookup(msgbuf, sizeof(msgbuf), 1, e, QD_MAX_LOOKUP);
        qd_decode(msgbuf, len, &m);
        broker_lookup(&b, c, &m, r);
        qd_encode_results(msgbuf, sizeof(msgbuf), QD_MSG_LOOKUP_REPLY, 1, r, QD_MAX_LOOKUP);
        lookups += QD_MAX_LOOKUP;
    }
    printf("lookups %llu seconds %.3f\n", (unsigned long long)lookups,
           (g_get_monotonic_time() - start) / 1e6);
    broker_destroy(&b);
    unlink(cfg.state_path);
    rmdir(dir);
    return 0;
}

/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * A scriptable broker client for the multi-process tests: it plays a VM
 * whose "guest RAM" is one anonymous region, merging pages the way the
 * engine does (lookup, publish, compare, map the slot over the page), and
 * answers one JSON line per command read from stdin:
 *
 *   setuid UID                  drop to UID/GID UID (before connect)
 *   connect SOCKET DOMAIN NAME [SECRET]   ("-" = no domain)
 *   fill NPAGES SEED [uniform]  region of pages with content from SEED
 *   merge                       lookup all, publish what is asked, map hits
 *   check                       every page holds what it should
 *   write PAGE                  change a page (copy-on-write if merged)
 *   pool-check                  every merged slot still holds its original
 *   attack                      try every route to write the pool
 *   unref-all                   unmap merged pages (keeping content), UNREF
 *   garbage                     send a malformed packet
 *   reconnect SOCKET            new connection, pool handed back, RESTORE
 *   lookup-only                 one LOOKUP of all pages; report the results
 *   exit
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "qdedup/client.h"
#include "qdedup/slot-uses.h"
#include "qdedup/transport.h"

#define PAGE QD_PAGE_SIZE
#define NO_SLOT UINT64_MAX
#define MIN(a, b) ((a) < (b) ? (a) : (b))

static QdClient client;
static QdSlotUses uses;         /* our pages per slot: one broker reference each slot */
static uint8_t *region;         /* the "guest RAM" */
static uint8_t *expect;         /* what each page must hold */
static uint64_t *slot_of;       /* merged slot of each page, or NO_SLOT */
static QdHash *hash_of;         /* hash of each page when it was merged */
static uint32_t npages, writes;
static char domain[QD_NAME_MAX + 1], name[QD_NAME_MAX + 1];

static void reply(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void reply(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    fflush(stdout);
}

static void fail_reply(const char *what, int ret, const QdError *err)
{
    if (ret > 0) {
        reply("{\"ok\": false, \"what\": \"%s\", \"error\": \"%s\", \"message\": \"%s\"}",
              what, qd_error_name(ret), err->message);
    } else {
        reply("{\"ok\": false, \"what\": \"%s\", \"error\": \"errno\", \"message\": \"%s\"}",
              what, strerror(-ret));
    }
}

static void fill_page(uint8_t *p, uint64_t seed, uint64_t index)
{
    uint64_t x = seed * 0x9e3779b97f4a7c15ull ^ (index + 1) * 0xbf58476d1ce4e5b9ull;

    for (uint32_t i = 0; i < PAGE; i += 8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        memcpy(p + i, &x, 8);
    }
}

static void cmd_fill(uint32_t n, uint64_t seed, int uniform)
{
    npages = n;
    region = mmap(NULL, (size_t)n * PAGE, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    expect = malloc((size_t)n * PAGE);
    slot_of = malloc(n * sizeof(*slot_of));
    hash_of = malloc(n * sizeof(*hash_of));
    for (uint32_t i = 0; i < n; i++) {
        fill_page(expect + (size_t)i * PAGE, seed, uniform ? 0 : i);
        slot_of[i] = NO_SLOT;
    }
    memcpy(region, expect, (size_t)n * PAGE);
    reply("{\"ok\": true, \"pages\": %u}", n);
}

/* A reference the broker answered with that no page will use: give it back. */
static int unused_ref(uint64_t slot)
{
    QdError err;

    return qd_slot_uses_count(&uses, slot) ? 0 : qd_client_unref(&client, &slot, 1, &err);
}

/* Map slot over page i if the slot holds exactly the page (the engine's
 * compare step); otherwise give the reference back. */
static int map_slot(uint32_t i, uint64_t slot, uint32_t *merged, uint32_t *differ)
{
    uint8_t *page = region + (size_t)i * PAGE;
    uint8_t *check = qd_client_map(&client, NULL, slot, 1);
    int same = check != MAP_FAILED && memcmp(check, page, PAGE) == 0;

    if (check != MAP_FAILED) {
        munmap(check, PAGE);
    }
    if (!same || qd_client_map(&client, page, slot, 1) == MAP_FAILED) {
        (*differ)++;
        return unused_ref(slot);
    }
    qd_slot_uses_add(&uses, slot);
    slot_of[i] = slot;
    hash_of[i] = qd_hash_page(expect + (size_t)i * PAGE);
    (*merged)++;
    return 0;
}

static void cmd_merge(void)
{
    uint32_t count[QD_RESULT_MAX + 1] = { 0 }, merged = 0, differ = 0, stored = 0;
    uint32_t publish_results[QD_RESULT_MAX + 1] = { 0 };
    QdLookupEntry *e = malloc(npages * sizeof(*e));
    QdResult *r = malloc(npages * sizeof(*r));
    uint32_t *want = malloc(npages * sizeof(*want)), nwant = 0;
    QdError err;
    int ret;

    for (uint32_t i = 0; i < npages; i++) {
        e[i] = (QdLookupEntry) { .hash = qd_hash_page(region + (size_t)i * PAGE),
                                 .cookie = i };
    }
    for (uint32_t i = 0; i < npages; i += QD_MAX_LOOKUP) {
        uint32_t n = MIN(QD_MAX_LOOKUP, npages - i);

        ret = qd_client_lookup(&client, e + i, n, r + i, &err);
        if (ret) {
            fail_reply("lookup", ret, &err);
            goto out;
        }
    }
    for (uint32_t i = 0; i < npages; i++) {
        count[r[i].result]++;
        if (slot_of[i] != NO_SLOT && r[i].result == QD_RESULT_HIT) {
            /* Already merged: a hit of a slot we use took nothing. */
            unused_ref(r[i].slot);
        } else if (r[i].result == QD_RESULT_HIT) {
            map_slot(i, r[i].slot, &merged, &differ);
        } else if (r[i].result == QD_RESULT_PUBLISH) {
            want[nwant++] = i;
        }
    }
    for (uint32_t k = 0; k < nwant; k += QD_MAX_PUBLISH) {
        uint32_t n = MIN(QD_MAX_PUBLISH, nwant - k);
        QdLookupEntry pe[QD_MAX_PUBLISH];
        const void *pages[QD_MAX_PUBLISH];
        QdResult pr[QD_MAX_PUBLISH];

        for (uint32_t j = 0; j < n; j++) {
            pe[j] = e[want[k + j]];
            pages[j] = region + (size_t)want[k + j] * PAGE;
        }
        ret = qd_client_publish(&client, pe, pages, n, pr, &err);
        if (ret) {
            fail_reply("publish", ret, &err);
            goto out;
        }
        for (uint32_t j = 0; j < n; j++) {
            publish_results[pr[j].result]++;
            if (pr[j].result == QD_RESULT_STORED || pr[j].result == QD_RESULT_HIT) {
                stored += pr[j].result == QD_RESULT_STORED;
                map_slot(want[k + j], pr[j].slot, &merged, &differ);
            }
        }
    }
    reply("{\"ok\": true, \"miss\": %u, \"hit\": %u, \"publish\": %u, \"quota\": %u, "
          "\"full\": %u, \"stored\": %u, \"publish_quota\": %u, \"publish_full\": %u, "
          "\"publish_unwanted\": %u, \"publish_mismatch\": %u, \"merged\": %u, "
          "\"differ\": %u}",
          count[QD_RESULT_MISS], count[QD_RESULT_HIT], count[QD_RESULT_PUBLISH],
          count[QD_RESULT_QUOTA], count[QD_RESULT_FULL], stored,
          publish_results[QD_RESULT_QUOTA], publish_results[QD_RESULT_FULL],
          publish_results[QD_RESULT_UNWANTED], publish_results[QD_RESULT_MISMATCH],
          merged, differ);
out:
    free(e);
    free(r);
    free(want);
}

static void cmd_check(void)
{
    uint32_t bad = 0, merged = 0;

    for (uint32_t i = 0; i < npages; i++) {
        bad += memcmp(region + (size_t)i * PAGE, expect + (size_t)i * PAGE, PAGE) != 0;
        merged += slot_of[i] != NO_SLOT;
    }
    reply("{\"ok\": %s, \"bad\": %u, \"merged\": %u, \"writes\": %u}",
          bad ? "false" : "true", bad, merged, writes);
}

static void cmd_write(uint32_t i)
{
    if (i >= npages) {
        reply("{\"ok\": false, \"message\": \"no page %u\"}", i);
        return;
    }
    /* A guest write: on a merged page the kernel copies it first. */
    region[(size_t)i * PAGE + 100] ^= 0x5a;
    expect[(size_t)i * PAGE + 100] ^= 0x5a;
    writes++;
    reply("{\"ok\": true}");
}

/* I1: each merged slot, read through a fresh mapping, is still the page's
 * original content, whatever the client wrote since. */
static void cmd_pool_check(void)
{
    uint32_t bad = 0, checked = 0;
    void *pool = mmap(NULL, client.info.pool_slots * PAGE, PROT_READ, MAP_SHARED,
                      client.pool_fd, 0);

    if (pool == MAP_FAILED) {
        reply("{\"ok\": false, \"message\": \"cannot map the pool: %s\"}", strerror(errno));
        return;
    }
    for (uint32_t i = 0; i < npages; i++) {
        if (slot_of[i] != NO_SLOT) {
            checked++;
            bad += !qd_hash_equal(qd_hash_page((uint8_t *)pool + slot_of[i] * PAGE),
                                  hash_of[i]);
        }
    }
    munmap(pool, client.info.pool_slots * PAGE);
    reply("{\"ok\": %s, \"checked\": %u, \"changed\": %u}", bad ? "false" : "true",
          checked, bad);
}

/* Every route by which a client could change pool pages.  Each must fail. */
static void cmd_attack(void)
{
    char path[64], buf[PAGE] = { 1 };
    int fd = client.pool_fd, succeeded = 0, rw;
    void *p;

    printf("{\"routes\": {");
#define ROUTE(name, expr) do { \
        int ok_ = (expr); \
        printf("\"%s\": \"%s\", ", name, ok_ ? "SUCCEEDED" : strerror(errno)); \
        succeeded += ok_; \
    } while (0)
    ROUTE("write", write(fd, buf, PAGE) == PAGE);
    ROUTE("pwrite", pwrite(fd, buf, PAGE, 0) == PAGE);
    ROUTE("ftruncate", ftruncate(fd, 0) == 0);
    ROUTE("punch-hole", fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, PAGE) == 0);
    ROUTE("fchmod", fchmod(fd, 0666) == 0);
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    rw = open(path, O_RDWR);
    ROUTE("reopen-rdwr", rw >= 0);
    if (rw >= 0) {
        close(rw);
    }
    p = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    ROUTE("mmap-shared-write", p != MAP_FAILED);
    if (p != MAP_FAILED) {
        munmap(p, PAGE);
    }
    p = mmap(NULL, PAGE, PROT_READ, MAP_SHARED, fd, 0);
    ROUTE("mprotect-shared-write", p != MAP_FAILED && mprotect(p, PAGE, PROT_READ | PROT_WRITE) == 0);
    if (p != MAP_FAILED) {
        munmap(p, PAGE);
    }
    ROUTE("fcntl-rdwr", fcntl(fd, F_SETFL, O_RDWR) == 0 && (fcntl(fd, F_GETFL) & O_ACCMODE) != O_RDONLY);
#undef ROUTE
    printf("\"_\": \"\"}, \"succeeded\": %d, \"uid\": %u}\n", succeeded, (unsigned)getuid());
    fflush(stdout);
}

/* Give merged pages back: private copies first, then UNREF. */
static void cmd_unref_all(void)
{
    uint64_t slots[QD_MAX_UNREF];
    uint32_t n = 0, total = 0;
    QdError err;
    int ret = 0;

    for (uint32_t i = 0; i <= npages && ret == 0; i++) {
        if (i < npages && slot_of[i] != NO_SLOT) {
            uint8_t *page = region + (size_t)i * PAGE;
            uint8_t copy[PAGE];

            memcpy(copy, page, PAGE);
            mmap(page, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
                 -1, 0);
            memcpy(page, copy, PAGE);
            if (qd_slot_uses_drop(&uses, slot_of[i]) == 0) {
                slots[n++] = slot_of[i];
            }
            slot_of[i] = NO_SLOT;
        }
        if (n == QD_MAX_UNREF || (i == npages && n)) {
            ret = qd_client_unref(&client, slots, n, &err);
            total += n;
            n = 0;
        }
    }
    if (ret) {
        fail_reply("unref", ret, &err);
    } else {
        reply("{\"ok\": true, \"unrefs\": %u}", total);
    }
}

static void cmd_garbage(void)
{
    uint8_t junk[64];
    uint8_t rbuf[QD_SMALL_MSG_MAX];
    QdMessage m;
    ssize_t n;

    for (size_t i = 0; i < sizeof(junk); i++) {
        junk[i] = i * 37 + 11;
    }
    qd_send(client.sock, junk, sizeof(junk), NULL, 0, -1);
    n = qd_recv(client.sock, rbuf, sizeof(rbuf), NULL);
    if (n > 0 && qd_decode(rbuf, n, &m) == 0 && m.hdr.type == QD_MSG_ERROR) {
        n = qd_recv(client.sock, rbuf, sizeof(rbuf), NULL);    /* then EOF */
        reply("{\"ok\": true, \"error\": \"%s\", \"closed\": %s}",
              qd_error_name(m.u.error.code), n == 0 ? "true" : "false");
    } else {
        reply("{\"ok\": false, \"message\": \"no error reply (%zd)\"}", n);
    }
}

/*
 * HELLO as name in domain (with secret, may be NULL), handing back the pool
 * we hold as descriptor hand_back (the broker looks at it through /proc).
 */
static int do_connect(const char *path, int hand_back, const char *secret)
{
    QdHello h = { .version = QD_PROTO_VERSION, .pid = getpid(),
                  .flags = hand_back >= 0 ? QD_HELLO_RECONNECT : 0 };
    QdError err = { 0 };
    struct stat st;
    int ret;

    snprintf(h.name, sizeof(h.name), "%s", name);
    snprintf(h.domain, sizeof(h.domain), "%s", domain);
    if (secret) {
        h.secret_len = snprintf((char *)h.secret, sizeof(h.secret), "%s", secret);
    }
    if (hand_back >= 0 && fstat(hand_back, &st) == 0) {
        h.pool_fd = hand_back;
        h.pool_dev = st.st_dev;
        h.pool_ino = st.st_ino;
    }
    ret = qd_client_open(&client, path, &h, &err);
    if (ret) {
        fail_reply("connect", ret, &err);
    } else if (!uses.chunks && qd_slot_uses_init(&uses, client.info.pool_slots) < 0) {
        ret = -ENOMEM;
    }
    return ret;
}

static void cmd_reconnect(const char *path)
{
    int old_pool = dup(client.pool_fd);
    static QdRestoreEntry e[QD_MAX_RESTORE];
    uint32_t n = 0, restored = 0, refused = 0;
    QdResult r[QD_MAX_RESTORE];
    QdError err;

    qd_client_close(&client);
    if (do_connect(path, old_pool, NULL)) {
        close(old_pool);
        return;
    }
    close(old_pool);
    if (!(client.info.flags & QD_REPLY_REFS_KEPT)) {
        for (uint32_t i = 0; i <= npages; i++) {
            /* One entry per slot: the first page that maps it. */
            if (i < npages && slot_of[i] != NO_SLOT &&
                qd_slot_uses_count(&uses, slot_of[i]) &&
                !(n && e[n - 1].slot == slot_of[i])) {
                int first = 1;

                for (uint32_t j = 0; j < i && first; j++) {
                    first = slot_of[j] != slot_of[i];
                }
                if (first) {
                    e[n++] = (QdRestoreEntry) { .slot = slot_of[i], .hash = hash_of[i] };
                }
            }
            if (n == QD_MAX_RESTORE || (i == npages && n)) {
                int ret = qd_client_restore(&client, e, n, r, &err);

                if (ret) {
                    fail_reply("restore", ret, &err);
                    return;
                }
                for (uint32_t k = 0; k < n; k++) {
                    restored += r[k].result == QD_RESULT_HIT;
                    refused += r[k].result != QD_RESULT_HIT;
                }
                n = 0;
            }
        }
    }
    reply("{\"ok\": true, \"adopted\": %s, \"refs_kept\": %s, \"restored\": %u, "
          "\"refused\": %u}", client.info.flags & QD_REPLY_ADOPTED ? "true" : "false",
          client.info.flags & QD_REPLY_REFS_KEPT ? "true" : "false", restored, refused);
}

static void cmd_lookup_only(void)
{
    static QdLookupEntry e[QD_MAX_LOOKUP];
    static QdResult r[QD_MAX_LOOKUP];
    uint32_t count[QD_RESULT_MAX + 1] = { 0 }, n = MIN(npages, QD_MAX_LOOKUP);
    QdError err;
    int ret;

    for (uint32_t i = 0; i < n; i++) {
        e[i] = (QdLookupEntry) { .hash = qd_hash_page(region + (size_t)i * PAGE),
                                 .cookie = 1000000 + i };
    }
    ret = qd_client_lookup(&client, e, n, r, &err);
    if (ret) {
        fail_reply("lookup", ret, &err);
        return;
    }
    for (uint32_t i = 0; i < n; i++) {
        count[r[i].result]++;
        if (r[i].result == QD_RESULT_HIT) {
            unused_ref(r[i].slot);
        }
    }
    reply("{\"ok\": true, \"miss\": %u, \"hit\": %u, \"publish\": %u}",
          count[QD_RESULT_MISS], count[QD_RESULT_HIT], count[QD_RESULT_PUBLISH]);
}

int main(void)
{
    char line[512], a[256], b[128], c[QD_NAME_MAX + 1], d[QD_NAME_MAX + 1];

    client.sock = client.pool_fd = -1;
    while (fgets(line, sizeof(line), stdin)) {
        int n = sscanf(line, "%255s %127s %64s %64s", a, b, c, d);

        if (n < 1) {
            continue;
        }
        if (!strcmp(a, "exit")) {
            break;
        } else if (!strcmp(a, "setuid") && n == 2) {
            uid_t id = atoi(b);
            int ok = setresgid(id, id, id) == 0 && setresuid(id, id, id) == 0;

            reply("{\"ok\": %s, \"uid\": %u}", ok ? "true" : "false", (unsigned)getuid());
        } else if (!strcmp(a, "connect") && n >= 4) {
            char secret[QD_SECRET_MAX + 1];

            snprintf(domain, sizeof(domain), "%s", strcmp(c, "-") ? c : "");
            snprintf(name, sizeof(name), "%s", d);
            if (do_connect(b, -1, sscanf(line, "%*s %*s %*s %*s %64s", secret) == 1
                                  ? secret : NULL) == 0) {
                reply("{\"ok\": true, \"client_id\": %u, \"pool_slots\": %llu}",
                      client.info.client_id, (unsigned long long)client.info.pool_slots);
            }
        } else if (!strcmp(a, "fill") && n >= 3) {
            cmd_fill(atoi(b), strtoull(c, NULL, 0), n == 4 && !strcmp(d, "uniform"));
        } else if (!strcmp(a, "merge")) {
            cmd_merge();
        } else if (!strcmp(a, "check")) {
            cmd_check();
        } else if (!strcmp(a, "write") && n == 2) {
            cmd_write(atoi(b));
        } else if (!strcmp(a, "pool-check")) {
            cmd_pool_check();
        } else if (!strcmp(a, "attack")) {
            cmd_attack();
        } else if (!strcmp(a, "unref-all")) {
            cmd_unref_all();
        } else if (!strcmp(a, "garbage")) {
            cmd_garbage();
        } else if (!strcmp(a, "reconnect") && n == 2) {
            cmd_reconnect(b);
        } else if (!strcmp(a, "lookup-only")) {
            cmd_lookup_only();
        } else {
            reply("{\"ok\": false, \"message\": \"bad command\"}");
        }
    }
    return 0;
}

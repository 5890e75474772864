/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The broker's parts without sockets: the stable index, the slot allocator
 * (runs, reuse, memory given back, held slots), per-client references,
 * candidates, and the request logic: reference counting (I2), one pool per
 * domain (I11), and what RESTORE accepts.
 */
#include <errno.h>
#include <glib.h>
#include <string.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "broker.h"
#include "mapscan.h"
#include "qdedup/slot-uses.h"

static const uint8_t *scratch_zero(void)
{
    static const uint8_t zero[QD_PAGE_SIZE];

    return zero;
}

static QdHash hash_n(uint64_t n)
{
    return (QdHash) { .lo = n * 0x9e3779b97f4a7c15ull, .hi = n };
}

/* ---- index ---------------------------------------------------------------- */

static KeyedHash key;

static uint64_t find(HashIndex *ix, SlotTable *st, QdHash h)
{
    return index_find(ix, st, h, keyed_hash(ix->key, h));
}

static void index_check(uint64_t (*lo_of)(uint64_t))
{
    const uint64_t n = 20000;
    SlotTable st;
    HashIndex ix;
    GRand *rnd = g_rand_new_with_seed(1);

    slot_table_init(&st);
    index_init(&ix, &key);
    for (uint64_t s = 0; s < n; s++) {
        SlotInfo *si = slot_table_get(&st, s);

        si->hash = (QdHash) { .lo = lo_of(s), .hi = s };
        index_insert(&ix, &st, s);
    }
    g_assert_cmpuint(ix.count, ==, n);
    ix.probes = 0;
    for (uint64_t s = 0; s < n; s++) {
        g_assert_cmpuint(find(&ix, &st, st.info[s].hash), ==, s);
    }
    /* Placed by the keyed hash: chosen low bits do not make long runs. */
    g_assert_cmpuint(ix.probes, <, 4 * n);
    /* Remove a random half; the rest must stay findable (backward shift). */
    for (uint64_t s = 0; s < n; s++) {
        if (g_rand_boolean(rnd)) {
            index_remove(&ix, &st, s);
            st.info[s].refs = 1;    /* mark removed */
        }
    }
    for (uint64_t s = 0; s < n; s++) {
        uint64_t want = st.info[s].refs ? INDEX_NONE : s;

        g_assert_cmpuint(find(&ix, &st, st.info[s].hash), ==, want);
    }
    g_assert_cmpuint(find(&ix, &st, (QdHash) { 12345, 99999999 }), ==, INDEX_NONE);
    index_destroy(&ix);
    slot_table_destroy(&st);
    g_rand_free(rnd);
}

static uint64_t spread(uint64_t s)
{
    return hash_n(s).lo;
}

/* Many hashes with the same low bits, as a flooding client would choose. */
static uint64_t clustered(uint64_t s)
{
    return (s % 7) | (s << 40);
}

static void test_index(void)
{
    index_check(spread);
    index_check(clustered);
}

/* ---- pool ------------------------------------------------------------------ */

static void test_pool(void)
{
    g_autoptr(GError) err = NULL;
    Pool p;
    uint64_t a, b, c;

    g_assert_true(pool_create(&p, 1024, &err));
    a = pool_alloc_run(&p, 10);
    b = pool_alloc_run(&p, 5);
    g_assert_cmpuint(a, ==, 0);
    g_assert_cmpuint(b, ==, 10);       /* consecutive, lowest first */
    g_assert_cmpuint(p.nused, ==, 15);

    for (uint64_t s = a; s < a + 10; s++) {
        memset(pool_page(&p, s), 0x5a, QD_PAGE_SIZE);
    }
    g_assert_cmpuint(pool_resident_bytes(&p), >=, 10 * QD_PAGE_SIZE);
    /* Free a hole of 3 in the first run: a run of 3 fits there, 4 does not. */
    pool_free(&p, 2);
    pool_free(&p, 3);
    pool_free(&p, 4);
    g_assert_cmpuint(pool_resident_bytes(&p), <=, 7 * QD_PAGE_SIZE);   /* memory back */
    g_assert_cmpuint(pool_page(&p, 3)[0], ==, 0);                     /* punched */
    c = pool_alloc_run(&p, 4);
    g_assert_cmpuint(c, ==, 15);
    c = pool_alloc_run(&p, 3);
    g_assert_cmpuint(c, ==, 2);
    g_assert_false(pool_claim(&p, 500));       /* only held slots can be claimed */
    g_assert_cmpuint(pool_alloc_run(&p, 2000), ==, POOL_NO_SLOT);    /* over the max */
    pool_free(&p, 900);                        /* not used: nothing happens */

    /* The read-only descriptor cannot write. */
    g_assert_cmpint(write(p.ro_fd, "x", 1), <, 0);
    /* The bitmaps grow with what is used, not with the pool's size. */
    g_assert_cmpuint(pool_bitmap_bytes(&p), <, 1024 / 8);
    pool_destroy(&p);
}

/*
 * After a restart, slots that held data when the pool was adopted are
 * held: not handed out again, not punched when the clients that restored
 * one let go of it, until the sweep says nobody maps them.  (The TCG test
 * found guests reading zeros after a broker restart without this.)
 */
static void test_pool_adopt(void)
{
    g_autoptr(GError) err = NULL;
    Pool p, q;

    g_assert_true(pool_create(&p, 1024, &err));
    g_assert_cmpuint(pool_alloc_run(&p, 10), ==, 0);
    for (uint64_t s = 0; s < 10; s++) {
        memset(pool_page(&p, s), 0x40 + s, QD_PAGE_SIZE);
    }
    g_assert_true(pool_adopt(&q, dup(p.ro_fd), 1024, &err));
    g_assert_cmpuint(q.nused, ==, 0);
    g_assert_cmpuint(q.nheld, ==, 10);
    g_assert_cmpuint(pool_alloc_run(&q, 1), ==, 10);     /* not 0..9: held */
    g_assert_cmpuint(pool_alloc_run(&q, 3), ==, 11);
    g_assert_false(pool_claim(&q, 12));                  /* not held: no RESTORE */
    g_assert_true(pool_claim(&q, 3));                    /* a RESTORE */
    g_assert_false(pool_claim(&q, 3));
    g_assert_cmpuint(pool_page(&q, 3)[0], ==, 0x43);
    /* Its last reference goes before another client restored it: kept. */
    pool_free(&q, 3);
    g_assert_cmpuint(pool_page(&q, 3)[0], ==, 0x43);
    g_assert_cmpuint(pool_alloc_run(&q, 1), ==, 14);
    g_assert_true(pool_claim(&q, 3));                    /* the other client */
    /* The sweep's outcomes: punched when unused and unmapped, else released. */
    pool_punch_held(&q, 3);                              /* used: refused */
    g_assert_cmpuint(pool_page(&q, 3)[0], ==, 0x43);
    pool_unhold(&q, 3);
    for (uint64_t s = 0; s < 10; s++) {
        pool_punch_held(&q, s);
    }
    g_assert_cmpuint(q.nheld, ==, 0);
    g_assert_cmpuint(pool_page(&q, 0)[0], ==, 0);
    g_assert_cmpuint(pool_page(&q, 3)[0], ==, 0x43);
    g_assert_cmpuint(pool_alloc_run(&q, 3), ==, 0);
    g_assert_cmpuint(pool_alloc_run(&q, 1), ==, 4);
    pool_free(&q, 3);                                    /* no longer held: punched */
    g_assert_cmpuint(pool_page(&q, 3)[0], ==, 0);
    pool_destroy(&q);
    pool_destroy(&p);
}

static void test_pool_full(void)
{
    g_autoptr(GError) err = NULL;
    Pool p;

    g_assert_true(pool_create(&p, 64, &err));
    for (int i = 0; i < 64; i++) {
        g_assert_cmpuint(pool_alloc_run(&p, 1), ==, i);
    }
    g_assert_cmpuint(pool_alloc_run(&p, 1), ==, POOL_NO_SLOT);
    pool_free(&p, 40);
    g_assert_cmpuint(pool_alloc_run(&p, 1), ==, 40);
    pool_destroy(&p);
}

/* ---- who maps the pool: /proc/PID/maps ---------------------------------------- */

/* A child maps slots 3..5 and 9 privately, and the whole pool shared. */
static void test_mapscan(void)
{
    g_autoptr(GError) err = NULL;
    MapScan *scan = mapscan_new();
    MapScanPool mp;
    int ready[2];
    Pool p;
    pid_t child;
    char c;

    g_assert_true(pool_create(&p, 64, &err));
    g_assert_cmpint(pipe(ready), ==, 0);
    child = fork();
    if (child == 0) {
        void *a = mmap(NULL, 3 * QD_PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE,
                       p.ro_fd, 3 * QD_PAGE_SIZE);
        void *b = mmap(NULL, QD_PAGE_SIZE, PROT_READ, MAP_PRIVATE, p.ro_fd,
                       9 * QD_PAGE_SIZE);
        void *v = mmap(NULL, 64 * QD_PAGE_SIZE, PROT_READ, MAP_SHARED, p.ro_fd, 0);

        if (write(ready[1], a != MAP_FAILED && b != MAP_FAILED && v != MAP_FAILED ? "y" : "n",
                  1) != 1) {
            _exit(1);
        }
        pause();
        _exit(0);
    }
    g_assert_cmpint(read(ready[0], &c, 1), ==, 1);
    g_assert_cmpint(c, ==, 'y');
    mp = (MapScanPool) { p.dev, p.ino, 1 };
    g_array_append_val(scan->pools, mp);
    mapscan_run(scan);
    kill(child, SIGKILL);
    waitpid(child, NULL, 0);
    g_assert_cmpuint(scan->ranges->len, ==, 2);     /* the shared view is left out */
    g_assert_cmpint(g_array_index(scan->ranges, MapRange, 0).pid, ==, child);
    g_assert_cmpuint(g_array_index(scan->ranges, MapRange, 0).first, ==, 3);
    g_assert_cmpuint(g_array_index(scan->ranges, MapRange, 0).n, ==, 3);
    g_assert_cmpuint(g_array_index(scan->ranges, MapRange, 1).first, ==, 9);
    g_assert_cmpuint(g_array_index(scan->ranges, MapRange, 1).n, ==, 1);
    mapscan_free(scan);
    close(ready[0]);
    close(ready[1]);
    pool_destroy(&p);
}

/* ---- references ------------------------------------------------------------- */

static void sum_refs(uint64_t slot, void *opaque)
{
    uint64_t *acc = opaque;

    acc[0]++;
    acc[1] += slot;
}

static void test_refs(void)
{
    ClientRefs r;
    uint64_t acc[2] = { 0 };

    refs_init(&r, 1u << 20);
    g_assert_true(refs_add(&r, 5));
    g_assert_false(refs_add(&r, 5));            /* one reference per slot */
    g_assert_true(refs_add(&r, 100000));
    g_assert_false(refs_add(&r, 1u << 20));     /* outside the pool */
    g_assert_cmpuint(r.held, ==, 2);
    g_assert_false(refs_remove(&r, 6));
    refs_foreach(&r, sum_refs, acc);
    g_assert_cmpuint(acc[0], ==, 2);
    g_assert_cmpuint(acc[1], ==, 100005);
    g_assert_true(refs_remove(&r, 5));
    g_assert_false(refs_remove(&r, 5));
    g_assert_cmpuint(r.held, ==, 1);
    refs_destroy(&r);
}

/* The client side: uses per slot, over the one-byte cells and back. */
static void test_slot_uses(void)
{
    QdSlotUses u;

    g_assert_cmpint(qd_slot_uses_init(&u, 1u << 16), ==, 0);
    g_assert_cmpint(qd_slot_uses_add(&u, 7), ==, 1);
    for (int i = 2; i <= 1000; i++) {
        g_assert_cmpint(qd_slot_uses_add(&u, 7), ==, i);
    }
    g_assert_cmpint(qd_slot_uses_add(&u, 1u << 16), ==, -EINVAL);
    g_assert_cmpuint(qd_slot_uses_count(&u, 7), ==, 1000);
    g_assert_cmpuint(u.distinct, ==, 1);
    for (int i = 999; i >= 0; i--) {
        g_assert_cmpint(qd_slot_uses_drop(&u, 7), ==, i);
    }
    g_assert_cmpint(qd_slot_uses_drop(&u, 7), ==, -ENOENT);
    g_assert_cmpuint(u.distinct, ==, 0);
    qd_slot_uses_add(&u, 9);
    qd_slot_uses_forget(&u, 9);
    g_assert_cmpuint(qd_slot_uses_count(&u, 9), ==, 0);
    qd_slot_uses_destroy(&u);
}

/* ---- candidates -------------------------------------------------------------- */

static uint64_t kh_n(uint64_t n)
{
    return keyed_hash(&key, hash_n(n));
}

static void test_candidates(void)
{
    CandBudget b1 = { 0 }, b2 = { 0 }, small = { .max = 100 };
    Candidates c;
    uint64_t gen = 1;

    candidates_init(&c);
    g_assert_cmpint(candidates_check(&c, kh_n(1), 1, 100, &b1, gen), ==, CAND_NEW);
    g_assert_cmpint(candidates_check(&c, kh_n(1), 1, 100, &b1, gen), ==, CAND_SEEN);
    g_assert_cmpint(candidates_check(&c, kh_n(1), 1, 101, &b1, gen), ==, CAND_MATCH); /* same VM */
    g_assert_cmpint(candidates_check(&c, kh_n(1), 2, 100, &b2, gen), ==, CAND_MATCH); /* other VM */
    for (uint64_t i = 2; i < 5000; i++) {
        g_assert_cmpint(candidates_check(&c, kh_n(i), 1, i, &b1, gen), ==, CAND_NEW);
    }
    /* Seen within one rotation: survives (and is carried forward). */
    candidates_rotate(&c);
    gen++;
    g_assert_cmpint(candidates_check(&c, kh_n(3), 1, 3, &b1, gen), ==, CAND_SEEN);
    candidates_rotate(&c);
    gen++;
    g_assert_cmpint(candidates_check(&c, kh_n(3), 2, 9, &b2, gen), ==, CAND_MATCH);
    /* Not seen for two rotations: gone. */
    g_assert_cmpint(candidates_check(&c, kh_n(4), 2, 9, &b2, gen), ==, CAND_NEW);
    candidates_forget(&c, kh_n(3));
    g_assert_cmpint(candidates_check(&c, kh_n(3), 2, 9, &b2, gen), ==, CAND_NEW);
    /* A client's budget: past it, nothing more is remembered for it. */
    for (uint64_t i = 0; i < 150; i++) {
        candidates_check(&c, kh_n(100000 + i), 3, i, &small, gen);
    }
    g_assert_cmpuint(small.placed, ==, 100);
    g_assert_cmpuint(small.refused, ==, 50);
    g_assert_cmpint(candidates_check(&c, kh_n(100149), 1, 7, &b1, gen), ==, CAND_NEW);
    candidates_rotate(&c);
    gen++;
    g_assert_cmpint(candidates_check(&c, kh_n(200000), 3, 1, &small, gen), ==, CAND_NEW);
    candidates_destroy(&c);
}

/* ---- request logic ----------------------------------------------------------- */

typedef struct Fixture {
    BrokerConfig cfg;
    Broker b;
    DomainPolicy d, other;
    char *dir;
} Fixture;

static void fixture_setup(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) err = NULL;

    memset(f, 0, sizeof(*f));
    f->dir = g_dir_make_tmp("qdedup-unit-XXXXXX", &err);
    f->cfg.pool_max = 4096;
    f->cfg.restart_grace = 1;
    f->cfg.max_domains = 16;
    f->cfg.uid_candidates = 1 << 20;
    f->cfg.hash_seed = 42;
    f->cfg.domains = g_hash_table_new(g_str_hash, g_str_equal);
    f->d.name = (char *)"d";
    f->other.name = (char *)"other";
    g_hash_table_insert(f->cfg.domains, f->d.name, &f->d);
    g_hash_table_insert(f->cfg.domains, f->other.name, &f->other);
    f->cfg.state_path = g_build_filename(f->dir, "state", NULL);
    g_assert_true(broker_init(&f->b, &f->cfg, &err));
}

static void fixture_teardown(Fixture *f, gconstpointer data)
{
    broker_destroy(&f->b);
    g_hash_table_destroy(f->cfg.domains);
    unlink(f->cfg.state_path);
    g_free(f->cfg.state_path);
    rmdir(f->dir);
    g_free(f->dir);
}

static int try_join(Fixture *f, const char *domain, BrokerClient **out, char **msg)
{
    QdHello h = { .version = QD_PROTO_VERSION };
    QdHelloReply reply = { 0 };
    BrokerClient *c = broker_client_new(&f->b, -1, getpid(), 0, 0);
    gboolean auth_failed;
    int ro, ret;

    g_strlcpy(h.domain, domain, sizeof(h.domain));
    ret = broker_hello(&f->b, c, &h, NULL, &reply, &ro, msg, &auth_failed);
    if (ret) {
        broker_client_free(&f->b, c);
        c = NULL;
    }
    *out = c;
    return ret;
}

static BrokerClient *join(Fixture *f, const char *domain)
{
    g_autofree char *msg = NULL;
    BrokerClient *c;

    g_assert_cmpint(try_join(f, domain, &c, &msg), ==, 0);
    return c;
}

/* LOOKUP of n pages of content seed..seed+n-1 (hashes of real pages). */
static void lookup(Fixture *f, BrokerClient *c, uint64_t seed, uint32_t n, uint64_t cookie,
                   QdResult *out, uint8_t *msgbuf)
{
    QdLookupEntry e[64];
    static uint8_t page[QD_PAGE_SIZE];
    QdMessage m;
    size_t len;

    for (uint32_t i = 0; i < n; i++) {
        memset(page, 0, sizeof(page));
        memcpy(page, &(uint64_t) { seed + i }, 8);
        e[i] = (QdLookupEntry) { .hash = qd_hash_page(page), .cookie = cookie + i };
    }
    len = qd_encode_lookup(msgbuf, QD_SMALL_MSG_MAX, 1, e, n);
    g_assert_cmpint(qd_decode(msgbuf, len, &m), ==, 0);
    broker_lookup(&f->b, c, &m, out);
}

/* PUBLISH of the same pages, as server.c does it (plan, data, commit). */
static void publish(Fixture *f, BrokerClient *c, uint64_t seed, uint32_t n, QdResult *out,
                    uint8_t *msgbuf)
{
    QdLookupEntry e[64];
    uint8_t page[QD_PAGE_SIZE];
    uint64_t dest[64];
    Pool *pool = &c->domain->pool;
    QdMessage m;
    size_t meta;

    for (uint32_t i = 0; i < n; i++) {
        memset(page, 0, sizeof(page));
        memcpy(page, &(uint64_t) { seed + i }, 8);
        e[i] = (QdLookupEntry) { .hash = qd_hash_page(page), .cookie = i };
    }
    meta = qd_encode_publish_meta(msgbuf, QD_SMALL_MSG_MAX, 2, e, n);
    g_assert_cmpint(qd_decode_publish_meta(msgbuf, meta, QD_PUBLISH_SIZE(n), &m), ==, 0);
    broker_publish_plan(&f->b, c, &m, dest, out);
    for (uint32_t i = 0; i < n; i++) {
        if (dest[i] != POOL_NO_SLOT) {
            memset(pool_page(pool, dest[i]), 0, QD_PAGE_SIZE);
            memcpy(pool_page(pool, dest[i]), &(uint64_t) { seed + i }, 8);
        }
    }
    broker_publish_commit(&f->b, c, &m, dest, out);
}

/* Both clients of one domain store and map pages seed.. (n of them). */
static void share(Fixture *f, BrokerClient *a, BrokerClient *b, uint64_t seed, uint32_t n,
                  QdResult *r, uint8_t *msgbuf)
{
    lookup(f, a, seed, n, 0, r, msgbuf);
    lookup(f, b, seed, n, 0, r, msgbuf);
    publish(f, b, seed, n, r, msgbuf);
    g_assert_cmpuint(r[0].result, ==, QD_RESULT_STORED);
    lookup(f, a, seed, n, 0, r, msgbuf);
    g_assert_cmpuint(r[0].result, ==, QD_RESULT_HIT);
}

static void test_ops_refcounts(Fixture *f, gconstpointer data)
{
    static uint8_t msgbuf[QD_SMALL_MSG_MAX];
    QdResult r[64];
    BrokerClient *a = join(f, "d"), *b = join(f, "d"), *x = join(f, "other");
    Domain *d = a->domain;
    uint64_t slots[3];
    QdMessage m;
    size_t len;

    lookup(f, a, 1000, 8, 0, r, msgbuf);
    g_assert_cmpuint(r[0].result, ==, QD_RESULT_MISS);
    publish(f, a, 1000, 8, r, msgbuf);
    g_assert_cmpuint(r[0].result, ==, QD_RESULT_UNWANTED);     /* nobody asked */
    g_assert_cmpuint(d->pool.nused, ==, 0);
    lookup(f, b, 1000, 8, 0, r, msgbuf);
    g_assert_cmpuint(r[7].result, ==, QD_RESULT_PUBLISH);
    publish(f, b, 1000, 8, r, msgbuf);
    g_assert_cmpuint(r[7].result, ==, QD_RESULT_STORED);
    g_assert_cmpuint(r[7].slot, ==, r[0].slot + 7);            /* one run */
    lookup(f, a, 1000, 8, 0, r, msgbuf);
    g_assert_cmpuint(r[3].result, ==, QD_RESULT_HIT);
    lookup(f, x, 1000, 8, 0, r + 8, msgbuf);
    g_assert_cmpuint(r[8].result, ==, QD_RESULT_MISS);          /* other domain */
    g_assert_cmpuint(d->slots.info[r[3].slot].refs, ==, 2);

    /* One reference per client and slot, however often it looks it up. */
    for (int i = 0; i < 100; i++) {
        lookup(f, a, 1000, 8, 0, r, msgbuf);
    }
    g_assert_cmpuint(r[3].result, ==, QD_RESULT_HIT);
    g_assert_cmpuint(d->slots.info[r[3].slot].refs, ==, 2);
    g_assert_cmpuint(a->refs.held, ==, 8);

    /* UNREF is all or nothing. */
    slots[0] = r[0].slot;
    slots[1] = r[0].slot;       /* a holds it once only */
    len = qd_encode_unref(msgbuf, sizeof(msgbuf), 3, slots, 2);
    g_assert_cmpint(qd_decode(msgbuf, len, &m), ==, 0);
    g_assert_cmpint(broker_unref(&f->b, a, &m), ==, QD_ERR_NOT_HELD);
    g_assert_cmpuint(d->slots.info[r[0].slot].refs, ==, 2);
    g_assert_true(refs_held(&a->refs, r[0].slot));
    len = qd_encode_unref(msgbuf, sizeof(msgbuf), 3, slots, 1);
    g_assert_cmpint(qd_decode(msgbuf, len, &m), ==, 0);
    g_assert_cmpint(broker_unref(&f->b, a, &m), ==, 0);
    g_assert_cmpuint(d->slots.info[r[0].slot].refs, ==, 1);

    /* A client going away releases exactly what it held; slots die at zero. */
    broker_client_free(&f->b, b);
    g_assert_cmpuint(d->pool.nused, ==, 7);                     /* a still holds 7 */
    broker_client_free(&f->b, a);
    g_assert_cmpuint(f->b.stats.frees, ==, 8);
    broker_client_free(&f->b, x);
    g_assert_cmpuint(g_hash_table_size(f->b.domain_ids), ==, 0);   /* empty domains go */
}

/* I11: a pool per domain; the unconfigured and the private. */
static void test_ops_domains(Fixture *f, gconstpointer data)
{
    static uint8_t msgbuf[QD_SMALL_MSG_MAX];
    QdResult r[64];
    BrokerClient *a = join(f, "d"), *b = join(f, "d");
    BrokerClient *x = join(f, "other"), *y = join(f, "other");
    BrokerClient *p = join(f, ""), *q = join(f, ""), *n;
    g_autofree char *msg = NULL;
    struct stat sa, sx;

    share(f, a, b, 1000, 8, r, msgbuf);
    share(f, x, y, 1000, 8, r, msgbuf);
    /* Slot numbers are per domain: both start at 0, in different files. */
    g_assert_cmpuint(r[0].slot, ==, 0);
    g_assert_true(a->domain != x->domain && a->domain == b->domain);
    g_assert_cmpint(fstat(a->domain->pool.ro_fd, &sa), ==, 0);
    g_assert_cmpint(fstat(x->domain->pool.ro_fd, &sx), ==, 0);
    g_assert_cmpuint(sa.st_ino, !=, sx.st_ino);
    /* Private domains: one each, no sharing between them. */
    g_assert_true(p->domain != q->domain && !*p->domain->name);
    lookup(f, p, 1000, 8, 0, r, msgbuf);
    g_assert_cmpuint(r[0].result, ==, QD_RESULT_MISS);
    lookup(f, q, 1000, 8, 0, r, msgbuf);
    g_assert_cmpuint(r[0].result, ==, QD_RESULT_MISS);
    /* ... but a private VM's own duplicates merge (another cookie). */
    lookup(f, p, 1000, 8, 100, r, msgbuf);
    g_assert_cmpuint(r[0].result, ==, QD_RESULT_PUBLISH);
    /* Domains are declared by the host. */
    g_assert_cmpint(try_join(f, "nowhere", &n, &msg), ==, QD_ERR_DENIED);
    g_assert_nonnull(strstr(msg, "'nowhere'"));
    broker_client_free(&f->b, a);
    broker_client_free(&f->b, b);
    broker_client_free(&f->b, x);
    broker_client_free(&f->b, y);
    broker_client_free(&f->b, p);
    broker_client_free(&f->b, q);
}

/* RESTORE outside recovery, or of a slot not held: refused, nothing changes. */
static void test_ops_restore_refused(Fixture *f, gconstpointer data)
{
    static uint8_t msgbuf[QD_SMALL_MSG_MAX];
    QdResult r[64];
    BrokerClient *a = join(f, "d"), *b = join(f, "d");
    QdRestoreEntry e[2];
    uint64_t used;
    QdMessage m;
    size_t len;

    share(f, a, b, 2000, 4, r, msgbuf);
    used = a->domain->pool.nused;
    e[0] = (QdRestoreEntry) { .slot = 10, .hash = qd_hash_page(scratch_zero()) };
    e[1] = (QdRestoreEntry) { .slot = r[0].slot, .hash = a->domain->slots.info[r[0].slot].hash };
    len = qd_encode_restore(msgbuf, sizeof(msgbuf), 4, e, 2);
    g_assert_cmpint(qd_decode(msgbuf, len, &m), ==, 0);
    broker_restore(&f->b, b, &m, r);
    g_assert_cmpuint(r[0].result, ==, QD_RESULT_REFUSED);
    g_assert_cmpuint(r[1].result, ==, QD_RESULT_REFUSED);
    g_assert_cmpuint(a->domain->pool.nused, ==, used);
    g_assert_cmpuint(b->refs.held, ==, 4);
    broker_client_free(&f->b, a);
    broker_client_free(&f->b, b);
}

int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    keyed_init(&key, 7);
    g_test_add_func("/broker/index", test_index);
    g_test_add_func("/broker/pool", test_pool);
    g_test_add_func("/broker/pool-adopt", test_pool_adopt);
    g_test_add_func("/broker/pool-full", test_pool_full);
    g_test_add_func("/broker/mapscan", test_mapscan);
    g_test_add_func("/broker/refs", test_refs);
    g_test_add_func("/broker/slot-uses", test_slot_uses);
    g_test_add_func("/broker/candidates", test_candidates);
    g_test_add("/broker/ops-refcounts", Fixture, NULL, fixture_setup, test_ops_refcounts,
               fixture_teardown);
    g_test_add("/broker/ops-domains", Fixture, NULL, fixture_setup, test_ops_domains,
               fixture_teardown);
    g_test_add("/broker/ops-restore-refused", Fixture, NULL, fixture_setup,
               test_ops_restore_refused, fixture_teardown);
    return g_test_run();
}

/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The broker's parts without sockets: the stable index, the slot allocator
 * (runs, reuse, memory given back), per-client references, candidates, and
 * the request logic's reference counting (I2).
 */
#include <glib.h>
#include <string.h>
#include <unistd.h>

#include "broker.h"

static QdHash hash_n(uint64_t n)
{
    return (QdHash) { .lo = n * 0x9e3779b97f4a7c15ull, .hi = n };
}

/* ---- index ---------------------------------------------------------------- */

static void index_check(uint64_t (*lo_of)(uint64_t))
{
    const uint64_t n = 20000;
    SlotTable st;
    HashIndex ix;
    GRand *rnd = g_rand_new_with_seed(1);

    slot_table_init(&st);
    index_init(&ix);
    for (uint64_t s = 0; s < n; s++) {
        SlotInfo *si = slot_table_get(&st, s);

        si->hash = (QdHash) { .lo = lo_of(s), .hi = s };
        index_insert(&ix, &st, s);
    }
    g_assert_cmpuint(ix.count, ==, n);
    for (uint64_t s = 0; s < n; s++) {
        g_assert_cmpuint(index_find(&ix, &st, st.info[s].hash), ==, s);
    }
    /* Remove a random half; the rest must stay findable (backward shift). */
    for (uint64_t s = 0; s < n; s++) {
        if (g_rand_boolean(rnd)) {
            index_remove(&ix, &st, s);
            st.info[s].refs = 1;    /* mark removed */
        }
    }
    for (uint64_t s = 0; s < n; s++) {
        uint64_t want = st.info[s].refs ? INDEX_NONE : s;

        g_assert_cmpuint(index_find(&ix, &st, st.info[s].hash), ==, want);
    }
    g_assert_cmpuint(index_find(&ix, &st, (QdHash) { 12345, 99999999 }), ==, INDEX_NONE);
    index_destroy(&ix);
    slot_table_destroy(&st);
    g_rand_free(rnd);
}

static uint64_t spread(uint64_t s)
{
    return hash_n(s).lo;
}

/* Many hashes with the same low bits: long probe runs. */
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
    int ro;

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
    g_assert_false(pool_claim(&p, 2));
    g_assert_true(pool_claim(&p, 500));
    g_assert_cmpuint(pool_alloc_run(&p, 2000), ==, POOL_NO_SLOT);    /* over the max */

    /* The read-only descriptor cannot write. */
    ro = pool_open_readonly(&p, &err);
    g_assert_cmpint(ro, >=, 0);
    g_assert_cmpint(write(ro, "x", 1), <, 0);
    close(ro);

    /* Slots not marked used are punched by the restart sweep. */
    memset(pool_page(&p, 600), 1, QD_PAGE_SIZE);
    g_assert_cmpuint(pool_punch_unused(&p), ==, 1);
    g_assert_cmpuint(pool_page(&p, 600)[0], ==, 0);
    pool_destroy(&p);
}

/*
 * After a restart, slots that held data when the pool was adopted are not
 * handed out again until the sweep: a client that has not restored yet may
 * still map them; nor punched when the clients that restored one let go of
 * it.  (Found by the TCG test: guests read zeros after a broker restart.)
 */
static void test_pool_adopt(void)
{
    g_autoptr(GError) err = NULL;
    Pool p, q;
    int ro;

    g_assert_true(pool_create(&p, 1024, &err));
    g_assert_cmpuint(pool_alloc_run(&p, 10), ==, 0);
    for (uint64_t s = 0; s < 10; s++) {
        memset(pool_page(&p, s), 0x40 + s, QD_PAGE_SIZE);
    }
    ro = pool_open_readonly(&p, &err);
    g_assert_cmpint(ro, >=, 0);
    g_assert_true(pool_adopt(&q, ro, 1024, &err));
    g_assert_cmpuint(q.nused, ==, 0);
    g_assert_cmpuint(pool_alloc_run(&q, 1), ==, 10);     /* not 0..9: held */
    g_assert_cmpuint(pool_alloc_run(&q, 3), ==, 11);
    g_assert_true(pool_claim(&q, 3));                     /* a RESTORE */
    g_assert_cmpuint(pool_page(&q, 3)[0], ==, 0x43);
    /* Its last reference goes before another client restored it: kept. */
    pool_free(&q, 3);
    g_assert_cmpuint(pool_page(&q, 3)[0], ==, 0x43);
    g_assert_cmpuint(pool_alloc_run(&q, 1), ==, 14);
    g_assert_true(pool_claim(&q, 3));                     /* the other client */
    /* The sweep punches the 9 unclaimed ones and frees them for reuse. */
    g_assert_cmpuint(pool_punch_unused(&q), ==, 9);
    g_assert_cmpuint(pool_page(&q, 0)[0], ==, 0);
    g_assert_cmpuint(pool_page(&q, 3)[0], ==, 0x43);
    g_assert_cmpuint(pool_alloc_run(&q, 3), ==, 0);
    g_assert_cmpuint(pool_alloc_run(&q, 1), ==, 4);
    pool_free(&q, 0);                                     /* punched again now */
    g_assert_cmpuint(pool_page(&q, 0)[0], ==, 0);
    pool_destroy(&q);
    close(ro);
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

/* ---- references ------------------------------------------------------------- */

static void sum_refs(uint64_t slot, uint32_t count, void *opaque)
{
    uint64_t *acc = opaque;

    acc[0] += count;
    acc[1] += slot;
}

static void test_refs(void)
{
    ClientRefs r;
    uint64_t acc[2] = { 0 };

    refs_init(&r, 1u << 20);
    refs_add(&r, 5);
    refs_add(&r, 5);
    refs_add(&r, 5);
    refs_add(&r, 100000);
    g_assert_cmpuint(refs_count(&r, 5), ==, 3);
    g_assert_cmpuint(r.distinct, ==, 2);
    g_assert_cmpuint(r.total, ==, 4);
    g_assert_false(refs_remove(&r, 6));
    g_assert_true(refs_remove(&r, 5));
    g_assert_cmpuint(refs_count(&r, 5), ==, 2);
    refs_foreach(&r, sum_refs, acc);
    g_assert_cmpuint(acc[0], ==, 3);
    g_assert_cmpuint(acc[1], ==, 100005);
    g_assert_true(refs_remove(&r, 5));
    g_assert_true(refs_remove(&r, 5));
    g_assert_false(refs_remove(&r, 5));
    g_assert_cmpuint(r.distinct, ==, 1);
    refs_destroy(&r);
}

/* ---- candidates -------------------------------------------------------------- */

static void test_candidates(void)
{
    Candidates c;

    candidates_init(&c);
    g_assert_cmpint(candidates_check(&c, hash_n(1), 1, 100), ==, CAND_NEW);
    g_assert_cmpint(candidates_check(&c, hash_n(1), 1, 100), ==, CAND_SEEN);
    g_assert_cmpint(candidates_check(&c, hash_n(1), 1, 101), ==, CAND_MATCH); /* same VM */
    g_assert_cmpint(candidates_check(&c, hash_n(1), 2, 100), ==, CAND_MATCH); /* other VM */
    for (uint64_t i = 2; i < 5000; i++) {
        g_assert_cmpint(candidates_check(&c, hash_n(i), 1, i), ==, CAND_NEW);
    }
    /* Seen within one rotation: survives (and is carried forward). */
    candidates_rotate(&c);
    g_assert_cmpint(candidates_check(&c, hash_n(3), 1, 3), ==, CAND_SEEN);
    candidates_rotate(&c);
    g_assert_cmpint(candidates_check(&c, hash_n(3), 2, 9), ==, CAND_MATCH);
    /* Not seen for two rotations: gone. */
    g_assert_cmpint(candidates_check(&c, hash_n(4), 2, 9), ==, CAND_NEW);
    candidates_forget(&c, hash_n(3));
    g_assert_cmpint(candidates_check(&c, hash_n(3), 2, 9), ==, CAND_NEW);
    candidates_destroy(&c);
}

/* ---- request logic: reference counting (I2) ------------------------------------ */

typedef struct Fixture {
    BrokerConfig cfg;
    Broker b;
    char *dir;
} Fixture;

static void fixture_setup(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) err = NULL;

    memset(f, 0, sizeof(*f));
    f->dir = g_dir_make_tmp("qdedup-unit-XXXXXX", &err);
    f->cfg.pool_max = 4096;
    f->cfg.open_domains = TRUE;
    f->cfg.restart_grace = 1;
    f->cfg.domains = g_hash_table_new(g_str_hash, g_str_equal);
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

static BrokerClient *join(Fixture *f, const char *domain)
{
    QdHello h = { .version = QD_PROTO_VERSION };
    QdHelloReply reply = { 0 };
    g_autofree char *msg = NULL;
    BrokerClient *c = broker_client_new(&f->b, -1, getpid(), 0, 0);
    int ro;

    g_strlcpy(h.domain, domain, sizeof(h.domain));
    g_assert_cmpint(broker_hello(&f->b, c, &h, -1, NULL, &reply, &ro, &msg), ==, 0);
    close(ro);
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
            memset(pool_page(&f->b.pool, dest[i]), 0, QD_PAGE_SIZE);
            memcpy(pool_page(&f->b.pool, dest[i]), &(uint64_t) { seed + i }, 8);
        }
    }
    broker_publish_commit(&f->b, c, &m, dest, out);
}

static void test_ops_refcounts(Fixture *f, gconstpointer data)
{
    static uint8_t msgbuf[QD_SMALL_MSG_MAX];
    QdResult r[64];
    BrokerClient *a = join(f, "d"), *b = join(f, "d"), *x = join(f, "other");
    uint64_t slots[3];
    QdMessage m;
    size_t len;

    lookup(f, a, 1000, 8, 0, r, msgbuf);
    g_assert_cmpuint(r[0].result, ==, QD_RESULT_MISS);
    publish(f, a, 1000, 8, r, msgbuf);
    g_assert_cmpuint(r[0].result, ==, QD_RESULT_UNWANTED);     /* nobody asked */
    g_assert_cmpuint(f->b.pool.nused, ==, 0);
    lookup(f, b, 1000, 8, 0, r, msgbuf);
    g_assert_cmpuint(r[7].result, ==, QD_RESULT_PUBLISH);
    publish(f, b, 1000, 8, r, msgbuf);
    g_assert_cmpuint(r[7].result, ==, QD_RESULT_STORED);
    g_assert_cmpuint(r[7].slot, ==, r[0].slot + 7);            /* one run */
    lookup(f, a, 1000, 8, 0, r, msgbuf);
    g_assert_cmpuint(r[3].result, ==, QD_RESULT_HIT);
    lookup(f, x, 1000, 8, 0, r + 8, msgbuf);
    g_assert_cmpuint(r[8].result, ==, QD_RESULT_MISS);          /* other domain */
    g_assert_cmpuint(f->b.slots.info[r[3].slot].refs, ==, 2);

    /* UNREF is all or nothing. */
    slots[0] = r[0].slot;
    slots[1] = r[0].slot;       /* a holds it once only */
    len = qd_encode_unref(msgbuf, sizeof(msgbuf), 3, slots, 2);
    g_assert_cmpint(qd_decode(msgbuf, len, &m), ==, 0);
    g_assert_cmpint(broker_unref(&f->b, a, &m), ==, QD_ERR_NOT_HELD);
    g_assert_cmpuint(f->b.slots.info[r[0].slot].refs, ==, 2);
    len = qd_encode_unref(msgbuf, sizeof(msgbuf), 3, slots, 1);
    g_assert_cmpint(qd_decode(msgbuf, len, &m), ==, 0);
    g_assert_cmpint(broker_unref(&f->b, a, &m), ==, 0);
    g_assert_cmpuint(f->b.slots.info[r[0].slot].refs, ==, 1);

    /* A client going away releases exactly what it held; slots die at zero. */
    broker_client_free(&f->b, b);
    g_assert_cmpuint(f->b.pool.nused, ==, 7);                   /* a still holds 7 */
    broker_client_free(&f->b, a);
    g_assert_cmpuint(f->b.pool.nused, ==, 0);
    g_assert_cmpuint(f->b.stats.frees, ==, 8);
    broker_client_free(&f->b, x);
}

int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    g_test_add_func("/broker/index", test_index);
    g_test_add_func("/broker/pool", test_pool);
    g_test_add_func("/broker/pool-adopt", test_pool_adopt);
    g_test_add_func("/broker/pool-full", test_pool_full);
    g_test_add_func("/broker/refs", test_refs);
    g_test_add_func("/broker/candidates", test_candidates);
    g_test_add("/broker/ops-refcounts", Fixture, NULL, fixture_setup, test_ops_refcounts,
               fixture_teardown);
    return g_test_run();
}

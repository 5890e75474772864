/* SPDX-License-Identifier: GPL-2.0-or-later */
/* Protocol codec: round trips of every message, rejection of every malformed kind. */
#include <glib.h>
#include <string.h>

#include "qdedup/protocol.h"

static uint8_t buf[QD_MSG_MAX];

static QdHash hash_n(uint64_t n)
{
    return (QdHash) { .lo = n * 0x9e3779b97f4a7c15ull, .hi = ~n };
}

static size_t sample_hello(uint8_t *b, size_t size)
{
    QdHello h = { .version = QD_PROTO_VERSION, .flags = QD_HELLO_RECONNECT, .pid = 4242,
                  .secret_len = 3, .pool_dev = 7, .pool_ino = 99, .pool_fd = 7 };

    memset(h.uuid, 0xab, sizeof(h.uuid));
    strcpy(h.name, "vm-one");
    strcpy(h.domain, "tenant-a");
    memcpy(h.secret, "abc", 3);
    return qd_encode_hello(b, size, 17, &h);
}

static void test_hello(void)
{
    size_t len = sample_hello(buf, sizeof(buf));
    QdMessage m;

    g_assert_cmpuint(len, >, QD_HEADER_SIZE);
    g_assert_cmpint(qd_decode(buf, len, &m), ==, QD_DECODE_OK);
    g_assert_cmpuint(m.hdr.type, ==, QD_MSG_HELLO);
    g_assert_cmpuint(m.hdr.seq, ==, 17);
    g_assert_cmpuint(m.u.hello.pid, ==, 4242);
    g_assert_cmpuint(m.u.hello.flags, ==, QD_HELLO_RECONNECT);
    g_assert_cmpstr(m.u.hello.name, ==, "vm-one");
    g_assert_cmpstr(m.u.hello.domain, ==, "tenant-a");
    g_assert_cmpuint(m.u.hello.secret_len, ==, 3);
    g_assert_cmpmem(m.u.hello.secret, 3, "abc", 3);
    g_assert_cmpuint(m.u.hello.uuid[15], ==, 0xab);
    g_assert_cmpuint(m.u.hello.pool_ino, ==, 99);
    g_assert_cmpuint(m.u.hello.pool_fd, ==, 7);
}

static void test_hello_reply(void)
{
    QdHelloReply r = { .version = 1, .flags = QD_REPLY_ADOPTED, .client_id = 5,
                       .page_size = 4096, .max_lookup = QD_MAX_LOOKUP,
                       .max_publish = QD_MAX_PUBLISH, .pool_slots = 1u << 22,
                       .client_quota = 10, .domain_quota = 20, .pool_dev = 3, .pool_ino = 4 };
    size_t len = qd_encode_hello_reply(buf, sizeof(buf), 9, &r);
    QdMessage m;

    g_assert_cmpint(qd_decode(buf, len, &m), ==, QD_DECODE_OK);
    g_assert_cmpmem(&m.u.hello_reply, sizeof(r), &r, sizeof(r));
}

static void test_arrays(void)
{
    QdLookupEntry e[QD_MAX_LOOKUP], got;
    QdResult r[QD_MAX_LOOKUP], rg;
    QdRestoreEntry re[QD_MAX_RESTORE], reg;
    uint64_t slots[QD_MAX_UNREF];
    QdMessage m;
    size_t len;

    for (uint32_t i = 0; i < QD_MAX_LOOKUP; i++) {
        e[i] = (QdLookupEntry) { .hash = hash_n(i), .cookie = i * 4096 };
        r[i] = (QdResult) { .result = i % (QD_RESULT_MAX + 1), .slot = i * 3 };
        re[i] = (QdRestoreEntry) { .slot = i + 1, .hash = hash_n(i + 5) };
        slots[i] = i * 7;
    }
    len = qd_encode_lookup(buf, sizeof(buf), 1, e, QD_MAX_LOOKUP);
    g_assert_cmpint(qd_decode(buf, len, &m), ==, QD_DECODE_OK);
    g_assert_cmpuint(m.u.array.count, ==, QD_MAX_LOOKUP);
    qd_lookup_entry_at(&m, 1000, &got);
    g_assert_true(qd_hash_equal(got.hash, e[1000].hash) && got.cookie == e[1000].cookie);

    len = qd_encode_results(buf, sizeof(buf), QD_MSG_LOOKUP_REPLY, 2, r, QD_MAX_LOOKUP);
    g_assert_cmpint(qd_decode(buf, len, &m), ==, QD_DECODE_OK);
    qd_result_at(&m, 777, &rg);
    g_assert_cmpuint(rg.result, ==, r[777].result);
    g_assert_cmpuint(rg.slot, ==, r[777].slot);

    len = qd_encode_restore(buf, sizeof(buf), 3, re, QD_MAX_RESTORE);
    g_assert_cmpint(qd_decode(buf, len, &m), ==, QD_DECODE_OK);
    qd_restore_entry_at(&m, 5, &reg);
    g_assert_true(reg.slot == re[5].slot && qd_hash_equal(reg.hash, re[5].hash));

    len = qd_encode_unref(buf, sizeof(buf), 4, slots, QD_MAX_UNREF);
    g_assert_cmpint(qd_decode(buf, len, &m), ==, QD_DECODE_OK);
    g_assert_cmpuint(qd_unref_slot_at(&m, 9), ==, 63);

    len = qd_encode_ok(buf, sizeof(buf), 5, 12);
    g_assert_cmpint(qd_decode(buf, len, &m), ==, QD_DECODE_OK);
    g_assert_cmpuint(m.u.ok_count, ==, 12);

    len = qd_encode_error(buf, sizeof(buf), 6, QD_ERR_DENIED, "no\nway");
    g_assert_cmpint(qd_decode(buf, len, &m), ==, QD_DECODE_OK);
    g_assert_cmpuint(m.u.error.code, ==, QD_ERR_DENIED);
    g_assert_cmpstr(m.u.error.message, ==, "no?way");     /* made printable */

    /* Over the limits: the encoder refuses. */
    g_assert_cmpuint(qd_encode_lookup(buf, sizeof(buf), 1, e, QD_MAX_LOOKUP + 1), ==, 0);
    g_assert_cmpuint(qd_encode_unref(buf, sizeof(buf), 1, slots, QD_MAX_UNREF + 1), ==, 0);
    g_assert_cmpuint(qd_encode_lookup(buf, 100, 1, e, 10), ==, 0);     /* buffer too small */
}

static void test_publish(void)
{
    QdLookupEntry e[QD_MAX_PUBLISH];
    QdMessage m;
    size_t meta;

    for (uint32_t i = 0; i < QD_MAX_PUBLISH; i++) {
        e[i] = (QdLookupEntry) { .hash = hash_n(i), .cookie = i };
    }
    meta = qd_encode_publish_meta(buf, sizeof(buf), 8, e, QD_MAX_PUBLISH);
    g_assert_cmpuint(meta, ==, QD_PUBLISH_META_SIZE(QD_MAX_PUBLISH));
    memset(buf + meta, 0x33, QD_MAX_PUBLISH * QD_PAGE_SIZE);
    /* Whole packet, as a client sees it ... */
    g_assert_cmpint(qd_decode(buf, QD_PUBLISH_SIZE(QD_MAX_PUBLISH), &m), ==, QD_DECODE_OK);
    g_assert_cmpuint(m.u.array.pages[5 * QD_PAGE_SIZE], ==, 0x33);
    /* ... and the metadata alone, as the broker peeks it. */
    g_assert_cmpint(qd_decode_publish_meta(buf, meta, QD_PUBLISH_SIZE(QD_MAX_PUBLISH), &m),
                    ==, QD_DECODE_OK);
    g_assert_cmpint(qd_decode_publish_meta(buf, meta, QD_PUBLISH_SIZE(QD_MAX_PUBLISH) - 1, &m),
                    ==, QD_DECODE_LENGTH);
    g_assert_cmpint(qd_decode(buf, QD_PUBLISH_SIZE(QD_MAX_PUBLISH) - 1, &m), !=, QD_DECODE_OK);
}

/* Every strict prefix of a valid message is rejected. */
static void test_truncated(void)
{
    size_t len = sample_hello(buf, sizeof(buf));
    QdMessage m;

    for (size_t n = 0; n < len; n++) {
        g_assert_cmpint(qd_decode(buf, n, &m), !=, QD_DECODE_OK);
    }
}

static void set32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) {
        p[i] = v >> (8 * i);
    }
}

static void test_malformed(void)
{
    QdLookupEntry e[4] = { { hash_n(1), 1 } };
    QdResult r[2] = { { QD_RESULT_HIT, 3 } };
    uint8_t copy[QD_SMALL_MSG_MAX + 64];
    QdMessage m;
    size_t len, hl;

#define REJECT(expect) g_assert_cmpint(qd_decode(copy, len, &m), ==, (expect))
#define FRESH(n) (len = (n), memcpy(copy, buf, len))

    hl = sample_hello(buf, sizeof(buf));
    FRESH(hl);
    copy[0] ^= 1;
    REJECT(QD_DECODE_MAGIC);
    FRESH(hl);
    copy[4] = 0;                                    /* type 0 */
    REJECT(QD_DECODE_TYPE);
    FRESH(hl);
    copy[4] = QD_MSG_TYPE_MAX + 1;
    REJECT(QD_DECODE_TYPE);
    FRESH(hl);
    copy[6] = 1;                                    /* header flags */
    REJECT(QD_DECODE_VALUE);
    FRESH(hl);
    set32(copy + 12, hl + 1);                      /* says longer than the packet */
    REJECT(QD_DECODE_SHORT);
    FRESH(hl);
    set32(copy + 12, hl - 1);                      /* says shorter */
    REJECT(QD_DECODE_LENGTH);
    FRESH(hl);
    set32(copy + 12, 8);                            /* shorter than a header */
    REJECT(QD_DECODE_LENGTH);
    FRESH(hl + 1);                                  /* a trailing byte */
    copy[hl] = 0;
    set32(copy + 12, hl + 1);
    REJECT(QD_DECODE_LENGTH);
    FRESH(hl);
    set32(copy + QD_HEADER_SIZE + 4, 0x80);         /* unknown HELLO flag */
    REJECT(QD_DECODE_VALUE);
    FRESH(hl);
    copy[QD_HEADER_SIZE + 28] = QD_NAME_MAX + 1;    /* name length over the limit */
    REJECT(QD_DECODE_STRING);
    FRESH(hl);
    copy[QD_HEADER_SIZE + 30] = 0x01;               /* control character in the name */
    REJECT(QD_DECODE_STRING);

    len = qd_encode_lookup(buf, sizeof(buf), 1, e, 4);
    FRESH(len);
    set32(copy + QD_HEADER_SIZE, QD_MAX_LOOKUP + 1);  /* count over the limit */
    REJECT(QD_DECODE_COUNT);
    FRESH(len);
    set32(copy + QD_HEADER_SIZE, 5);                /* count past the end */
    REJECT(QD_DECODE_LENGTH);
    FRESH(len);
    set32(copy + QD_HEADER_SIZE, 3);                /* count short of the end */
    REJECT(QD_DECODE_LENGTH);

    len = qd_encode_results(buf, sizeof(buf), QD_MSG_LOOKUP_REPLY, 1, r, 2);
    FRESH(len);
    set32(copy + QD_HEADER_SIZE + 4, QD_RESULT_MAX + 1);   /* unknown result */
    REJECT(QD_DECODE_VALUE);
    FRESH(len);
    set32(copy + QD_HEADER_SIZE + 8, 1);            /* reserved field */
    REJECT(QD_DECODE_VALUE);

    len = qd_encode_error(buf, sizeof(buf), 1, QD_ERR_STATE, "x");
    FRESH(len);
    set32(copy + QD_HEADER_SIZE, 0);                /* error code 0 */
    REJECT(QD_DECODE_VALUE);
    FRESH(len);
    set32(copy + QD_HEADER_SIZE, QD_ERR_MAX + 1);
    REJECT(QD_DECODE_VALUE);

    /* Over the size of any non-PUBLISH message. */
    memset(copy, 0, sizeof(copy));
    len = qd_encode_ok(buf, sizeof(buf), 1, 1);
    memcpy(copy, buf, len);
    len = QD_SMALL_MSG_MAX + 8;
    set32(copy + 12, len);
    REJECT(QD_DECODE_LENGTH);

    /* The encoder refuses what the decoder would refuse. */
    g_assert_cmpuint(qd_encode_error(buf, sizeof(buf), 1, 0, "x"), ==, 0);
    g_assert_cmpuint(qd_encode_results(buf, sizeof(buf), QD_MSG_OK, 1, r, 1), ==, 0);
#undef REJECT
#undef FRESH
}

static void test_hash(void)
{
    static uint8_t page[QD_PAGE_SIZE], other[QD_PAGE_SIZE];

    memset(page, 7, sizeof(page));
    memcpy(other, page, sizeof(page));
    g_assert_true(qd_hash_equal(qd_hash_page(page), qd_hash_page(other)));
    other[4095] ^= 1;
    g_assert_false(qd_hash_equal(qd_hash_page(page), qd_hash_page(other)));
    g_test_message("hash variant: %s", qd_hash_variant());
}

int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    g_test_add_func("/protocol/hello", test_hello);
    g_test_add_func("/protocol/hello-reply", test_hello_reply);
    g_test_add_func("/protocol/arrays", test_arrays);
    g_test_add_func("/protocol/publish", test_publish);
    g_test_add_func("/protocol/truncated", test_truncated);
    g_test_add_func("/protocol/malformed", test_malformed);
    g_test_add_func("/protocol/hash", test_hash);
    return g_test_run();
}

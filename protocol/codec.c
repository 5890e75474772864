/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Encoder and decoder of the qdedup wire protocol (include/qdedup/protocol.h).
 *
 * The decoder is the broker's first line of defence against a hostile
 * client: it reads nothing it has not bounds-checked against the packet, and
 * it rejects anything the encoder could not have produced (unknown types,
 * counts over the limits, reserved fields that are not zero, strings that
 * are too long or not printable).  It is fuzzed (tests/fuzz/).
 */
#include <endian.h>
#include <string.h>

#include "qdedup/protocol.h"

/*
 * ---- little-endian primitives ------------------------------------------
 * memcpy and htole/letoh: one unaligned load or store each on x86, where a
 * loop over bytes cost the broker a sixth of its time per lookup.
 */

static void put16(uint8_t *p, uint16_t v)
{
    v = htole16(v);
    memcpy(p, &v, sizeof(v));
}

static void put32(uint8_t *p, uint32_t v)
{
    v = htole32(v);
    memcpy(p, &v, sizeof(v));
}

static void put64(uint8_t *p, uint64_t v)
{
    v = htole64(v);
    memcpy(p, &v, sizeof(v));
}

static uint16_t get16(const uint8_t *p)
{
    uint16_t v;

    memcpy(&v, p, sizeof(v));
    return le16toh(v);
}

static uint32_t get32(const uint8_t *p)
{
    uint32_t v;

    memcpy(&v, p, sizeof(v));
    return le32toh(v);
}

static uint64_t get64(const uint8_t *p)
{
    uint64_t v;

    memcpy(&v, p, sizeof(v));
    return le64toh(v);
}

/* ---- writer ------------------------------------------------------------- */

typedef struct Writer {
    uint8_t *buf;
    size_t size, len;
    bool overflow;
} Writer;

static uint8_t *reserve(Writer *w, size_t n)
{
    uint8_t *p;

    if (w->overflow || n > w->size - w->len) {
        w->overflow = true;
        return NULL;
    }
    p = w->buf + w->len;
    w->len += n;
    return p;
}

static void w32(Writer *w, uint32_t v)
{
    uint8_t *p = reserve(w, 4);

    if (p) {
        put32(p, v);
    }
}

static void w64(Writer *w, uint64_t v)
{
    uint8_t *p = reserve(w, 8);

    if (p) {
        put64(p, v);
    }
}

static void wbytes(Writer *w, const void *data, size_t n)
{
    uint8_t *p = reserve(w, n);

    if (p && n) {
        memcpy(p, data, n);
    }
}

static void wstr(Writer *w, const char *s, size_t max)
{
    size_t n = strnlen(s, max + 1);
    uint8_t *p;

    if (n > max) {
        w->overflow = true;
        return;
    }
    p = reserve(w, 2);
    if (p) {
        put16(p, n);
        wbytes(w, s, n);
    }
}

static void whash(Writer *w, QdHash h)
{
    w64(w, h.lo);
    w64(w, h.hi);
}

static Writer begin(uint8_t *buf, size_t size, uint32_t type, uint32_t seq)
{
    Writer w = { .buf = buf, .size = size };
    uint8_t *p = reserve(&w, QD_HEADER_SIZE);

    if (p) {
        put32(p, QD_PROTO_MAGIC);
        put16(p + 4, type);
        put16(p + 6, 0);
        put32(p + 8, seq);
        put32(p + 12, 0);
    }
    return w;
}

/* Patch the length; extra is appended later by the sender (PUBLISH pages). */
static size_t finish(Writer *w, size_t extra)
{
    if (w->overflow || w->len + extra > UINT32_MAX) {
        return 0;
    }
    put32(w->buf + 12, w->len + extra);
    return w->len;
}

/* ---- encoders ------------------------------------------------------------ */

size_t qd_encode_hello(uint8_t *buf, size_t size, uint32_t seq, const QdHello *h)
{
    Writer w = begin(buf, size, QD_MSG_HELLO, seq);

    if ((h->flags & ~QD_HELLO_FLAGS) || h->secret_len > QD_SECRET_MAX) {
        return 0;
    }
    w32(&w, h->version);
    w32(&w, h->flags);
    w32(&w, h->pid);
    wbytes(&w, h->uuid, sizeof(h->uuid));
    wstr(&w, h->name, QD_NAME_MAX);
    wstr(&w, h->domain, QD_NAME_MAX);
    {
        uint8_t *p = reserve(&w, 2);

        if (p) {
            put16(p, h->secret_len);
            wbytes(&w, h->secret, h->secret_len);
        }
    }
    w64(&w, h->pool_dev);
    w64(&w, h->pool_ino);
    w32(&w, h->pool_fd);
    return finish(&w, 0);
}

size_t qd_encode_hello_reply(uint8_t *buf, size_t size, uint32_t seq,
                             const QdHelloReply *r)
{
    Writer w = begin(buf, size, QD_MSG_HELLO_REPLY, seq);

    if (r->flags & ~QD_REPLY_FLAGS) {
        return 0;
    }
    w32(&w, r->version);
    w32(&w, r->flags);
    w32(&w, r->client_id);
    w32(&w, r->page_size);
    w32(&w, r->max_lookup);
    w32(&w, r->max_publish);
    w64(&w, r->pool_slots);
    w64(&w, r->client_quota);
    w64(&w, r->domain_quota);
    w64(&w, r->pool_dev);
    w64(&w, r->pool_ino);
    return finish(&w, 0);
}

static size_t encode_lookup_entries(Writer *w, uint32_t type, const QdLookupEntry *e,
                                    uint32_t count)
{
    if (count > qd_max_count(type)) {
        return 0;
    }
    w32(w, count);
    for (uint32_t i = 0; i < count; i++) {
        whash(w, e[i].hash);
        w64(w, e[i].cookie);
    }
    return finish(w, type == QD_MSG_PUBLISH ? (size_t)count * QD_PAGE_SIZE : 0);
}

size_t qd_encode_lookup(uint8_t *buf, size_t size, uint32_t seq,
                        const QdLookupEntry *e, uint32_t count)
{
    Writer w = begin(buf, size, QD_MSG_LOOKUP, seq);

    return encode_lookup_entries(&w, QD_MSG_LOOKUP, e, count);
}

size_t qd_encode_publish_meta(uint8_t *buf, size_t size, uint32_t seq,
                              const QdLookupEntry *e, uint32_t count)
{
    Writer w = begin(buf, size, QD_MSG_PUBLISH, seq);

    return encode_lookup_entries(&w, QD_MSG_PUBLISH, e, count);
}

size_t qd_encode_results(uint8_t *buf, size_t size, uint32_t type, uint32_t seq,
                         const QdResult *r, uint32_t count)
{
    Writer w = begin(buf, size, type, seq);

    if (type != QD_MSG_LOOKUP_REPLY && type != QD_MSG_PUBLISH_REPLY &&
        type != QD_MSG_RESTORE_REPLY) {
        return 0;
    }
    if (count > qd_max_count(type)) {
        return 0;
    }
    w32(&w, count);
    for (uint32_t i = 0; i < count; i++) {
        if (r[i].result > QD_RESULT_MAX) {
            return 0;
        }
        w32(&w, r[i].result);
        w32(&w, 0);
        w64(&w, r[i].slot);
    }
    return finish(&w, 0);
}

size_t qd_encode_unref(uint8_t *buf, size_t size, uint32_t seq,
                       const uint64_t *slots, uint32_t count)
{
    Writer w = begin(buf, size, QD_MSG_UNREF, seq);

    if (count > QD_MAX_UNREF) {
        return 0;
    }
    w32(&w, count);
    for (uint32_t i = 0; i < count; i++) {
        w64(&w, slots[i]);
    }
    return finish(&w, 0);
}

size_t qd_encode_restore(uint8_t *buf, size_t size, uint32_t seq,
                         const QdRestoreEntry *e, uint32_t count)
{
    Writer w = begin(buf, size, QD_MSG_RESTORE, seq);

    if (count > QD_MAX_RESTORE) {
        return 0;
    }
    w32(&w, count);
    for (uint32_t i = 0; i < count; i++) {
        w64(&w, e[i].slot);
        whash(&w, e[i].hash);
    }
    return finish(&w, 0);
}

size_t qd_encode_ok(uint8_t *buf, size_t size, uint32_t seq, uint32_t count)
{
    Writer w = begin(buf, size, QD_MSG_OK, seq);

    w32(&w, count);
    return finish(&w, 0);
}

size_t qd_encode_error(uint8_t *buf, size_t size, uint32_t seq, uint32_t code,
                       const char *message)
{
    Writer w = begin(buf, size, QD_MSG_ERROR, seq);
    char msg[QD_ERRMSG_MAX + 1];
    size_t n = 0;

    if (code == 0 || code > QD_ERR_MAX) {
        return 0;
    }
    /* Keep what the decoder accepts: printable, and cut to the limit. */
    for (const char *s = message; s && *s && n < QD_ERRMSG_MAX; s++) {
        msg[n++] = (*s >= 0x20 && *s < 0x7f) ? *s : '?';
    }
    msg[n] = 0;
    w32(&w, code);
    wstr(&w, msg, QD_ERRMSG_MAX);
    return finish(&w, 0);
}

/* ---- decoder ------------------------------------------------------------- */

typedef struct Reader {
    const uint8_t *p;
    size_t left;
    int err;
} Reader;

static const uint8_t *take(Reader *r, size_t n)
{
    const uint8_t *p = r->p;

    if (r->err || n > r->left) {
        if (!r->err) {
            r->err = QD_DECODE_LENGTH;
        }
        return NULL;
    }
    r->p += n;
    r->left -= n;
    return p;
}

static uint32_t r32(Reader *r)
{
    const uint8_t *p = take(r, 4);

    return p ? get32(p) : 0;
}

static uint64_t r64(Reader *r)
{
    const uint8_t *p = take(r, 8);

    return p ? get64(p) : 0;
}

/* A printable ASCII string of at most max bytes, NUL-terminated into out. */
static void rstr(Reader *r, char *out, size_t max)
{
    const uint8_t *p = take(r, 2);
    size_t n;

    out[0] = 0;
    if (!p) {
        return;
    }
    n = get16(p);
    if (n > max) {
        r->err = QD_DECODE_STRING;
        return;
    }
    p = take(r, n);
    if (!p) {
        return;
    }
    for (size_t i = 0; i < n; i++) {
        if (p[i] < 0x20 || p[i] >= 0x7f) {
            r->err = QD_DECODE_STRING;
            return;
        }
    }
    memcpy(out, p, n);
    out[n] = 0;
}

uint32_t qd_max_count(uint32_t type)
{
    switch (type) {
    case QD_MSG_LOOKUP:
    case QD_MSG_LOOKUP_REPLY:
        return QD_MAX_LOOKUP;
    case QD_MSG_PUBLISH:
    case QD_MSG_PUBLISH_REPLY:
        return QD_MAX_PUBLISH;
    case QD_MSG_UNREF:
        return QD_MAX_UNREF;
    case QD_MSG_RESTORE:
    case QD_MSG_RESTORE_REPLY:
        return QD_MAX_RESTORE;
    default:
        return 0;
    }
}

static size_t entry_size(uint32_t type)
{
    switch (type) {
    case QD_MSG_LOOKUP:
    case QD_MSG_PUBLISH:
        return QD_LOOKUP_ENTRY_SIZE;
    case QD_MSG_LOOKUP_REPLY:
    case QD_MSG_PUBLISH_REPLY:
    case QD_MSG_RESTORE_REPLY:
        return QD_RESULT_ENTRY_SIZE;
    case QD_MSG_UNREF:
        return QD_UNREF_ENTRY_SIZE;
    case QD_MSG_RESTORE:
        return QD_RESTORE_ENTRY_SIZE;
    default:
        return 0;
    }
}

static int decode_header(const uint8_t *buf, size_t len, QdHeader *h)
{
    if (len < QD_HEADER_SIZE) {
        return QD_DECODE_SHORT;
    }
    h->magic = get32(buf);
    h->type = get16(buf + 4);
    h->flags = get16(buf + 6);
    h->seq = get32(buf + 8);
    h->len = get32(buf + 12);
    if (h->magic != QD_PROTO_MAGIC) {
        return QD_DECODE_MAGIC;
    }
    if (h->type < QD_MSG_HELLO || h->type > QD_MSG_TYPE_MAX) {
        return QD_DECODE_TYPE;
    }
    if (h->flags != 0) {
        return QD_DECODE_VALUE;
    }
    if (h->len < QD_HEADER_SIZE || h->len > QD_MSG_MAX) {
        return QD_DECODE_LENGTH;
    }
    return QD_DECODE_OK;
}

/* count + entries of an array message; pages follow for PUBLISH. */
static void decode_array(Reader *r, QdMessage *m, size_t pages_len_expected)
{
    uint32_t type = m->hdr.type;
    uint32_t count = r32(r);
    size_t esize = entry_size(type);

    if (r->err) {
        return;
    }
    if (count > qd_max_count(type)) {
        r->err = QD_DECODE_COUNT;
        return;
    }
    m->u.array.count = count;
    m->u.array.entries = take(r, (size_t)count * esize);
    m->u.array.pages = NULL;
    if (r->err) {
        return;
    }
    if (type == QD_MSG_PUBLISH && pages_len_expected) {
        m->u.array.pages = take(r, (size_t)count * QD_PAGE_SIZE);
    }
    if (r->err) {
        return;
    }
    /* Reply entries: result codes known, reserved zero. */
    if (esize == QD_RESULT_ENTRY_SIZE) {
        for (uint32_t i = 0; i < count; i++) {
            const uint8_t *e = m->u.array.entries + (size_t)i * esize;

            if (get32(e) > QD_RESULT_MAX || get32(e + 4) != 0) {
                r->err = QD_DECODE_VALUE;
                return;
            }
        }
    }
}

static void decode_body(Reader *r, QdMessage *m)
{
    switch (m->hdr.type) {
    case QD_MSG_HELLO: {
        QdHello *h = &m->u.hello;
        const uint8_t *p;

        h->version = r32(r);
        h->flags = r32(r);
        h->pid = r32(r);
        p = take(r, sizeof(h->uuid));
        if (p) {
            memcpy(h->uuid, p, sizeof(h->uuid));
        }
        rstr(r, h->name, QD_NAME_MAX);
        rstr(r, h->domain, QD_NAME_MAX);
        p = take(r, 2);
        if (p) {
            h->secret_len = get16(p);
            if (h->secret_len > QD_SECRET_MAX) {
                r->err = QD_DECODE_STRING;
                return;
            }
            p = take(r, h->secret_len);
            if (p) {
                memcpy(h->secret, p, h->secret_len);
            }
        }
        h->pool_dev = r64(r);
        h->pool_ino = r64(r);
        h->pool_fd = r32(r);
        if (!r->err && (h->flags & ~QD_HELLO_FLAGS)) {
            r->err = QD_DECODE_VALUE;
        }
        break;
    }
    case QD_MSG_HELLO_REPLY: {
        QdHelloReply *h = &m->u.hello_reply;

        h->version = r32(r);
        h->flags = r32(r);
        h->client_id = r32(r);
        h->page_size = r32(r);
        h->max_lookup = r32(r);
        h->max_publish = r32(r);
        h->pool_slots = r64(r);
        h->client_quota = r64(r);
        h->domain_quota = r64(r);
        h->pool_dev = r64(r);
        h->pool_ino = r64(r);
        if (!r->err && (h->flags & ~QD_REPLY_FLAGS)) {
            r->err = QD_DECODE_VALUE;
        }
        break;
    }
    case QD_MSG_OK:
        m->u.ok_count = r32(r);
        break;
    case QD_MSG_ERROR:
        m->u.error.code = r32(r);
        rstr(r, m->u.error.message, QD_ERRMSG_MAX);
        if (!r->err && (m->u.error.code == 0 || m->u.error.code > QD_ERR_MAX)) {
            r->err = QD_DECODE_VALUE;
        }
        break;
    default:
        decode_array(r, m, 1);
        break;
    }
}

int qd_decode(const uint8_t *buf, size_t len, QdMessage *m)
{
    Reader r;
    int err;

    memset(m, 0, sizeof(*m));
    err = decode_header(buf, len, &m->hdr);
    if (err) {
        return err;
    }
    if (m->hdr.len != len) {
        return m->hdr.len > len ? QD_DECODE_SHORT : QD_DECODE_LENGTH;
    }
    if (m->hdr.type != QD_MSG_PUBLISH && len > QD_SMALL_MSG_MAX) {
        return QD_DECODE_LENGTH;
    }
    r = (Reader) { .p = buf + QD_HEADER_SIZE, .left = len - QD_HEADER_SIZE };
    decode_body(&r, m);
    if (r.err) {
        return r.err;
    }
    return r.left ? QD_DECODE_LENGTH : QD_DECODE_OK;    /* no trailing bytes */
}

int qd_decode_publish_meta(const uint8_t *buf, size_t meta_len, size_t total_len,
                           QdMessage *m)
{
    Reader r;
    int err;

    memset(m, 0, sizeof(*m));
    err = decode_header(buf, meta_len, &m->hdr);
    if (err) {
        return err;
    }
    if (m->hdr.type != QD_MSG_PUBLISH) {
        return QD_DECODE_TYPE;
    }
    if (m->hdr.len != total_len) {
        return QD_DECODE_LENGTH;
    }
    r = (Reader) { .p = buf + QD_HEADER_SIZE, .left = meta_len - QD_HEADER_SIZE };
    decode_array(&r, m, 0);
    if (r.err) {
        return r.err;
    }
    if (total_len != QD_PUBLISH_SIZE((size_t)m->u.array.count)) {
        return QD_DECODE_LENGTH;
    }
    return QD_DECODE_OK;
}

/* ---- accessors ------------------------------------------------------------ */

static QdHash get_hash(const uint8_t *p)
{
    return (QdHash) { .lo = get64(p), .hi = get64(p + 8) };
}

void qd_lookup_entry_at(const QdMessage *m, uint32_t i, QdLookupEntry *e)
{
    const uint8_t *p = m->u.array.entries + (size_t)i * QD_LOOKUP_ENTRY_SIZE;

    e->hash = get_hash(p);
    e->cookie = get64(p + 16);
}

void qd_result_at(const QdMessage *m, uint32_t i, QdResult *res)
{
    const uint8_t *p = m->u.array.entries + (size_t)i * QD_RESULT_ENTRY_SIZE;

    res->result = get32(p);
    res->slot = get64(p + 8);
}

void qd_restore_entry_at(const QdMessage *m, uint32_t i, QdRestoreEntry *e)
{
    const uint8_t *p = m->u.array.entries + (size_t)i * QD_RESTORE_ENTRY_SIZE;

    e->slot = get64(p);
    e->hash = get_hash(p + 8);
}

uint64_t qd_unref_slot_at(const QdMessage *m, uint32_t i)
{
    return get64(m->u.array.entries + (size_t)i * QD_UNREF_ENTRY_SIZE);
}

/* ---- names ------------------------------------------------------------------ */

#define NAME(table, i) \
    ((i) < sizeof(table) / sizeof(table[0]) && table[i] ? table[i] : "unknown")

const char *qd_msg_type_name(uint32_t type)
{
    static const char *const names[] = {
        [QD_MSG_HELLO] = "HELLO", [QD_MSG_HELLO_REPLY] = "HELLO_REPLY",
        [QD_MSG_LOOKUP] = "LOOKUP", [QD_MSG_LOOKUP_REPLY] = "LOOKUP_REPLY",
        [QD_MSG_PUBLISH] = "PUBLISH", [QD_MSG_PUBLISH_REPLY] = "PUBLISH_REPLY",
        [QD_MSG_UNREF] = "UNREF", [QD_MSG_RESTORE] = "RESTORE",
        [QD_MSG_RESTORE_REPLY] = "RESTORE_REPLY", [QD_MSG_OK] = "OK",
        [QD_MSG_ERROR] = "ERROR",
    };
    return NAME(names, type);
}

const char *qd_result_name(uint32_t result)
{
    static const char *const names[] = {
        [QD_RESULT_MISS] = "miss", [QD_RESULT_HIT] = "hit",
        [QD_RESULT_PUBLISH] = "publish", [QD_RESULT_STORED] = "stored",
        [QD_RESULT_MISMATCH] = "mismatch", [QD_RESULT_QUOTA] = "quota",
        [QD_RESULT_FULL] = "full", [QD_RESULT_UNWANTED] = "unwanted",
        [QD_RESULT_REFUSED] = "refused",
    };
    return NAME(names, result);
}

const char *qd_error_name(uint32_t code)
{
    static const char *const names[] = {
        [QD_ERR_PROTOCOL] = "protocol", [QD_ERR_VERSION] = "version",
        [QD_ERR_DENIED] = "denied", [QD_ERR_STATE] = "state",
        [QD_ERR_NOT_HELD] = "not-held", [QD_ERR_RETRY] = "retry",
        [QD_ERR_POOL_CHANGED] = "pool-changed", [QD_ERR_INTERNAL] = "internal",
    };
    return NAME(names, code);
}

const char *qd_decode_strerror(int err)
{
    switch (err) {
    case QD_DECODE_OK:
        return "ok";
    case QD_DECODE_SHORT:
        return "message truncated";
    case QD_DECODE_MAGIC:
        return "bad magic";
    case QD_DECODE_TYPE:
        return "unknown message type";
    case QD_DECODE_LENGTH:
        return "length mismatch";
    case QD_DECODE_COUNT:
        return "count over the limit";
    case QD_DECODE_STRING:
        return "bad string";
    case QD_DECODE_VALUE:
        return "field out of range";
    default:
        return "unknown decode error";
    }
}

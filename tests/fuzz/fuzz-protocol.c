/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * libFuzzer target for the protocol decoder (protocol/codec.c).
 *
 * Beyond "no crash, no out-of-bounds read" (ASan, UBSan), it checks that
 * decoding is the exact inverse of encoding: whatever the decoder accepts
 * must re-encode to the very same bytes, so no malformed variant can slip
 * through with a different meaning.  See docs/protocol.md for how to run
 * it longer than make check does.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "qdedup/protocol.h"

static uint8_t out[QD_MSG_MAX];

static size_t reencode(const QdMessage *m)
{
    uint32_t n = m->u.array.count;

    switch (m->hdr.type) {
    case QD_MSG_HELLO:
        return qd_encode_hello(out, sizeof(out), m->hdr.seq, &m->u.hello);
    case QD_MSG_HELLO_REPLY:
        return qd_encode_hello_reply(out, sizeof(out), m->hdr.seq, &m->u.hello_reply);
    case QD_MSG_OK:
        return qd_encode_ok(out, sizeof(out), m->hdr.seq, m->u.ok_count);
    case QD_MSG_ERROR:
        return qd_encode_error(out, sizeof(out), m->hdr.seq, m->u.error.code,
                               m->u.error.message);
    case QD_MSG_LOOKUP:
    case QD_MSG_PUBLISH: {
        static QdLookupEntry e[QD_MAX_LOOKUP];
        size_t len;

        for (uint32_t i = 0; i < n; i++) {
            qd_lookup_entry_at(m, i, &e[i]);
        }
        if (m->hdr.type == QD_MSG_LOOKUP) {
            return qd_encode_lookup(out, sizeof(out), m->hdr.seq, e, n);
        }
        len = qd_encode_publish_meta(out, sizeof(out), m->hdr.seq, e, n);
        memcpy(out + len, m->u.array.pages, (size_t)n * QD_PAGE_SIZE);
        return len + (size_t)n * QD_PAGE_SIZE;
    }
    case QD_MSG_LOOKUP_REPLY:
    case QD_MSG_PUBLISH_REPLY:
    case QD_MSG_RESTORE_REPLY: {
        static QdResult r[QD_MAX_LOOKUP];

        for (uint32_t i = 0; i < n; i++) {
            qd_result_at(m, i, &r[i]);
        }
        return qd_encode_results(out, sizeof(out), m->hdr.type, m->hdr.seq, r, n);
    }
    case QD_MSG_UNREF: {
        static uint64_t s[QD_MAX_UNREF];

        for (uint32_t i = 0; i < n; i++) {
            s[i] = qd_unref_slot_at(m, i);
        }
        return qd_encode_unref(out, sizeof(out), m->hdr.seq, s, n);
    }
    case QD_MSG_RESTORE: {
        static QdRestoreEntry e[QD_MAX_RESTORE];

        for (uint32_t i = 0; i < n; i++) {
            qd_restore_entry_at(m, i, &e[i]);
        }
        return qd_encode_restore(out, sizeof(out), m->hdr.seq, e, n);
    }
    }
    abort();    /* the decoder accepted an unknown type */
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    QdMessage m;
    size_t len;

    if (qd_decode(data, size, &m) == QD_DECODE_OK) {
        len = reencode(&m);
        if (len != size || memcmp(out, data, size) != 0) {
            abort();
        }
    }
    /* The broker's peek path, on every prefix length it could see. */
    if (size >= QD_HEADER_SIZE + 4) {
        qd_decode_publish_meta(data, size, size, &m);
        qd_decode_publish_meta(data, size, size + QD_PAGE_SIZE, &m);
    }
    return 0;
}

/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * qdedup wire protocol between a QEMU memory-dedup engine (the client) and
 * qemu-dedup-broker, over a SOCK_SEQPACKET unix socket (one message per
 * packet, so framing is the kernel's job).  See docs/protocol.md.
 *
 * Every message is a 16-byte header followed by a body.  All fields are
 * little-endian and fixed-width; they are packed and unpacked by the codec
 * (protocol/codec.c), never by struct layout.  Decoding checks every length
 * and count against the packet size before anything is used, so a decoded
 * QdMessage can be trusted as far as its shape goes.
 *
 * Every request gets exactly one reply carrying the request's seq: the
 * matching *_REPLY, QD_MSG_OK or QD_MSG_ERROR.
 *
 * This header includes nothing from QEMU or glib: both sides use it.
 */
#ifndef QDEDUP_PROTOCOL_H
#define QDEDUP_PROTOCOL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define QD_PROTO_MAGIC      0x50444451u     /* "QDDP" on the wire */
#define QD_PROTO_VERSION    2u
#define QD_PAGE_SIZE        4096u
#define QD_DEFAULT_SOCKET   "/run/qemu-dedup/broker.sock"
#define QD_HEADER_SIZE      16u

#define QD_MAX_LOOKUP       1024u   /* hashes per LOOKUP */
#define QD_MAX_PUBLISH      32u     /* pages per PUBLISH */
#define QD_MAX_UNREF        1024u   /* references per UNREF */
#define QD_MAX_RESTORE      1024u   /* references per RESTORE */
#define QD_NAME_MAX         64u     /* VM name, domain name (bytes) */
#define QD_SECRET_MAX       64u
#define QD_ERRMSG_MAX       200u

#define QD_LOOKUP_ENTRY_SIZE    24u     /* hash 16 + cookie 8 */
#define QD_RESULT_ENTRY_SIZE    16u     /* result 4 + reserved 4 + slot 8 */
#define QD_RESTORE_ENTRY_SIZE   24u     /* slot 8 + hash 16 */
#define QD_UNREF_ENTRY_SIZE     8u      /* slot 8 */

/* The largest message: a full PUBLISH (metadata, then the pages). */
#define QD_PUBLISH_META_SIZE(n) (QD_HEADER_SIZE + 4u + (n) * QD_LOOKUP_ENTRY_SIZE)
#define QD_PUBLISH_SIZE(n)      (QD_PUBLISH_META_SIZE(n) + (n) * QD_PAGE_SIZE)
#define QD_MSG_MAX              QD_PUBLISH_SIZE(QD_MAX_PUBLISH)
/* The largest message other than PUBLISH. */
#define QD_SMALL_MSG_MAX        (QD_HEADER_SIZE + 4u + QD_MAX_LOOKUP * QD_LOOKUP_ENTRY_SIZE)

typedef enum QdMsgType {
    QD_MSG_HELLO = 1,       /* client: who I am, which domain (+ pool fd number on reconnect) */
    QD_MSG_HELLO_REPLY,     /* broker: limits (+ read-only pool fd) */
    QD_MSG_LOOKUP,          /* client: hashes of stable candidate pages */
    QD_MSG_LOOKUP_REPLY,    /* broker: one QdResult per hash */
    QD_MSG_PUBLISH,         /* client: pages the broker asked for, content appended */
    QD_MSG_PUBLISH_REPLY,   /* broker: one QdResult per page */
    QD_MSG_UNREF,           /* client: references it no longer maps */
    QD_MSG_RESTORE,         /* client, after a broker restart: references it still maps */
    QD_MSG_RESTORE_REPLY,   /* broker: one QdResult per reference */
    QD_MSG_OK,              /* broker: request done (count of items) */
    QD_MSG_ERROR,           /* broker: request refused (code, message) */
    QD_MSG_TYPE_MAX = QD_MSG_ERROR,
} QdMsgType;

/* Per-entry results in LOOKUP/PUBLISH/RESTORE replies. */
typedef enum QdResultCode {
    QD_RESULT_MISS = 0,     /* no match yet; remembered as a candidate */
    QD_RESULT_HIT,          /* pool slot has this hash; a reference is now held */
    QD_RESULT_PUBLISH,      /* a match appeared: send the content (PUBLISH) */
    QD_RESULT_STORED,       /* content stored in slot; a reference is now held */
    QD_RESULT_MISMATCH,     /* content does not hash to the claimed hash */
    QD_RESULT_QUOTA,        /* client or domain quota reached */
    QD_RESULT_FULL,         /* pool at its maximum size */
    QD_RESULT_UNWANTED,     /* PUBLISH of a page nobody asked for */
    QD_RESULT_REFUSED,      /* RESTORE of a slot that is not held for recovery */
    QD_RESULT_MAX = QD_RESULT_REFUSED,
} QdResultCode;

typedef enum QdErrorCode {
    QD_ERR_PROTOCOL = 1,    /* malformed message (the connection is closed) */
    QD_ERR_VERSION,         /* protocol version not supported */
    QD_ERR_DENIED,          /* uid/gid not allowed, or domain refused */
    QD_ERR_STATE,           /* message not valid now (e.g. LOOKUP before HELLO) */
    QD_ERR_NOT_HELD,        /* UNREF of a reference the client does not hold */
    QD_ERR_RETRY,           /* broker restarting: retry HELLO after a delay */
    QD_ERR_POOL_CHANGED,    /* handed-back pool is not the broker's pool */
    QD_ERR_INTERNAL,
    QD_ERR_MAX = QD_ERR_INTERNAL,
} QdErrorCode;

/*
 * HELLO hands back the pool: pool_fd names the client's own descriptor of
 * it, which the broker inspects through /proc (kcmp, pidfd_getfd).  Clients
 * never send descriptors: the broker's socket refuses them (SO_PASSRIGHTS).
 */
#define QD_HELLO_RECONNECT  1u
#define QD_HELLO_FLAGS      QD_HELLO_RECONNECT

#define QD_REPLY_ADOPTED    1u  /* HELLO_REPLY: the broker adopted the handed-back pool */
#define QD_REPLY_REFS_KEPT  2u  /* HELLO_REPLY: the broker still had this process's
                                 * references (it was only disconnected): no RESTORE */
/*
 * References: a client holds at most one reference per slot, however many
 * of its pages map it.  A HIT or STORED of a slot it holds already takes no
 * second one, and one UNREF gives it back: a client that maps a slot from
 * several pages counts them itself (include/qdedup/slot-uses.h).
 */
#define QD_REPLY_FLAGS      (QD_REPLY_ADOPTED | QD_REPLY_REFS_KEPT)

typedef struct QdHash {
    uint64_t lo, hi;            /* XXH3-128 (XXH128_hash_t low64/high64) */
} QdHash;

typedef struct QdHeader {
    uint32_t magic;
    uint16_t type;              /* QdMsgType */
    uint16_t flags;             /* 0; reserved */
    uint32_t seq;               /* chosen by the client, echoed in the reply */
    uint32_t len;               /* whole message, header included */
} QdHeader;

typedef struct QdHello {
    uint32_t version;
    uint32_t flags;             /* QD_HELLO_* */
    uint32_t pid;
    uint8_t uuid[16];
    char name[QD_NAME_MAX + 1];     /* NUL-terminated after decoding */
    char domain[QD_NAME_MAX + 1];   /* "" = share with nobody */
    uint8_t secret[QD_SECRET_MAX];
    uint32_t secret_len;
    uint64_t pool_dev, pool_ino;    /* with QD_HELLO_RECONNECT */
    uint32_t pool_fd;               /* with QD_HELLO_RECONNECT: our descriptor number */
} QdHello;

typedef struct QdHelloReply {
    uint32_t version;
    uint32_t flags;             /* QD_REPLY_* */
    uint32_t client_id;
    uint32_t page_size;
    uint32_t max_lookup, max_publish;
    uint64_t pool_slots;        /* pool maximum, in slots */
    uint64_t client_quota;      /* slots; 0 = no limit */
    uint64_t domain_quota;      /* slots; 0 = no limit */
    uint64_t pool_dev, pool_ino;    /* identity of the pool fd passed along */
} QdHelloReply;

typedef struct QdLookupEntry {
    QdHash hash;
    uint64_t cookie;            /* client's name for the page (e.g. its address) */
} QdLookupEntry;

typedef struct QdResult {
    uint32_t result;            /* QdResultCode */
    uint64_t slot;              /* with HIT and STORED */
} QdResult;

typedef struct QdRestoreEntry {
    uint64_t slot;
    QdHash hash;
} QdRestoreEntry;

typedef struct QdError {
    uint32_t code;              /* QdErrorCode */
    char message[QD_ERRMSG_MAX + 1];
} QdError;

/*
 * A decoded message.  Arrays stay in the packet buffer (wire format) and are
 * read with the qd_*_at() accessors below, whose index the caller keeps
 * below count; the packet buffer must outlive the QdMessage.
 */
typedef struct QdMessage {
    QdHeader hdr;
    union {
        QdHello hello;
        QdHelloReply hello_reply;
        struct {
            uint32_t count;
            const uint8_t *entries;
            const uint8_t *pages;   /* PUBLISH only: count * QD_PAGE_SIZE */
        } array;                    /* LOOKUP, PUBLISH, *_REPLY, UNREF, RESTORE */
        uint32_t ok_count;
        QdError error;
    } u;
} QdMessage;

/* Decoder results (negative) */
typedef enum QdDecodeError {
    QD_DECODE_OK = 0,
    QD_DECODE_SHORT = -1,       /* shorter than its header says, or than a header */
    QD_DECODE_MAGIC = -2,
    QD_DECODE_TYPE = -3,        /* unknown message type */
    QD_DECODE_LENGTH = -4,      /* header length disagrees with the packet or body */
    QD_DECODE_COUNT = -5,       /* count over the limit for this message */
    QD_DECODE_STRING = -6,      /* string too long or not printable */
    QD_DECODE_VALUE = -7,       /* a field out of range (flags, codes, reserved) */
} QdDecodeError;

const char *qd_decode_strerror(int err);
const char *qd_msg_type_name(uint32_t type);
const char *qd_result_name(uint32_t result);
const char *qd_error_name(uint32_t code);

/* Decode a whole packet of len bytes (checks everything). */
int qd_decode(const uint8_t *buf, size_t len, QdMessage *msg);

/*
 * PUBLISH as the broker receives it: the metadata (header, count, entries)
 * first, peeked, so that the pages can then be received straight into pool
 * slots.  meta_len bytes of buf are available; total_len is the packet size.
 */
int qd_decode_publish_meta(const uint8_t *buf, size_t meta_len, size_t total_len,
                           QdMessage *msg);

void qd_lookup_entry_at(const QdMessage *msg, uint32_t i, QdLookupEntry *e);
void qd_result_at(const QdMessage *msg, uint32_t i, QdResult *r);
void qd_restore_entry_at(const QdMessage *msg, uint32_t i, QdRestoreEntry *e);
uint64_t qd_unref_slot_at(const QdMessage *msg, uint32_t i);

/*
 * Encoding, into a caller's buffer.  Each returns the message length, or 0
 * if the buffer is too small or an argument breaks a protocol limit.
 */
size_t qd_encode_hello(uint8_t *buf, size_t size, uint32_t seq, const QdHello *h);
size_t qd_encode_hello_reply(uint8_t *buf, size_t size, uint32_t seq,
                             const QdHelloReply *r);
size_t qd_encode_lookup(uint8_t *buf, size_t size, uint32_t seq,
                        const QdLookupEntry *e, uint32_t count);
/* Only the metadata: the sender appends count pages (e.g. with sendmsg). */
size_t qd_encode_publish_meta(uint8_t *buf, size_t size, uint32_t seq,
                              const QdLookupEntry *e, uint32_t count);
size_t qd_encode_results(uint8_t *buf, size_t size, uint32_t type, uint32_t seq,
                         const QdResult *r, uint32_t count);
size_t qd_encode_unref(uint8_t *buf, size_t size, uint32_t seq,
                       const uint64_t *slots, uint32_t count);
size_t qd_encode_restore(uint8_t *buf, size_t size, uint32_t seq,
                         const QdRestoreEntry *e, uint32_t count);
size_t qd_encode_ok(uint8_t *buf, size_t size, uint32_t seq, uint32_t count);
size_t qd_encode_error(uint8_t *buf, size_t size, uint32_t seq, uint32_t code,
                       const char *message);

/* The largest count a message type allows (0 for types without an array). */
uint32_t qd_max_count(uint32_t type);

/* XXH3-128 of one page, as both sides compute it (AVX2 where the CPU has it). */
QdHash qd_hash_page(const void *page);
/* Which build qd_hash_page uses: "avx2" or "generic". */
const char *qd_hash_variant(void);

static inline bool qd_hash_equal(QdHash a, QdHash b)
{
    return a.lo == b.lo && a.hi == b.hi;
}

#endif /* QDEDUP_PROTOCOL_H */

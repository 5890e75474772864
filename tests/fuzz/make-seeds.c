/* SPDX-License-Identifier: GPL-2.0-or-later */
/* Writes one valid message of each type into DIR: the fuzzer's seed corpus. */
#include <stdio.h>
#include <string.h>

#include "qdedup/protocol.h"

static uint8_t buf[QD_MSG_MAX];

static void save(const char *dir, const char *name, size_t len)
{
    char path[512];
    FILE *f;

    snprintf(path, sizeof(path), "%s/%s", dir, name);
    f = fopen(path, "wb");
    if (!f || fwrite(buf, 1, len, f) != len || fclose(f)) {
        perror(path);
    }
}

int main(int argc, char **argv)
{
    QdHello h = { .version = 1, .flags = QD_HELLO_RECONNECT, .pid = 1, .secret_len = 2 };
    QdHelloReply r = { .version = 1, .flags = QD_REPLY_REFS_KEPT, .page_size = 4096 };
    QdLookupEntry e[3] = { { { 1, 2 }, 3 }, { { 4, 5 }, 6 }, { { 7, 8 }, 9 } };
    QdResult res[3] = { { QD_RESULT_HIT, 1 }, { QD_RESULT_PUBLISH, 0 }, { QD_RESULT_MISS, 0 } };
    QdRestoreEntry re[2] = { { 5, { 1, 1 } }, { 6, { 2, 2 } } };
    uint64_t slots[3] = { 1, 2, 3 };
    size_t len;

    if (argc != 2) {
        fprintf(stderr, "usage: %s DIR\n", argv[0]);
        return 2;
    }
    strcpy(h.name, "vm");
    strcpy(h.domain, "tenant");
    memcpy(h.secret, "k!", 2);
    save(argv[1], "hello", qd_encode_hello(buf, sizeof(buf), 1, &h));
    save(argv[1], "hello-reply", qd_encode_hello_reply(buf, sizeof(buf), 1, &r));
    save(argv[1], "lookup", qd_encode_lookup(buf, sizeof(buf), 2, e, 3));
    save(argv[1], "lookup-reply",
         qd_encode_results(buf, sizeof(buf), QD_MSG_LOOKUP_REPLY, 2, res, 3));
    len = qd_encode_publish_meta(buf, sizeof(buf), 3, e, 1);
    memset(buf + len, 0xaa, QD_PAGE_SIZE);
    save(argv[1], "publish", len + QD_PAGE_SIZE);
    save(argv[1], "unref", qd_encode_unref(buf, sizeof(buf), 4, slots, 3));
    save(argv[1], "restore", qd_encode_restore(buf, sizeof(buf), 5, re, 2));
    save(argv[1], "ok", qd_encode_ok(buf, sizeof(buf), 6, 3));
    save(argv[1], "error", qd_encode_error(buf, sizeof(buf), 7, QD_ERR_DENIED, "no"));
    return 0;
}

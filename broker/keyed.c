/* SPDX-License-Identifier: GPL-2.0-or-later */
/* Keyed placement hash (see keyed.h). */
#include <glib.h>
#include <sodium.h>
#include <string.h>
#include <sys/random.h>

#include "keyed.h"

G_STATIC_ASSERT(sizeof(((KeyedHash *)0)->key) == crypto_shorthash_KEYBYTES);

void keyed_init(KeyedHash *k, uint64_t seed)
{
    if (seed) {
        memset(k->key, 0, sizeof(k->key));
        memcpy(k->key, &seed, sizeof(seed));
        return;
    }
    if (getrandom(k->key, sizeof(k->key), 0) != sizeof(k->key)) {
        g_error("getrandom: cannot draw the broker's hash key");
    }
}

uint64_t keyed_hash(const KeyedHash *k, QdHash h)
{
    unsigned char in[16], out[8];
    uint64_t v;

    memcpy(in, &h.lo, 8);
    memcpy(in + 8, &h.hi, 8);
    crypto_shorthash(out, in, sizeof(in), k->key);
    memcpy(&v, out, sizeof(v));
    return v ? v : 1;
}

/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The broker's own keyed hash of a page hash, for placing entries in its
 * tables.  A client chooses the hashes it looks up (and, by choosing page
 * content, those it stores), so tables placed by bits of those hashes can
 * be flooded with collisions: one client's LOOKUPs with chosen low bits made
 * another client's worst latency 496 ms.  SipHash-2-4 (libsodium's
 * crypto_shorthash) under a key drawn at start makes positions
 * unpredictable; about 12 ns a lookup.
 */
#ifndef QDEDUP_BROKER_KEYED_H
#define QDEDUP_BROKER_KEYED_H

#include <stdint.h>

#include "qdedup/protocol.h"

typedef struct KeyedHash {
    unsigned char key[16];
} KeyedHash;

/* A fresh random key (getrandom); seed != 0 gives a fixed one, for tests. */
void keyed_init(KeyedHash *k, uint64_t seed);
/* Never 0, so tables can use 0 as "empty". */
uint64_t keyed_hash(const KeyedHash *k, QdHash h);

#endif

/* SPDX-License-Identifier: GPL-2.0-or-later */
/* The AVX2 build of qd_hash_page (see hash.c); compiled with -mavx2. */
#include "qdedup/protocol.h"
#include "hash-impl.h"

#define XXH_INLINE_ALL
#include <xxhash.h>

QdHash qd_hash_page_avx2(const void *page)
{
    XXH128_hash_t h = XXH3_128bits(page, QD_PAGE_SIZE);

    return (QdHash) { .lo = h.low64, .hi = h.high64 };
}

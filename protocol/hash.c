/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * XXH3-128 of a page, the hash both sides of the protocol use.
 *
 * xxHash is compiled inline (XXH_INLINE_ALL) rather than called in Debian's
 * shared libxxhash, which was measured 30-40% slower on pages here; and it is
 * compiled twice, for the x86-64 baseline (SSE2) and for AVX2
 * (hash-avx2.c), the variant picked once at run time from the CPU's features.
 */
#include "qdedup/protocol.h"
#include "hash-impl.h"

#define XXH_INLINE_ALL
#include <xxhash.h>

QdHash qd_hash_page_generic(const void *page)
{
    XXH128_hash_t h = XXH3_128bits(page, QD_PAGE_SIZE);

    return (QdHash) { .lo = h.low64, .hi = h.high64 };
}

#if defined(__x86_64__) && defined(QD_HAVE_AVX2)
static QdHash (*resolve_hash(void))(const void *)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") ? qd_hash_page_avx2 : qd_hash_page_generic;
}
#else
static QdHash (*resolve_hash(void))(const void *)
{
    return qd_hash_page_generic;
}
#endif

const char *qd_hash_variant(void)
{
    return resolve_hash() == qd_hash_page_generic ? "generic" : "avx2";
}

QdHash qd_hash_page(const void *page)
{
    static QdHash (*impl)(const void *);

    /* Racing first calls store the same pointer: benign. */
    if (!__atomic_load_n(&impl, __ATOMIC_RELAXED)) {
        __atomic_store_n(&impl, resolve_hash(), __ATOMIC_RELAXED);
    }
    return impl(page);
}

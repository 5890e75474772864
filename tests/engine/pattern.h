/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Helpers of the engine tests.  Page contents: a page holds a pure function
 * of one value (0 is the zero page), so a reader can check it without a
 * copy.  The kernel's view of the VMAs, to compare with the engine's.  The
 * engine's threads.
 */
#ifndef QDEDUP_TESTS_ENGINE_PATTERN_H
#define QDEDUP_TESTS_ENGINE_PATTERN_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "engine.h"

#define PAGE 4096u

static inline uint64_t mix(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    return x;
}

static inline void fill(uint8_t *p, uint64_t v)
{
    uint64_t *w = (uint64_t *)p;

    if (!v) {
        memset(p, 0, PAGE);
        return;
    }
    w[0] = v;
    for (unsigned i = 1; i < PAGE / 8; i++) {
        w[i] = mix(v * 512 + i);
    }
}

static inline bool check_word(const uint8_t *p, uint64_t v, unsigned i)
{
    uint64_t got = ((const uint64_t *)p)[i];

    return got == (!v ? 0 : i == 0 ? v : mix(v * 512 + i));
}

static inline bool check_page(const uint8_t *p, uint64_t v)
{
    for (unsigned i = 0; i < PAGE / 8; i++) {
        if (!check_word(p, v, i)) {
            return false;
        }
    }
    return true;
}

/* VMAs the kernel has in [start, end), from /proc/self/maps. */
static inline uint64_t count_vmas(uintptr_t start, uintptr_t end)
{
    FILE *f = fopen("/proc/self/maps", "r");
    unsigned long lo, hi;
    char line[512];
    uint64_t n = 0;

    while (f && fgets(line, sizeof(line), f)) {
        if (sscanf(line, "%lx-%lx", &lo, &hi) == 2 && lo < end && hi > start) {
            n++;
        }
    }
    if (f) {
        fclose(f);
    }
    return n;
}

/* The engine's two threads, for pthread_create(). */
static inline void *scanner(void *e)
{
    dedup_engine_run_scanner(e);
    return NULL;
}

static inline void *faults(void *e)
{
    dedup_engine_run_faults(e);
    return NULL;
}

#endif

/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * What announcing device DMA costs (accel/dedup/dma.c, ARCHITECTURE I8):
 * nanoseconds per dedup_dma_map() + dedup_dma_unmap() pair, the calls
 * QEMU's address_space_map() and address_space_unmap() now make, with 0,
 * 16, 128 and 512 other mappings in flight (a device's queue depth), from
 * one thread and from two at once; and one dedup_dma_busy() question, as
 * the engine asks it per run it changes.  Not a test: it asserts nothing.
 *
 *   dma-track-bench [SECONDS]
 */
#include <glib.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "engine.h"

static double seconds = 1;
static uint8_t ram[4096 * 1024] __attribute__((aligned(4096)));
static uint8_t other[4096 * 512] __attribute__((aligned(4096)));  /* in flight */

static double now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *pairs(void *arg)
{
    uintptr_t base = (uintptr_t)arg;
    double t0 = now(), t;
    uint64_t n = 0;

    do {
        for (int i = 0; i < 1000; i++) {
            void *p = ram + ((base + i) % 512) * 8192;

            dedup_dma_map(p, 65536);
            dedup_dma_unmap(p, 65536);
        }
        n += 1000;
        t = now();
    } while (t - t0 < seconds);
    return (void *)(uintptr_t)((t - t0) * 1e9 / n);
}

int main(int argc, char **argv)
{
    static const int inflight[] = { 0, 16, 128, 512 };

    if (argc > 1) {
        seconds = atof(argv[1]);
    }
    printf("| mappings in flight | ns per map+unmap, 1 thread | ns per pair, 2 threads "
           "| ns per busy question |\n|---|---|---|---|\n");
    for (size_t k = 0; k < G_N_ELEMENTS(inflight); k++) {
        pthread_t t[2];
        void *r0, *r1, *r2;
        double t0, busy_ns;
        uint64_t q = 0;
        volatile bool sink = false;

        for (int i = 0; i < inflight[k]; i++) {
            dedup_dma_map(other + i * 4096, 4096);
        }
        r0 = pairs((void *)0);
        pthread_create(&t[0], NULL, pairs, (void *)1);
        pthread_create(&t[1], NULL, pairs, (void *)7);
        pthread_join(t[0], &r1);
        pthread_join(t[1], &r2);
        t0 = now();
        do {
            for (int i = 0; i < 1000; i++) {
                sink |= dedup_dma_busy(ram + (i % 64) * 4096 * 8, 4096 * 64);
            }
            q += 1000;
        } while (now() - t0 < seconds);
        busy_ns = (now() - t0) * 1e9 / q;
        printf("| %d | %lu | %lu | %.0f |\n", inflight[k], (unsigned long)(uintptr_t)r0,
               (unsigned long)(((uintptr_t)r1 + (uintptr_t)r2) / 2), busy_ns);
        for (int i = 0; i < inflight[k]; i++) {
            dedup_dma_unmap(other + i * 4096, 4096);
        }
        (void)sink;
    }
    return 0;
}

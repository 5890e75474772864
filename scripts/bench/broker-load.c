/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Load generator for the broker benchmark (scripts/bench/broker-bench.py):
 * one client sending LOOKUP batches as fast as the broker answers them.
 *
 *   broker-load SOCKET DOMAIN MODE SECONDS [SLOTS]
 *
 * MODE miss: hashes of pages the broker has seen before from this client
 * (the steady state of a scan: candidates seen again).  MODE hit: first
 * stores SLOTS pages (or finds them stored by a holder) and gives its own
 * references back, then looks them up (each hit takes a reference, given
 * back by an UNREF per batch, which is timed too).  MODE hold: stores
 * SLOTS pages, prints "ready", and keeps its references until killed (for
 * measuring the broker's memory per slot, and to keep the pages of hit
 * runs stored).  Prints "lookups N seconds S".
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "qdedup/client.h"

#define BATCH QD_MAX_LOOKUP

static double now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void page_of(uint8_t *page, uint64_t n)
{
    memset(page, 0, QD_PAGE_SIZE);
    memcpy(page, &n, sizeof(n));
    memcpy(page + 8, "qdedup-bench", 12);
}

int main(int argc, char **argv)
{
    static QdLookupEntry e[BATCH];
    static QdResult r[BATCH];
    static uint64_t slots[BATCH];
    static uint8_t pages[QD_MAX_PUBLISH][QD_PAGE_SIZE];
    QdHello h = { .version = QD_PROTO_VERSION, .pid = getpid() };
    QdClient c;
    QdError err;
    uint64_t nslots = argc > 5 ? strtoull(argv[5], NULL, 0) : 65536, lookups = 0;
    int hit, hold, seconds;
    QdHash *hashes;
    double start;

    if (argc < 5) {
        fprintf(stderr, "usage: %s SOCKET DOMAIN miss|hit SECONDS [SLOTS]\n", argv[0]);
        return 2;
    }
    hold = !strcmp(argv[3], "hold");
    hit = hold || !strcmp(argv[3], "hit");
    seconds = atoi(argv[4]);
    snprintf(h.domain, sizeof(h.domain), "%s", argv[2]);
    snprintf(h.name, sizeof(h.name), "bench-%d", getpid());
    if (qd_client_open(&c, argv[1], &h, &err)) {
        fprintf(stderr, "connect: %s\n", err.message);
        return 1;
    }
    if (hit) {
        /*
         * Take exactly one reference to each of nslots pages, as a VM
         * merging them would: a hit is kept; a miss is looked up once more
         * under another cookie (a second identical page), then published.
         */
        for (uint64_t base = 0; base < nslots; base += QD_MAX_PUBLISH) {
            const void *pp[QD_MAX_PUBLISH];
            QdLookupEntry pe[QD_MAX_PUBLISH];
            QdResult pr[QD_MAX_PUBLISH];
            uint32_t k = 0, nheld = 0;

            for (uint32_t i = 0; i < QD_MAX_PUBLISH; i++) {
                page_of(pages[i], base + i);
                e[i] = (QdLookupEntry) { .hash = qd_hash_page(pages[i]), .cookie = 2 * i };
            }
            if (qd_client_lookup(&c, e, QD_MAX_PUBLISH, r, &err)) {
                fprintf(stderr, "populate: %s\n", err.message);
                return 1;
            }
            for (uint32_t i = 0; i < QD_MAX_PUBLISH; i++) {
                if (r[i].result != QD_RESULT_HIT) {
                    pe[k] = e[i];
                    pe[k].cookie++;
                    pp[k++] = pages[i];
                } else {
                    slots[nheld++] = r[i].slot;
                }
            }
            if (k && (qd_client_lookup(&c, pe, k, r, &err) ||
                      qd_client_publish(&c, pe, pp, k, pr, &err))) {
                fprintf(stderr, "populate: %s\n", err.message);
                return 1;
            }
            for (uint32_t j = 0; j < k; j++) {
                if (pr[j].result == QD_RESULT_STORED || pr[j].result == QD_RESULT_HIT) {
                    slots[nheld++] = pr[j].slot;
                }
            }
            /* One reference per slot and client: ours go, the holder's stay. */
            if (!hold && nheld && qd_client_unref(&c, slots, nheld, &err)) {
                fprintf(stderr, "populate unref: %s\n", err.message);
                return 1;
            }
        }
    }
    if (hold) {
        printf("ready\n");
        fflush(stdout);
        pause();
    }
    /* The hashes to look up, computed beforehand: the broker is measured. */
    hashes = malloc(nslots * sizeof(*hashes));
    for (uint64_t n = 0; n < nslots; n++) {
        if (hit) {
            page_of(pages[0], n);
            hashes[n] = qd_hash_page(pages[0]);
        } else {
            hashes[n] = (QdHash) { .lo = (n + 1) * 0x9e3779b97f4a7c15ull ^ getpid(), .hi = n };
        }
    }
    /* Populated: wait for the driver's go, so only lookups are timed. */
    printf("ready\n");
    fflush(stdout);
    if (getchar() == EOF) {
        return 1;
    }
    start = now();
    for (uint64_t round = 0; now() - start < seconds; round++) {
        uint32_t nhits = 0;

        for (uint32_t i = 0; i < BATCH; i++) {
            uint64_t n = (round * BATCH + i) % nslots;

            e[i] = (QdLookupEntry) { .hash = hashes[n], .cookie = n };
        }
        if (qd_client_lookup(&c, e, BATCH, r, &err)) {
            fprintf(stderr, "lookup: %s\n", err.message);
            return 1;
        }
        for (uint32_t i = 0; i < BATCH; i++) {
            if (r[i].result == QD_RESULT_HIT) {
                slots[nhits++] = r[i].slot;
            }
        }
        if (nhits && qd_client_unref(&c, slots, nhits, &err)) {
            fprintf(stderr, "unref: %s\n", err.message);
            return 1;
        }
        lookups += BATCH;
    }
    printf("lookups %llu seconds %.3f\n", (unsigned long long)lookups, now() - start);
    qd_client_close(&c);
    return 0;
}

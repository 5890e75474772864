/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * What a loadvm or a guest reboot does to merged memory: every page is
 * rewritten at once.  The merged pages are COWed and, their new content
 * matching nothing, given back to the guest's own memory; then the guest
 * writes duplicates again and they must merge again.  Given back page by
 * page, each merged run would split into a VMA per page and the VMA budget
 * would stop all merging from then on (ARCHITECTURE I7); the engine moves
 * mostly-COWed runs back in one piece instead (merge.c restore_cowed).
 *
 *   engine-rewrite BROKER_SOCKET
 *
 * TAP output.  The budget (max-vmas) is half the pages: enough for merged
 * runs (a batch of 1024 merges asks for 2048), far too little for a VMA per
 * page.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "engine.h"
#include "pattern.h"

#define NPAGES 8192u
#define COPIES 4u           /* each shared value fills this many pages */

static int n;
static bool all_ok = true;

static void tap(bool ok, const char *what)
{
    printf("%s %d - %s\n", ok ? "ok" : "not ok", ++n, what);
    all_ok &= ok;
}

/* Wait (up to 60 s) until at least want pages are merged, or none hold a slot. */
static DedupStats wait_for(DedupEngine *e, uint64_t want_merged, bool want_no_refs)
{
    DedupStats st = { 0 };
    uint64_t passes0;

    dedup_engine_get_stats(e, &st);
    passes0 = st.passes;
    for (int i = 0; i < 600; i++) {
        usleep(100000);
        dedup_engine_get_stats(e, &st);
        /* Two whole passes after the change, so that "now" figures are current. */
        if (st.passes < passes0 + 2) {
            continue;
        }
        if (want_no_refs ? st.pool_refs == 0 : st.merged_pages >= want_merged) {
            break;
        }
    }
    return st;
}

static bool contents(const uint8_t *ram, uint64_t base, bool shared)
{
    for (size_t p = 0; p < NPAGES; p++) {
        if (!check_page(ram + p * PAGE, shared ? base + p % (NPAGES / COPIES)
                                               : base + p)) {
            return false;
        }
    }
    return true;
}

static void write_all(uint8_t *ram, uint64_t base, bool shared)
{
    for (size_t p = 0; p < NPAGES; p++) {
        fill(ram + p * PAGE, shared ? base + p % (NPAGES / COPIES) : base + p);
    }
}

int main(int argc, char **argv)
{
    DedupConfig cfg = { .domain = "rewrite", .name = "engine-rewrite", .zero_pages = true,
                        .merge = true, .cpu_limit = 100, .pass_interval_ms = 10,
                        .max_vmas = NPAGES / 2 };
    pthread_t ts, tf;
    DedupStats st;
    DedupEngine *e;
    char *err = NULL;
    char what[256];
    uint8_t *ram;

    if (argc != 2) {
        fprintf(stderr, "usage: %s BROKER_SOCKET\n", argv[0]);
        return 2;
    }
    cfg.broker = argv[1];
    printf("TAP version 13\n1..7\n");
    ram = mmap(NULL, NPAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
               -1, 0);
    write_all(ram, 1, true);
    e = dedup_engine_new(&cfg, &err);
    if (!e || dedup_engine_add_region(e, "rewrite-ram", ram, NPAGES * PAGE,
                                      DEDUP_REGION_DONTFORK, &err) < 0) {
        printf("not ok 1 - engine starts: %s\n", err);
        return 1;
    }
    pthread_create(&ts, NULL, scanner, e);
    pthread_create(&tf, NULL, faults, e);

    st = wait_for(e, NPAGES * 3 / 4, false);
    snprintf(what, sizeof(what), "duplicates merged: %llu of %u pages, %llu VMAs",
             (unsigned long long)st.merged_pages, NPAGES, (unsigned long long)st.vmas_used);
    tap(st.merged_pages >= NPAGES / 2, what);

    /* "loadvm": every page gets content that matches nothing. */
    write_all(ram, 1000000, false);
    st = wait_for(e, 0, true);
    snprintf(what, sizeof(what), "after a full rewrite every slot was given back: "
             "%llu references, %llu restored, %llu VMAs (budget %u)",
             (unsigned long long)st.pool_refs, (unsigned long long)st.restored,
             (unsigned long long)st.vmas_used, NPAGES / 2);
    tap(st.pool_refs == 0 && st.vmas_used < NPAGES / 8, what);
    {
        uint64_t kernel = count_vmas((uintptr_t)ram, (uintptr_t)ram + NPAGES * PAGE);

        dedup_engine_get_stats(e, &st);
        snprintf(what, sizeof(what), "VMA accounting matches the kernel: vmas-used %llu, "
                 "the kernel has %llu", (unsigned long long)st.vmas_used,
                 (unsigned long long)kernel);
        tap(kernel == st.vmas_used + 1, what);
    }
    tap(contents(ram, 1000000, false), "every page reads what was written");

    /* The new boot writes duplicates again: they merge again. */
    write_all(ram, 5000000, true);
    st = wait_for(e, NPAGES * 3 / 4, false);
    snprintf(what, sizeof(what), "duplicates written after the rewrite merge again: "
             "%llu merged, %llu VMAs, budget %s", (unsigned long long)st.merged_pages,
             (unsigned long long)st.vmas_used,
             st.vma_budget_reached ? "reached" : "not reached");
    tap(st.merged_pages >= NPAGES / 2 && !st.vma_budget_reached, what);
    tap(contents(ram, 5000000, true), "every page reads what was written");

    dedup_engine_stop(e);
    pthread_join(ts, NULL);
    pthread_join(tf, NULL);
    snprintf(what, sizeof(what), "unmerge gives every slot back (%llu left)",
             (unsigned long long)dedup_engine_unmerge(e, UINT64_MAX));
    tap(strstr(what, "(0 left)") != NULL, what);
    dedup_engine_free(e);
    return all_ok ? 0 : 1;
}

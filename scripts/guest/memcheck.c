/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * memcheck: the test guest's memory integrity checker.
 *
 * It fills anonymous memory with patterns that a host-side dedup engine
 * can merge, then verifies every byte of it, round after round, while
 * rewriting part of it.  Every page's content is a pure function of
 * (region, page index, generation), so the expected bytes are recomputed
 * instead of stored: a lost write, a stale page or a zeroed page is caught
 * on the next round, whichever page it hits.
 *
 * Regions:
 *   shared  identical in every guest (seed does not enter the pattern)
 *   unique  differs per guest (--seed)
 *   zero    written with zeros (zero-page dropping)
 * Each round rewrites --rewrite-pct percent of the shared pages with their
 * next generation (a guest write to what is probably a merged page), and
 * also checks a sample of pages right after writing them.
 *
 * --spare-mib fills one more region identical in every guest, not checked,
 * and --free-round N unmaps it after round N: free guest memory whose
 * content the host has merged, for the balloon and free page reporting.
 *
 * With --latency it instead times, every --interval seconds, the first write
 * to --sample shared pages not written before (the copy-on-write of a merged
 * page, once merged) and prints p50/p99 per sample.  --time-writes times the
 * first write to each page a round rewrites and prints the same line per
 * round (a churning workload's writes, merged or not).
 *
 * Output lines (the host's tests parse them):
 *   MEMCHECK-FILLED shared=N unique=N zero=N        once, after the fill
 *   MEMCHECK-ROUND n=N checked=N rewritten=N errors=0
 *   MEMCHECK-FAIL region=R page=N offset=N gen=N    on a mismatch (exit 1)
 *   MEMCHECK-FREED spare=N                          the spare region was unmapped
 *   MEMCHECK-LATENCY n=N pages=N p50-ns=N p99-ns=N max-ns=N errors=N
 *                                                   --latency, --time-writes
 *   MEMCHECK-DONE rounds=N errors=N
 *
 * Built statically by build-image.sh; no libc beyond the basics.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u

enum { SHARED, UNIQUE, ZERO, NREGIONS };
static const char *const region_names[] = { "shared", "unique", "zero" };

struct region {
    uint8_t *base;
    size_t pages;
    uint8_t *gen;               /* current generation per page */
};

static struct region regions[NREGIONS];
static uint64_t seed;

static uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);

    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void pattern(int r, size_t page, unsigned gen, uint64_t *out)
{
    uint64_t s;

    if (r == ZERO) {
        memset(out, 0, PAGE);
        return;
    }
    s = ((uint64_t)r << 56) ^ ((uint64_t)gen << 40) ^ page;
    if (r == UNIQUE) {
        s ^= seed * 0x2545f4914f6cdd1dull;
    }
    for (unsigned i = 0; i < PAGE / 8; i++) {
        out[i] = splitmix(&s);
    }
}

static void write_page(int r, size_t page)
{
    uint64_t buf[PAGE / 8];

    pattern(r, page, regions[r].gen[page], buf);
    memcpy(regions[r].base + page * PAGE, buf, PAGE);
}

static int check_page(int r, size_t page)
{
    uint64_t buf[PAGE / 8];
    const uint8_t *p = regions[r].base + page * PAGE;

    pattern(r, page, regions[r].gen[page], buf);
    if (memcmp(p, buf, PAGE) == 0) {
        return 0;
    }
    for (unsigned off = 0; off < PAGE; off++) {
        if (p[off] != ((uint8_t *)buf)[off]) {
            printf("MEMCHECK-FAIL region=%s page=%zu offset=%u gen=%u "
                   "got=0x%02x want=0x%02x\n", region_names[r], page, off,
                   regions[r].gen[page], p[off], ((uint8_t *)buf)[off]);
            break;
        }
    }
    fflush(stdout);
    return 1;
}

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

    return x < y ? -1 : x > y;
}

/* The time one first write to the page at P takes (a COW fault if merged). */
static uint64_t timed_first_write(volatile uint8_t *p)
{
    uint64_t t0 = now_ns();

    p[0] ^= 1;
    t0 = now_ns() - t0;
    p[0] ^= 1;
    return t0;
}

static void print_latency(long n, uint64_t *lat, size_t count, unsigned long errors)
{
    if (!count) {
        return;
    }
    qsort(lat, count, sizeof(*lat), cmp_u64);
    printf("MEMCHECK-LATENCY n=%ld pages=%zu p50-ns=%llu p99-ns=%llu max-ns=%llu "
           "errors=%lu\n", n, count, (unsigned long long)lat[count / 2],
           (unsigned long long)lat[count * 99 / 100],
           (unsigned long long)lat[count - 1], errors);
    fflush(stdout);
}

/*
 * Every INTERVAL seconds, time the first write to SAMPLE shared pages not
 * written since the fill, and verify them.  The host matches each sample's
 * line with the state of its dedup at that moment (merged or not yet).
 */
static int latency_samples(long samples, long interval, size_t sample)
{
    size_t n = regions[SHARED].pages, next = 0;
    uint64_t *lat = calloc(sample ? sample : 1, sizeof(*lat));
    size_t *order = calloc(n ? n : 1, sizeof(*order));
    uint64_t rng = 12345;
    unsigned long errors = 0;

    /* Random order, so a sample is not one run of neighbouring pages. */
    for (size_t i = 0; i < n; i++) {
        order[i] = i;
    }
    for (size_t i = n; i > 1; i--) {
        size_t j = splitmix(&rng) % i, tmp = order[i - 1];

        order[i - 1] = order[j];
        order[j] = tmp;
    }
    for (long s = 1; (samples <= 0 || s <= samples) && next + sample <= n; s++) {
        sleep(interval);
        for (size_t i = 0; i < sample; i++) {
            lat[i] = timed_first_write(regions[SHARED].base + order[next + i] * PAGE);
            errors += check_page(SHARED, order[next + i]);
        }
        next += sample;
        print_latency(s, lat, sample, errors);
    }
    printf("MEMCHECK-DONE rounds=0 errors=%lu\n", errors);
    fflush(stdout);
    return errors != 0;
}

static void usage(void)
{
    fprintf(stderr, "usage: memcheck [--shared-mib N] [--unique-mib N] "
            "[--zero-mib N] [--rounds N] [--interval S] [--rewrite-pct P] "
            "[--seed N] [--spare-mib N --free-round N] [--latency [--sample N]] "
            "[--time-writes]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    size_t mib[NREGIONS] = { 32, 8, 16 };
    long rounds = 10, interval = 2, rewrite_pct = 2;
    size_t sample = 256, spare_pages = 0;
    long free_round = 0;
    uint8_t *spare = NULL;
    int latency = 0, time_writes = 0;
    uint64_t *write_ns = NULL;
    unsigned long errors = 0;
    uint64_t rng = 1;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;

        if (!strcmp(a, "--latency")) {
            latency = 1;
            continue;
        }
        if (!strcmp(a, "--time-writes")) {
            time_writes = 1;
            continue;
        }
        if (!v) {
            usage();
        }
        i++;
        if (!strcmp(a, "--shared-mib")) {
            mib[SHARED] = strtoul(v, NULL, 0);
        } else if (!strcmp(a, "--unique-mib")) {
            mib[UNIQUE] = strtoul(v, NULL, 0);
        } else if (!strcmp(a, "--zero-mib")) {
            mib[ZERO] = strtoul(v, NULL, 0);
        } else if (!strcmp(a, "--rounds")) {
            rounds = strtol(v, NULL, 0);
        } else if (!strcmp(a, "--interval")) {
            interval = strtol(v, NULL, 0);
        } else if (!strcmp(a, "--rewrite-pct")) {
            rewrite_pct = strtol(v, NULL, 0);
        } else if (!strcmp(a, "--seed")) {
            seed = strtoull(v, NULL, 0);
        } else if (!strcmp(a, "--spare-mib")) {
            spare_pages = strtoul(v, NULL, 0) * 256;
        } else if (!strcmp(a, "--free-round")) {
            free_round = strtol(v, NULL, 0);
        } else if (!strcmp(a, "--sample")) {
            sample = strtoul(v, NULL, 0);
        } else {
            usage();
        }
    }
    rng ^= seed;

    for (int r = 0; r < NREGIONS; r++) {
        regions[r].pages = mib[r] * 256;
        if (!regions[r].pages) {
            continue;
        }
        regions[r].base = mmap(NULL, regions[r].pages * PAGE,
                               PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        regions[r].gen = calloc(regions[r].pages, 1);
        if (regions[r].base == MAP_FAILED || !regions[r].gen) {
            printf("MEMCHECK-FAIL cannot allocate %zu MiB\n", mib[r]);
            return 1;
        }
        /* Base pages, so the host sees 4 KiB pages it can merge one by one. */
        madvise(regions[r].base, regions[r].pages * PAGE, MADV_NOHUGEPAGE);
        for (size_t p = 0; p < regions[r].pages; p++) {
            write_page(r, p);
        }
    }
    if (spare_pages) {
        uint64_t buf[PAGE / 8];

        spare = mmap(NULL, spare_pages * PAGE, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (spare == MAP_FAILED) {
            printf("MEMCHECK-FAIL cannot allocate the spare region\n");
            return 1;
        }
        madvise(spare, spare_pages * PAGE, MADV_NOHUGEPAGE);
        for (size_t p = 0; p < spare_pages; p++) {
            pattern(SHARED, p, 200, buf);       /* a generation shared never reaches soon */
            memcpy(spare + p * PAGE, buf, PAGE);
        }
    }
    printf("MEMCHECK-FILLED shared=%zu unique=%zu zero=%zu\n",
           regions[SHARED].pages, regions[UNIQUE].pages, regions[ZERO].pages);
    fflush(stdout);

    if (latency) {
        return latency_samples(rounds, interval, sample);
    }
    if (time_writes && !(write_ns = calloc(regions[SHARED].pages + 1, sizeof(*write_ns)))) {
        printf("MEMCHECK-FAIL cannot allocate the write timings\n");
        return 1;
    }

    for (long n = 1; rounds <= 0 || n <= rounds; n++) {
        size_t checked = 0, rewritten = 0;

        for (int r = 0; r < NREGIONS; r++) {
            for (size_t p = 0; p < regions[r].pages; p++) {
                errors += check_page(r, p);
                checked++;
            }
        }
        for (size_t p = 0; p < regions[SHARED].pages; p++) {
            if (splitmix(&rng) % 100 < (uint64_t)rewrite_pct) {
                if (write_ns) {
                    write_ns[rewritten] =
                        timed_first_write(regions[SHARED].base + p * PAGE);
                }
                regions[SHARED].gen[p]++;
                write_page(SHARED, p);
                errors += check_page(SHARED, p);
                rewritten++;
            }
        }
        printf("MEMCHECK-ROUND n=%ld checked=%zu rewritten=%zu errors=%lu\n",
               n, checked, rewritten, errors);
        fflush(stdout);
        if (write_ns) {
            print_latency(n, write_ns, rewritten, errors);
        }
        if (errors) {
            break;
        }
        if (spare && n == free_round) {
            munmap(spare, spare_pages * PAGE);
            spare = NULL;
            printf("MEMCHECK-FREED spare=%zu\n", spare_pages);
            fflush(stdout);
        }
        sleep(interval);
    }
    printf("MEMCHECK-DONE rounds=%ld errors=%lu\n", rounds, errors);
    fflush(stdout);
    return errors != 0;
}

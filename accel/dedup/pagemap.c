/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Which pages are present, and whether they map a file page (a merged page
 * not yet written) or the zero page: PAGEMAP_SCAN (Linux 6.7), one ioctl for
 * a whole batch, or /proc/self/pagemap entries where the ioctl is missing.
 * Reading an absent page would populate it, so the scanner asks first.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "engine-internal.h"

#ifndef PAGEMAP_SCAN
/* include/uapi/linux/fs.h of Linux 6.7; older headers lack it. */
#define PAGEMAP_SCAN    _IOWR('f', 16, struct pm_scan_arg)
#define PAGE_IS_FILE    (1 << 2)
#define PAGE_IS_PRESENT (1 << 3)
#define PAGE_IS_PFNZERO (1 << 5)
#define PAGE_IS_HUGE    (1 << 6)
struct page_region {
    uint64_t start, end, categories;
};
struct pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
#endif

#define PM_ENTRY_PRESENT    (1ull << 63)
#define PM_ENTRY_FILE       (1ull << 61)

int pagemap_open(DedupEngine *e)
{
    struct pm_scan_arg arg = { .size = sizeof(arg) };
    static uint8_t probe[DEDUP_PAGE] __attribute__((aligned(DEDUP_PAGE)));

    e->pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (e->pagemap_fd < 0) {
        return -errno;
    }
    arg.start = (uintptr_t)probe;
    arg.end = arg.start + DEDUP_PAGE;
    e->pagemap_scan = ioctl(e->pagemap_fd, PAGEMAP_SCAN, &arg) >= 0;
    return 0;
}

static int flags_by_scan(DedupEngine *e, const uint8_t *addr, size_t n, uint8_t *flags)
{
    struct page_region vec[256];
    uint64_t start = (uintptr_t)addr, end = start + n * DEDUP_PAGE;

    memset(flags, 0, n);
    while (start < end) {
        struct pm_scan_arg arg = {
            .size = sizeof(arg), .start = start, .end = end,
            .vec = (uintptr_t)vec, .vec_len = G_N_ELEMENTS(vec),
            .category_anyof_mask = PAGE_IS_PRESENT,
            .return_mask = PAGE_IS_PRESENT | PAGE_IS_FILE | PAGE_IS_PFNZERO | PAGE_IS_HUGE,
        };
        int got = ioctl(e->pagemap_fd, PAGEMAP_SCAN, &arg);

        if (got < 0) {
            return -errno;
        }
        for (int i = 0; i < got; i++) {
            uint8_t f = PM_PRESENT;

            f |= vec[i].categories & PAGE_IS_FILE ? PM_FILE : 0;
            f |= vec[i].categories & PAGE_IS_PFNZERO ? PM_ZERO : 0;
            f |= vec[i].categories & PAGE_IS_HUGE ? PM_HUGE : 0;
            memset(flags + (vec[i].start - (uintptr_t)addr) / DEDUP_PAGE, f,
                   (vec[i].end - vec[i].start) / DEDUP_PAGE);
        }
        if (arg.walk_end <= start) {
            return -EIO;
        }
        start = arg.walk_end;
    }
    return 0;
}

static int flags_by_read(DedupEngine *e, const uint8_t *addr, size_t n, uint8_t *flags)
{
    uint64_t ent[512];

    for (size_t done = 0; done < n;) {
        size_t k = MIN(n - done, G_N_ELEMENTS(ent));
        off_t off = ((uintptr_t)addr / DEDUP_PAGE + done) * sizeof(uint64_t);
        ssize_t got = pread(e->pagemap_fd, ent, k * sizeof(uint64_t), off);

        if (got != (ssize_t)(k * sizeof(uint64_t))) {
            return got < 0 ? -errno : -EIO;
        }
        for (size_t i = 0; i < k; i++) {
            flags[done + i] = (ent[i] & PM_ENTRY_PRESENT ? PM_PRESENT : 0) |
                              (ent[i] & PM_ENTRY_FILE ? PM_FILE : 0);
        }
        done += k;
    }
    return 0;
}

int pagemap_flags(DedupEngine *e, const uint8_t *addr, size_t n, uint8_t *flags)
{
    return e->pagemap_scan ? flags_by_scan(e, addr, n, flags)
                           : flags_by_read(e, addr, n, flags);
}

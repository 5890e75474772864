/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * A domain's pool: its memory and its slot allocator (see pool.h).
 *
 * Protection (ARCHITECTURE I1): the inode is chmod 0400 right after it is
 * created, so a client running as another user cannot reopen it writable
 * through /proc, truncate, punch or chmod it; the read-only descriptor it
 * gets still allows MAP_PRIVATE read-write mappings, whose writes copy.
 * Seals are not used: F_SEAL_FUTURE_WRITE would forbid our own punching.
 *
 * Slots are handed out lowest-first in runs, so a client that merges a run
 * of consecutive pages gets consecutive slots and can map them as one VMA.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "pool.h"
#include "qdedup/protocol.h"

static gboolean map_pool(Pool *p, uint64_t max_slots, GError **errp)
{
    struct stat st;

    p->max_slots = max_slots;
    p->map = mmap(NULL, max_slots * QD_PAGE_SIZE, PROT_READ | PROT_WRITE,
                  MAP_SHARED | MAP_NORESERVE, p->fd, 0);
    if (p->map == MAP_FAILED) {
        p->map = NULL;
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "cannot map the pool (%" G_GUINT64_FORMAT " slots): %s",
                    max_slots, g_strerror(errno));
        return FALSE;
    }
    /* A core dump of the broker must hold no guest page. */
    madvise(p->map, max_slots * QD_PAGE_SIZE, MADV_DONTDUMP);
    if (fstat(p->fd, &st) == 0) {
        p->dev = st.st_dev;
        p->ino = st.st_ino;
    }
    return TRUE;
}

static int reopen(int fd, int flags)
{
    char path[64];

    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    return open(path, flags | O_CLOEXEC);
}

gboolean pool_create(Pool *p, uint64_t max_slots, GError **errp)
{
    memset(p, 0, sizeof(*p));
    p->ro_fd = -1;
    p->fd = memfd_create("qemu-dedup-pool", MFD_CLOEXEC);
    if (p->fd < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "memfd_create: %s", g_strerror(errno));
        return FALSE;
    }
    if (ftruncate(p->fd, max_slots * QD_PAGE_SIZE) < 0 || fchmod(p->fd, 0400) < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "cannot size or protect the pool: %s", g_strerror(errno));
        close(p->fd);
        return FALSE;
    }
    p->ro_fd = reopen(p->fd, O_RDONLY);
    if (p->ro_fd < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "cannot open the pool read-only: %s", g_strerror(errno));
        close(p->fd);
        return FALSE;
    }
    if (!map_pool(p, max_slots, errp)) {
        close(p->ro_fd);
        close(p->fd);
        return FALSE;
    }
    return TRUE;
}

/*
 * Calls fn for every slot that holds data: SEEK_DATA/SEEK_HOLE walk the
 * populated ranges only, as the pool is sparse.
 */
static void foreach_populated(Pool *p, void (*fn)(Pool *, uint64_t, void *), void *opaque)
{
    off_t pos = 0, end = (off_t)(p->max_slots * QD_PAGE_SIZE);

    while (pos < end) {
        off_t data = lseek(p->fd, pos, SEEK_DATA), hole;

        if (data < 0) {
            break;
        }
        hole = lseek(p->fd, data, SEEK_HOLE);
        if (hole < 0) {
            hole = end;
        }
        for (uint64_t s = data / QD_PAGE_SIZE; s * QD_PAGE_SIZE < (uint64_t)hole; s++) {
            fn(p, s, opaque);
        }
        pos = hole;
    }
}

static void hold_one(Pool *p, uint64_t slot, void *opaque)
{
    bitmap_set(&p->held, slot);
    p->nheld++;
}

gboolean pool_adopt(Pool *p, int ro_fd, uint64_t max_slots, GError **errp)
{
    struct stat st;
    int rw;

    memset(p, 0, sizeof(*p));
    p->fd = p->ro_fd = -1;
    if (fstat(ro_fd, &st) < 0 || (uint64_t)st.st_size != max_slots * QD_PAGE_SIZE) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "the handed-back pool has %" G_GUINT64_FORMAT " bytes, the "
                    "configured maximum is %" G_GUINT64_FORMAT,
                    (uint64_t)st.st_size, max_slots * QD_PAGE_SIZE);
        return FALSE;
    }
    /* The owner may chmod: reopen writable, then protect again. */
    if (fchmod(ro_fd, 0600) < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "cannot reopen the handed-back pool: %s", g_strerror(errno));
        return FALSE;
    }
    rw = reopen(ro_fd, O_RDWR);
    if (fchmod(ro_fd, 0400) < 0 || rw < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "cannot reopen the handed-back pool: %s", g_strerror(errno));
        if (rw >= 0) {
            close(rw);
        }
        return FALSE;
    }
    p->fd = rw;
    if (!map_pool(p, max_slots, errp)) {
        close(rw);
        p->fd = -1;
        return FALSE;
    }
    p->ro_fd = ro_fd;
    foreach_populated(p, hold_one, NULL);
    return TRUE;
}

void pool_destroy(Pool *p)
{
    if (p->map) {
        munmap(p->map, p->max_slots * QD_PAGE_SIZE);
    }
    if (p->fd >= 0) {
        close(p->fd);
    }
    if (p->ro_fd >= 0) {
        close(p->ro_fd);
    }
    bitmap_free(&p->used);
    bitmap_free(&p->held);
    memset(p, 0, sizeof(*p));
    p->fd = p->ro_fd = -1;
}

static void mark(Pool *p, uint64_t slot)
{
    bitmap_set(&p->used, slot);
    p->nused++;
    if (slot >= p->high_water) {
        p->high_water = slot + 1;
    }
}

static gboolean taken(const Pool *p, uint64_t slot)
{
    return bitmap_test(&p->used, slot) || bitmap_test(&p->held, slot);
}

uint64_t pool_alloc_run(Pool *p, uint32_t n)
{
    uint64_t start = p->low_free, len = 0;

    if (n == 0 || n > p->max_slots) {
        return POOL_NO_SLOT;
    }
    for (uint64_t i = p->low_free; i < p->max_slots; i++) {
        /* Skip whole used words quickly. */
        if (i % 64 == 0 &&
            (bitmap_word(&p->used, i / 64) | bitmap_word(&p->held, i / 64)) == UINT64_MAX) {
            i += 63;
            len = 0;
            continue;
        }
        if (taken(p, i)) {
            len = 0;
            continue;
        }
        if (len++ == 0) {
            start = i;
        }
        if (len == n) {
            gboolean from_low = start == p->low_free;

            for (uint64_t s = start; s < start + n; s++) {
                mark(p, s);
            }
            if (from_low) {
                p->low_free = start + n;
            }
            return start;
        }
    }
    return POOL_NO_SLOT;
}

gboolean pool_claim(Pool *p, uint64_t slot)
{
    if (!pool_slot_held(p, slot) || pool_slot_used(p, slot)) {
        return FALSE;
    }
    mark(p, slot);
    return TRUE;
}

static void punch(Pool *p, uint64_t slot)
{
    if (fallocate(p->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  (off_t)(slot * QD_PAGE_SIZE), QD_PAGE_SIZE) < 0) {
        /* The slot is still freed for reuse; its memory stays until then. */
        g_warning("pool: cannot punch slot %" G_GUINT64_FORMAT ": %s",
                  slot, g_strerror(errno));
    }
}

void pool_free(Pool *p, uint64_t slot)
{
    if (!pool_slot_used(p, slot)) {
        return;
    }
    bitmap_clear(&p->used, slot);
    p->nused--;
    if (bitmap_test(&p->held, slot)) {
        /* A client that has not restored yet may map it: the sweep decides. */
        return;
    }
    punch(p, slot);
    if (slot < p->low_free) {
        p->low_free = slot;
    }
}

uint64_t pool_resident_bytes(const Pool *p)
{
    struct stat st;

    return fstat(p->fd, &st) == 0 ? (uint64_t)st.st_blocks * 512 : 0;
}

void pool_unhold(Pool *p, uint64_t slot)
{
    if (!pool_slot_held(p, slot)) {
        return;
    }
    bitmap_clear(&p->held, slot);
    if (--p->nheld == 0) {
        bitmap_free(&p->held);
    }
}

void pool_punch_held(Pool *p, uint64_t slot)
{
    if (!pool_slot_held(p, slot) || pool_slot_used(p, slot)) {
        return;
    }
    punch(p, slot);
    pool_unhold(p, slot);
    if (slot < p->low_free) {
        p->low_free = slot;
    }
}

uint64_t pool_bitmap_bytes(const Pool *p)
{
    return bitmap_bytes(&p->used) + bitmap_bytes(&p->held);
}

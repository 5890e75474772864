/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The pool's memory and its slot allocator (see pool.h).
 *
 * Protection (ARCHITECTURE I1): the inode is chmod 0400 right after it is
 * created, so a client running as another user cannot reopen it writable
 * through /proc, truncate, punch or chmod it; the read-only descriptors it
 * gets still allow MAP_PRIVATE read-write mappings, whose writes copy.
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

#define BITS 64

static gboolean bit(const uint64_t *map, uint64_t i)
{
    return map[i / BITS] >> (i % BITS) & 1;
}

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
    p->used = g_new0(uint64_t, (max_slots + BITS - 1) / BITS);
    if (fstat(p->fd, &st) == 0) {
        p->dev = st.st_dev;
        p->ino = st.st_ino;
    }
    return TRUE;
}

gboolean pool_create(Pool *p, uint64_t max_slots, GError **errp)
{
    memset(p, 0, sizeof(*p));
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
    if (!map_pool(p, max_slots, errp)) {
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
    p->held[slot / BITS] |= 1ull << (slot % BITS);
}

/*
 * A client of the previous broker may map any slot that holds data.  Until
 * the sweep, none of them is handed out again or punched, even when the
 * clients that restored it let go of it: one that has not restored yet may
 * still map it, and would see its merged pages change or read zeros.
 */
static void hold_populated(Pool *p)
{
    p->held = g_new0(uint64_t, (p->max_slots + BITS - 1) / BITS);
    foreach_populated(p, hold_one, NULL);
}

gboolean pool_adopt(Pool *p, int fd, uint64_t max_slots, GError **errp)
{
    char path[64], link[128];
    struct stat st;
    ssize_t n;
    int rw;

    memset(p, 0, sizeof(*p));
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    n = readlink(path, link, sizeof(link) - 1);
    link[n > 0 ? n : 0] = 0;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) ||
        !g_str_has_prefix(link, "/memfd:qemu-dedup-pool")) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "the handed-back descriptor is not a qdedup pool (%s)", link);
        return FALSE;
    }
    if (st.st_uid != geteuid()) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_PERM,
                    "the handed-back pool belongs to uid %u, not to the broker (%u)",
                    (unsigned)st.st_uid, (unsigned)geteuid());
        return FALSE;
    }
    if ((uint64_t)st.st_size != max_slots * QD_PAGE_SIZE) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "the handed-back pool has %" G_GUINT64_FORMAT " bytes, the "
                    "configured maximum is %" G_GUINT64_FORMAT,
                    (uint64_t)st.st_size, max_slots * QD_PAGE_SIZE);
        return FALSE;
    }
    /* Owner may chmod; reopen writable; protect again. */
    if (fchmod(fd, 0600) < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "cannot reopen the handed-back pool: %s", g_strerror(errno));
        return FALSE;
    }
    rw = open(path, O_RDWR | O_CLOEXEC);
    if (rw < 0 || fchmod(rw, 0400) < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "cannot reopen the handed-back pool: %s", g_strerror(errno));
        if (rw >= 0) {
            close(rw);
        }
        fchmod(fd, 0400);
        return FALSE;
    }
    p->fd = rw;
    if (!map_pool(p, max_slots, errp)) {
        close(rw);
        return FALSE;
    }
    hold_populated(p);
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
    g_free(p->used);
    g_free(p->held);
    memset(p, 0, sizeof(*p));
    p->fd = -1;
}

int pool_open_readonly(Pool *p, GError **errp)
{
    char path[64];
    int fd;

    snprintf(path, sizeof(path), "/proc/self/fd/%d", p->fd);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "cannot open the pool read-only: %s", g_strerror(errno));
    }
    return fd;
}

static void mark(Pool *p, uint64_t slot)
{
    p->used[slot / BITS] |= 1ull << (slot % BITS);
    p->nused++;
    if (slot >= p->high_water) {
        p->high_water = slot + 1;
    }
}

static uint64_t taken_word(const Pool *p, uint64_t w)
{
    return p->used[w] | (p->held ? p->held[w] : 0);
}

static gboolean taken(const Pool *p, uint64_t slot)
{
    return bit(p->used, slot) || (p->held && bit(p->held, slot));
}

uint64_t pool_alloc_run(Pool *p, uint32_t n)
{
    uint64_t start = p->low_free, len = 0;

    if (n == 0 || n > p->max_slots) {
        return POOL_NO_SLOT;
    }
    for (uint64_t i = p->low_free; i < p->max_slots; i++) {
        /* Skip whole used words quickly. */
        if (i % BITS == 0 && taken_word(p, i / BITS) == UINT64_MAX) {
            i += BITS - 1;
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
    if (slot >= p->max_slots || bit(p->used, slot)) {
        return FALSE;
    }
    mark(p, slot);
    return TRUE;
}

gboolean pool_slot_used(const Pool *p, uint64_t slot)
{
    return slot < p->max_slots && bit(p->used, slot);
}

void pool_free(Pool *p, uint64_t slot)
{
    g_assert(pool_slot_used(p, slot));
    if (p->held && bit(p->held, slot)) {
        /* A client that has not restored yet may map it: the sweep decides. */
        p->used[slot / BITS] &= ~(1ull << (slot % BITS));
        p->nused--;
        return;
    }
    if (fallocate(p->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  (off_t)(slot * QD_PAGE_SIZE), QD_PAGE_SIZE) < 0) {
        /* The slot is still freed for reuse; its memory stays until then. */
        g_warning("pool: cannot punch slot %" G_GUINT64_FORMAT ": %s",
                  slot, g_strerror(errno));
    }
    p->used[slot / BITS] &= ~(1ull << (slot % BITS));
    p->nused--;
    if (slot < p->low_free) {
        p->low_free = slot;
    }
}

uint64_t pool_resident_bytes(const Pool *p)
{
    struct stat st;

    return fstat(p->fd, &st) == 0 ? (uint64_t)st.st_blocks * 512 : 0;
}

static void punch_unused_one(Pool *p, uint64_t slot, void *opaque)
{
    uint64_t *punched = opaque;

    if (!bit(p->used, slot)) {
        fallocate(p->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  (off_t)(slot * QD_PAGE_SIZE), QD_PAGE_SIZE);
        (*punched)++;
    }
}

uint64_t pool_punch_unused(Pool *p)
{
    uint64_t punched = 0;

    foreach_populated(p, punch_unused_one, &punched);
    g_clear_pointer(&p->held, g_free);
    p->low_free = 0;
    return punched;
}

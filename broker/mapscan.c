/* SPDX-License-Identifier: GPL-2.0-or-later */
/* Private mappings of pool inodes, from /proc/PID/maps (see mapscan.h). */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "mapscan.h"
#include "qdedup/protocol.h"

MapScan *mapscan_new(void)
{
    MapScan *s = g_new0(MapScan, 1);

    s->pools = g_array_new(FALSE, FALSE, sizeof(MapScanPool));
    s->ranges = g_array_new(FALSE, FALSE, sizeof(MapRange));
    s->unreadable = g_array_new(FALSE, FALSE, sizeof(pid_t));
    return s;
}

void mapscan_free(MapScan *s)
{
    g_array_free(s->pools, TRUE);
    g_array_free(s->ranges, TRUE);
    g_array_free(s->unreadable, TRUE);
    g_free(s);
}

/* "start-end perms offset major:minor inode path" */
static void scan_line(MapScan *s, pid_t pid, const char *line)
{
    unsigned long long start, end, offset, ino;
    unsigned int major, minor;
    char perms[8];

    if (sscanf(line, "%llx-%llx %7s %llx %x:%x %llu", &start, &end, perms, &offset,
               &major, &minor, &ino) != 7 || ino == 0 || perms[3] != 'p') {
        return;
    }
    for (guint i = 0; i < s->pools->len; i++) {
        MapScanPool *p = &g_array_index(s->pools, MapScanPool, i);

        if (p->ino == ino && p->dev == makedev(major, minor)) {
            MapRange r = { pid, i, offset / QD_PAGE_SIZE,
                           (end - start + QD_PAGE_SIZE - 1) / QD_PAGE_SIZE };

            g_array_append_val(s->ranges, r);
        }
    }
}

static gint cmp_range(gconstpointer a, gconstpointer b)
{
    const MapRange *x = a, *y = b;

    if (x->pool != y->pool) {
        return x->pool < y->pool ? -1 : 1;
    }
    return x->first < y->first ? -1 : x->first > y->first;
}

/*
 * One process's ranges from index `from` on, sorted and merged: however
 * many VMAs it maps the pool with (a hostile one may map all of it 65,000
 * times), the sweep then looks at each slot at most once per process.
 */
static void coalesce(MapScan *s, guint from)
{
    MapRange *r = &g_array_index(s->ranges, MapRange, from);
    guint n = s->ranges->len - from, out = 0;

    if (n < 2) {
        return;
    }
    qsort(r, n, sizeof(*r), (int (*)(const void *, const void *))cmp_range);
    for (guint i = 1; i < n; i++) {
        MapRange *last = &r[out];

        if (r[i].pool == last->pool && r[i].first <= last->first + last->n) {
            last->n = MAX(last->n, r[i].first + r[i].n - last->first);
        } else {
            r[++out] = r[i];
        }
    }
    g_array_set_size(s->ranges, from + out + 1);
}

static void scan_pid(MapScan *s, pid_t pid, char *buf, size_t size)
{
    guint from = s->ranges->len;

    char path[64];
    size_t have = 0;
    ssize_t n;
    int fd;

    snprintf(path, sizeof(path), "/proc/%d/maps", (int)pid);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        if (errno != ENOENT && errno != ESRCH) {
            g_array_append_val(s->unreadable, pid);
        }
        return;
    }
    for (;;) {
        char *nl, *line;

        n = read(fd, buf + have, size - 1 - have);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0) {
            if (errno != ESRCH && errno != ENOENT) {
                g_array_append_val(s->unreadable, pid);
            }
            break;
        }
        have += n;
        buf[have] = 0;
        line = buf;
        while ((nl = strchr(line, '\n'))) {
            *nl = 0;
            scan_line(s, pid, line);
            line = nl + 1;
        }
        if (n == 0) {
            if (*line) {
                scan_line(s, pid, line);
            }
            break;
        }
        have = buf + have - line;
        memmove(buf, line, have);
        if (have >= size - 1) {
            have = 0;       /* a line longer than the buffer: not ours */
        }
    }
    close(fd);
    coalesce(s, from);
}

void mapscan_run(MapScan *s)
{
    const size_t size = 1 << 16;
    g_autofree char *buf = g_malloc(size);
    DIR *dir = opendir("/proc");
    pid_t self = getpid();
    struct dirent *de;

    if (!dir) {
        g_array_append_val(s->unreadable, self);
        return;
    }
    while ((de = readdir(dir))) {
        char *end;
        long pid = strtol(de->d_name, &end, 10);

        if (*end || pid <= 0 || pid == self) {
            continue;
        }
        scan_pid(s, pid, buf, size);
    }
    closedir(dir);
}

typedef struct ScanJob {
    MapScan *scan;
    void (*done)(MapScan *, gpointer);
    gpointer opaque;
} ScanJob;

static gboolean scan_done(gpointer opaque)
{
    ScanJob *j = opaque;

    j->done(j->scan, j->opaque);
    g_free(j);
    return G_SOURCE_REMOVE;
}

static gpointer scan_thread(gpointer opaque)
{
    ScanJob *j = opaque;

    mapscan_run(j->scan);
    g_idle_add(scan_done, j);
    return NULL;
}

void mapscan_start(MapScan *scan, void (*done)(MapScan *, gpointer), gpointer opaque)
{
    ScanJob *j = g_new(ScanJob, 1);

    j->scan = scan;
    j->done = done;
    j->opaque = opaque;
    g_thread_unref(g_thread_new("dedup-mapscan", scan_thread, j));
}

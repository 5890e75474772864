/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The engine's userfaultfd: write-protect mode over all covered RAM.
 *
 * The merger protects a batch of pages, compares, remaps and wakes, all
 * under e->wp_lock (merge.c).  A guest write in that window blocks in the
 * kernel until the wake, then retries on the new mapping (I3).  The fault
 * loop below only mops up: an event it reads is either stale (the merger has
 * already woken that writer) or left over by an error path, and in both
 * cases unprotecting and waking is right.  It takes e->wp_lock so that it
 * never unprotects a page in the middle of a merge.
 *
 * I6: the fault loop takes no other lock, never the BQL, and never touches
 * guest memory; nothing that holds wp_lock waits for a vCPU or I/O thread.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "engine-internal.h"

#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif
#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1 << 12)
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif

static int uffd_open_fd(void)
{
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    int fd;

    if (dev >= 0) {
        fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
        close(dev);
        if (fd >= 0) {
            return fd;
        }
    }
    fd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    return fd < 0 ? -errno : fd;
}

int uffd_setup(DedupEngine *e, char **errmsg)
{
    struct uffdio_api api = { .api = UFFD_API };
    /* Merged pages are MAP_PRIVATE memfd (shmem) mappings: WP there too. */
    uint64_t want = UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_HUGETLBFS_SHMEM |
                    UFFD_FEATURE_WP_UNPOPULATED;
    int fd = uffd_open_fd();

    if (fd < 0) {
        *errmsg = g_strdup_printf("cannot open a userfaultfd: %s (a QEMU not running as "
                                  "root needs access to /dev/userfaultfd)",
                                  g_strerror(-fd));
        return -1;
    }
    /* Ask for what we want; older kernels refuse unknown features. */
    api.features = want;
    if (ioctl(fd, UFFDIO_API, &api) < 0) {
        close(fd);
        fd = uffd_open_fd();
        api = (struct uffdio_api) { .api = UFFD_API,
                                    .features = UFFD_FEATURE_PAGEFAULT_FLAG_WP |
                                                UFFD_FEATURE_WP_HUGETLBFS_SHMEM };
        if (fd < 0 || ioctl(fd, UFFDIO_API, &api) < 0) {
            *errmsg = g_strdup_printf("userfaultfd write-protect is not supported "
                                      "by this kernel: %s", g_strerror(errno));
            if (fd >= 0) {
                close(fd);
            }
            return -1;
        }
    }
    e->uffd = fd;
    e->uffd_features = api.features;
    return 0;
}

int uffd_register_wp(DedupEngine *e, void *addr, size_t len)
{
    struct uffdio_register reg = {
        .range = { (uintptr_t)addr, len },
        .mode = UFFDIO_REGISTER_MODE_WP,
    };

    return ioctl(e->uffd, UFFDIO_REGISTER, &reg) < 0 ? -errno : 0;
}

/* wp=false also wakes the writers blocked on the range. */
int uffd_protect(DedupEngine *e, void *addr, size_t len, bool wp)
{
    struct uffdio_writeprotect p = {
        .range = { (uintptr_t)addr, len },
        .mode = wp ? UFFDIO_WRITEPROTECT_MODE_WP : 0,
    };

    return ioctl(e->uffd, UFFDIO_WRITEPROTECT, &p) < 0 ? -errno : 0;
}

void uffd_wake(DedupEngine *e, void *addr, size_t len)
{
    struct uffdio_range r = { (uintptr_t)addr, len };

    ioctl(e->uffd, UFFDIO_WAKE, &r);
}

void dedup_engine_run_faults(DedupEngine *e)
{
    struct pollfd pfd[2] = { { e->uffd, POLLIN, 0 }, { e->stop_fd, POLLIN, 0 } };
    struct uffd_msg msg[64];

    for (;;) {
        ssize_t n;

        if (poll(pfd, 2, -1) < 0 && errno != EINTR) {
            break;
        }
        if (pfd[1].revents) {
            break;
        }
        n = read(e->uffd, msg, sizeof(msg));
        if (n <= 0) {
            continue;
        }
        g_mutex_lock(&e->wp_lock);
        for (size_t i = 0; i < n / sizeof(msg[0]); i++) {
            uint64_t page;

            if (msg[i].event != UFFD_EVENT_PAGEFAULT ||
                !(msg[i].arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP)) {
                continue;
            }
            /* Idempotent: a duplicate event unprotects an unprotected page. */
            page = msg[i].arg.pagefault.address & ~(uint64_t)(DEDUP_PAGE - 1);
            uffd_protect(e, (void *)(uintptr_t)page, DEDUP_PAGE, false);
            __atomic_add_fetch(&e->st.wp_faults, 1, __ATOMIC_RELAXED);
        }
        g_mutex_unlock(&e->wp_lock);
        __atomic_store_n(&e->cpu_ns_faults, thread_cpu_ns(), __ATOMIC_RELAXED);
    }
    __atomic_store_n(&e->cpu_ns_faults, thread_cpu_ns(), __ATOMIC_RELAXED);
}

/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * What the kernel can tell the broker about a client process, without the
 * client sending anything it could forge: whether it still runs (pidfd),
 * whether a descriptor in its table is a given pool (kcmp), and a copy of
 * that descriptor (pidfd_getfd).  Clients never send descriptors (the client
 * socket refuses them, SO_PASSRIGHTS): closing a descriptor a peer chose
 * (a TCP socket with SO_LINGER, a file of a FUSE server that never answers)
 * can block, and the broker's one thread must never block on a client.
 *
 * Looking into another user's process needs root or CAP_SYS_PTRACE.
 */
#ifndef QDEDUP_BROKER_PEER_H
#define QDEDUP_BROKER_PEER_H

#include <glib.h>
#include <stdint.h>
#include <sys/types.h>

/* A pidfd for the peer of sock (SO_PEERPIDFD, else pidfd_open); -1 if none. */
int peer_pidfd(int sock, pid_t pid);
/* FALSE once the process has exited. */
gboolean peer_pidfd_alive(int pidfd);

/*
 * Is descriptor their_fd of process pid the same open file as our_fd?
 * (Every client of a domain is given the same read-only description.)
 */
gboolean peer_holds_file(int pidfd, pid_t pid, uint32_t their_fd, int our_fd);

/*
 * A copy of descriptor their_fd of the process, if it is the pool memfd
 * (dev, ino) owned by the broker's user; -1 with *msg otherwise.  A copy
 * that turns out to be something else is closed on the closer thread.
 */
int peer_take_pool(int pidfd, pid_t pid, uint32_t their_fd, uint64_t dev, uint64_t ino,
                   uid_t uid, char **msg);

/*
 * The process's start time (/proc/PID/stat, clock ticks since boot): with
 * the pid it names one process for good.  0 if it cannot be read.
 */
uint64_t peer_start_time(pid_t pid);

/* Close fd on the closer thread: a peer's file may take long to close. */
void peer_close_later(int fd, uid_t uid);
/* Descriptors of uid still waiting to be closed. */
guint peer_closes_pending(uid_t uid);

#endif

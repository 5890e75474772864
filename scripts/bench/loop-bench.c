/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The broker's request loop alone: glib (poll, one recv and one send per
 * request, as broker/server.c) against io_uring (recvmsg and sendmsg
 * submitted as SQEs, all clients reaped per io_uring_enter).  Each request
 * is a full 1024-hash LOOKUP decoded with the real codec and answered with
 * a 1024-result reply, so only the index work is missing; broker-inproc
 * measures that part.  Prints the server's CPU per request for each loop.
 *
 *   loop-bench glib|uring [clients] [seconds]
 */
#define _GNU_SOURCE
#include <glib-unix.h>
#include <liburing.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "qdedup/protocol.h"

#define MAX_CLIENTS 64

typedef struct Conn {
    int sock;
    uint8_t in[QD_SMALL_MSG_MAX];
    uint8_t out[QD_SMALL_MSG_MAX];
    struct iovec iov;
    struct msghdr mh;
} Conn;

static Conn conns[MAX_CLIENTS];
static uint64_t served;
static gboolean stopping;

/* The framing work every loop does: decode the request, encode the reply. */
static size_t answer(Conn *c, size_t len)
{
    static QdResult r[QD_MAX_LOOKUP];
    QdMessage m;

    if (qd_decode(c->in, len, &m) || m.hdr.type != QD_MSG_LOOKUP) {
        fprintf(stderr, "bad request\n");
        exit(1);
    }
    served++;
    return qd_encode_results(c->out, sizeof(c->out), QD_MSG_LOOKUP_REPLY, m.hdr.seq,
                             r, m.u.array.count);
}

static gboolean on_glib_client(int sock, GIOCondition cond, gpointer opaque)
{
    Conn *c = opaque;

    for (int i = 0; i < 32; i++) {
        ssize_t n = recv(sock, c->in, sizeof(c->in), 0);

        if (n <= 0) {
            return n == 0 ? G_SOURCE_REMOVE : G_SOURCE_CONTINUE;
        }
        send(sock, c->out, answer(c, n), MSG_DONTWAIT);
    }
    return G_SOURCE_CONTINUE;
}

static void run_glib(int nclients)
{
    GMainContext *ctx = g_main_context_default();

    for (int i = 0; i < nclients; i++) {
        g_unix_set_fd_nonblocking(conns[i].sock, TRUE, NULL);
        g_unix_fd_add(conns[i].sock, G_IO_IN, on_glib_client, &conns[i]);
    }
    while (!stopping) {
        g_main_context_iteration(ctx, TRUE);
    }
}

static void prep_recv(struct io_uring *ring, Conn *c)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(ring);

    c->iov = (struct iovec) { c->in, sizeof(c->in) };
    c->mh = (struct msghdr) { .msg_iov = &c->iov, .msg_iovlen = 1 };
    io_uring_prep_recvmsg(sqe, c->sock, &c->mh, 0);
    io_uring_sqe_set_data64(sqe, (uint64_t)(c - conns) << 1);
}

static void prep_send(struct io_uring *ring, Conn *c, size_t len)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(ring);

    io_uring_prep_send(sqe, c->sock, c->out, len, MSG_DONTWAIT);
    io_uring_sqe_set_data64(sqe, (uint64_t)(c - conns) << 1 | 1);
}

static void run_uring(int nclients)
{
    struct io_uring ring;
    int live = nclients;

    if (io_uring_queue_init(4 * MAX_CLIENTS, &ring, 0) < 0) {
        perror("io_uring_queue_init");
        exit(1);
    }
    for (int i = 0; i < nclients; i++) {
        prep_recv(&ring, &conns[i]);
    }
    while (live > 0) {
        struct io_uring_cqe *cqe;
        unsigned head, seen = 0;

        if (io_uring_submit_and_wait(&ring, 1) < 0 && !stopping) {
            continue;
        }
        io_uring_for_each_cqe(&ring, head, cqe) {
            uint64_t tag = io_uring_cqe_get_data64(cqe);
            Conn *c = &conns[tag >> 1];

            seen++;
            if (tag & 1) {
                continue;           /* a send completed */
            }
            if (cqe->res <= 0) {
                live--;
                continue;
            }
            /* The send is queued before the next receive: order kept per socket. */
            prep_send(&ring, c, answer(c, cqe->res));
            prep_recv(&ring, c);
        }
        io_uring_cq_advance(&ring, seen);
    }
    io_uring_queue_exit(&ring);
}

static void client(int sock, double seconds)
{
    static QdLookupEntry e[QD_MAX_LOOKUP];
    static uint8_t req[QD_SMALL_MSG_MAX], rep[QD_SMALL_MSG_MAX];
    gint64 end = g_get_monotonic_time() + seconds * G_USEC_PER_SEC;

    for (uint32_t seq = 1; g_get_monotonic_time() < end; seq++) {
        size_t len = qd_encode_lookup(req, sizeof(req), seq, e, QD_MAX_LOOKUP);

        if (send(sock, req, len, 0) != (ssize_t)len || recv(sock, rep, sizeof(rep), 0) <= 0) {
            exit(1);
        }
    }
    exit(0);
}

static void on_child_exit(int sig)
{
    stopping = TRUE;
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "glib";
    int nclients = argc > 2 ? atoi(argv[2]) : 4;
    double seconds = argc > 3 ? g_ascii_strtod(argv[3], NULL) : 3;
    struct rusage ru;
    gint64 start;
    double cpu, wall;

    if (nclients < 1 || nclients > MAX_CLIENTS ||
        (strcmp(mode, "glib") && strcmp(mode, "uring"))) {
        fprintf(stderr, "usage: loop-bench glib|uring [clients 1-%d] [seconds]\n",
                MAX_CLIENTS);
        return 2;
    }
    signal(SIGCHLD, on_child_exit);
    start = g_get_monotonic_time();
    for (int i = 0; i < nclients; i++) {
        int sv[2];

        if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) {
            perror("socketpair");
            return 1;
        }
        if (fork() == 0) {
            close(sv[0]);
            client(sv[1], seconds);
        }
        close(sv[1]);
        conns[i].sock = sv[0];
    }
    if (!strcmp(mode, "glib")) {
        run_glib(nclients);
        /* Serve whoever is still sending until all have finished. */
        for (int i = 0; i < nclients; i++) {
            g_unix_set_fd_nonblocking(conns[i].sock, FALSE, NULL);
        }
    } else {
        run_uring(nclients);
    }
    wall = (g_get_monotonic_time() - start) / 1e6;
    getrusage(RUSAGE_SELF, &ru);
    cpu = ru.ru_utime.tv_sec + ru.ru_stime.tv_sec +
          (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
    printf("loop %s clients %d requests %llu wall %.2f s server-cpu %.3f s "
           "cpu-per-request %.2f us requests/cpu-s %.0f lookups/cpu-s %.2f M\n",
           mode, nclients, (unsigned long long)served, wall, cpu, cpu * 1e6 / served,
           served / cpu, served * QD_MAX_LOOKUP / cpu / 1e6);
    for (int i = 0; i < nclients; i++) {
        close(conns[i].sock);
    }
    while (wait(NULL) > 0) {
    }
    return 0;
}

/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The client socket: accept, authenticate (SO_PEERCRED), receive one
 * packet at a time, hand it to ops.c, reply.  Single-threaded on the glib
 * main loop: an io_uring loop was measured and did not beat it
 * (scripts/bench/loop-bench.c, docs/broker.md).
 *
 * No client can stall it (its clients are adversaries):
 *  - every socket refuses descriptors (SO_PASSRIGHTS = 0, inherited from the
 *    listening socket): closing a file a peer chose can block for as long
 *    as the peer likes (SO_LINGER, a FUSE server that never answers), so
 *    the broker never holds one; the pool is taken back through /proc
 *    instead (peer.c);
 *  - replies are sent without waiting: a client that does not read them is
 *    dropped;
 *  - per-uid limits on connections and on connections that have not said
 *    HELLO, a handshake timeout, failed authentications rate-limited per
 *    uid, and a total bounded by RLIMIT_NOFILE so that descriptors never
 *    run out; if they do anyway, accepting pauses instead of spinning.
 *
 * A client that sends anything malformed is dropped; its references stay
 * until its process exits (broker.h).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <glib-unix.h>
#include <poll.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include "qdedup/transport.h"
#include "activation.h"
#include "peer.h"
#include "server.h"

#ifndef SO_PASSRIGHTS
#define SO_PASSRIGHTS 83
#endif
#ifndef SCM_MAX_FD
#define SCM_MAX_FD 253
#endif

#define PACKETS_PER_WAKEUP 32
#define FD_RESERVE 64           /* descriptors kept for the control socket, logs, pools */
#define ACCEPT_PAUSE_MS 250     /* out of descriptors: try again after this */
#define PENDING_CLOSES_MAX 4    /* a uid's descriptors waiting for the closer thread */

static uint8_t buf[QD_SMALL_MSG_MAX];
static uint8_t scratch_page[QD_PAGE_SIZE];
static QdResult results[QD_MAX_LOOKUP];

static void client_drop(Server *s, BrokerClient *c, const char *why);

static UidUsage *usage(Server *s, BrokerClient *c)
{
    return limits_uid(&s->limits, c->uid);
}

static gboolean send_reply(Server *s, BrokerClient *c, size_t len, int fd)
{
    int ret;

    if (len == 0) {
        g_critical("client %u: reply does not encode", c->id);
        return FALSE;
    }
    /* Non-blocking socket: a client that does not read its replies is dropped. */
    ret = qd_send(c->sock, buf, len, NULL, 0, fd);
    if (ret < 0) {
        client_drop(s, c, g_strerror(-ret));
        return FALSE;
    }
    return TRUE;
}

static gboolean send_error(Server *s, BrokerClient *c, uint32_t seq, uint32_t code,
                           const char *msg)
{
    if (s->broker->cfg->verbose) {
        g_message("client %u (pid %d): %s error: %s", c->id, (int)c->pid,
                  qd_error_name(code), msg);
    } else if (code == QD_ERR_PROTOCOL) {
        log_limited(&s->protocol_log, "client %u (pid %d uid %u): protocol error: %s",
                    c->id, (int)c->pid, (unsigned)c->uid, msg);
    }
    return send_reply(s, c, qd_encode_error(buf, sizeof(buf), seq, code, msg), -1);
}

static void protocol_error(Server *s, BrokerClient *c, uint32_t seq, const char *why)
{
    s->broker->stats.protocol_errors++;
    if (send_error(s, c, seq, QD_ERR_PROTOCOL, why)) {
        client_drop(s, c, why);
    }
}

static gboolean on_pid_exit(int fd, GIOCondition cond, gpointer opaque)
{
    BrokerClient *c = opaque;
    Server *s = c->server;

    c->pid_watch = 0;   /* this source ends as we return */
    if (s->broker->cfg->verbose) {
        g_message("client %u (pid %d) exited: %" G_GUINT64_FORMAT
                  " references released", c->id, (int)c->pid, c->refs.held);
    }
    broker_client_free(s->broker, c);
    return G_SOURCE_REMOVE;
}

/*
 * Close the connection.  Only ever called from within on_client() (or the
 * tick, which removes the watch itself), which sees sock < 0, stops, and
 * lets go of the client (client_gone) after it.  The socket never carried a
 * descriptor (SO_PASSRIGHTS), so closing it cannot block.
 */
static void client_drop(Server *s, BrokerClient *c, const char *why)
{
    UidUsage *u;

    if (c->sock < 0) {
        return;
    }
    if (s->broker->cfg->verbose) {
        g_message("client %u (pid %d) disconnected: %s", c->id, (int)c->pid, why);
    }
    u = usage(s, c);
    u->connections--;
    if (!c->domain) {
        u->handshakes--;
    }
    close(c->sock);
    c->sock = -1;
}

/* After the connection closed: keep the references while the process lives. */
static void client_gone(Server *s, BrokerClient *c)
{
    gboolean merged;

    c->watch = 0;
    if (broker_client_orphan(s->broker, c, &merged)) {
        if (c->pidfd >= 0) {
            c->pid_watch = g_unix_fd_add(c->pidfd, G_IO_IN, on_pid_exit, c);
        }
        /* else: server_tick retries pidfd_open until it can watch it. */
    } else if (!merged) {
        broker_client_free(s->broker, c);
    }
}

/* Orphans of uid: they count against uid-connections like connections. */
static guint orphans_of(Server *s, uid_t uid)
{
    GHashTableIter it;
    gpointer v;
    guint n = 0;

    g_hash_table_iter_init(&it, s->broker->clients);
    while (g_hash_table_iter_next(&it, NULL, &v)) {
        BrokerClient *c = v;

        n += c->sock < 0 && c->uid == uid;
    }
    return n;
}

/*
 * A process reconnecting may have closed its old connection an instant ago,
 * before we saw the end of stream: retire such connections now, so that
 * their references wait as an orphan for the new one (broker_hello).
 */
static void reap_closed(Server *s, BrokerClient *c)
{
    GHashTableIter it;
    gpointer v;
    GSList *closed = NULL;

    g_hash_table_iter_init(&it, s->broker->clients);
    while (g_hash_table_iter_next(&it, NULL, &v)) {
        BrokerClient *o = v;
        struct pollfd pfd = { .fd = o->sock, .events = POLLRDHUP };

        if (o != c && o->pid == c->pid && o->sock >= 0 &&
            poll(&pfd, 1, 0) == 1 && (pfd.revents & (POLLRDHUP | POLLHUP))) {
            closed = g_slist_prepend(closed, o);
        }
    }
    for (GSList *l = closed; l; l = l->next) {
        BrokerClient *o = l->data;

        g_source_remove(o->watch);
        client_drop(s, o, "closed before reconnecting");
        client_gone(s, o);
    }
    g_slist_free(closed);
}

static void handle_hello(Server *s, BrokerClient *c, const QdMessage *m, const GArray *groups)
{
    const QdHello *h = &m->u.hello;
    QdHelloReply reply = { 0 };
    g_autofree char *msg = NULL;
    gboolean auth_failed = FALSE, named = *h->domain;
    gint64 now = g_get_monotonic_time();
    guint wait_s = 0;
    int ro_fd = -1;
    int code;

    if (named && !limits_auth_allowed(&s->limits, c->uid, h->domain, now, &wait_s)) {
        /* Not even compared: a guesser gets auth-failures tries a minute. */
        msg = g_strdup_printf("too many failed authentications from uid %u: retry in %u s",
                              (unsigned)c->uid, wait_s);
        /* DENIED, so that the engine waits long before it tries again. */
        log_limited(&s->auth_log, "refused pid %d uid %u (domain '%s'): %s", (int)c->pid,
                    (unsigned)c->uid, h->domain, msg);
        s->broker->stats.auth_failures++;
        send_error(s, c, m->hdr.seq, QD_ERR_DENIED, msg);
        return;
    }
    if ((h->flags & QD_HELLO_RECONNECT) && peer_closes_pending(c->uid) >= PENDING_CLOSES_MAX) {
        send_error(s, c, m->hdr.seq, QD_ERR_RETRY,
                   "descriptors of this user are still being closed: retry in 1 s");
        return;
    }
    if (h->flags & QD_HELLO_RECONNECT) {
        reap_closed(s, c);
    }
    code = broker_hello(s->broker, c, h, groups, &reply, &ro_fd, &msg, &auth_failed);
    if (code) {
        if (auth_failed) {
            limits_auth_failed(&s->limits, c->uid, h->domain, now);
            s->broker->stats.auth_failures++;
            log_limited(&s->auth_log, "authentication failed: pid %d uid %u: %s",
                        (int)c->pid, (unsigned)c->uid, msg);
        }
        send_error(s, c, m->hdr.seq, code, msg);
        return;
    }
    usage(s, c)->handshakes--;
    if (s->broker->cfg->verbose) {
        g_message("client %u: pid %d uid %u '%s' joined %s '%s'%s", c->id,
                  (int)c->pid, (unsigned)c->uid, c->name,
                  *c->domain->name ? "domain" : "private domain",
                  *c->domain->name ? c->domain->name : c->name,
                  reply.flags & QD_REPLY_REFS_KEPT ? " (references kept)" : "");
    }
    /* ro_fd stays the domain's: the kernel gives the client its own copy. */
    send_reply(s, c, qd_encode_hello_reply(buf, sizeof(buf), m->hdr.seq, &reply), ro_fd);
}

/*
 * Descriptors in a packet: none can come (SO_PASSRIGHTS), unless the
 * kernel is older than 6.16 or a connection was queued before the broker
 * set the listening socket up.  Never close one here.
 */
static gboolean refuse_fds(Server *s, BrokerClient *c, struct msghdr *mh)
{
    gboolean any = FALSE;

    for (struct cmsghdr *cm = CMSG_FIRSTHDR(mh); cm; cm = CMSG_NXTHDR(mh, cm)) {
        if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS) {
            for (size_t i = 0; i < (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int); i++) {
                int fd;

                memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
                peer_close_later(fd, c->uid);
                any = TRUE;
            }
        }
    }
    if (any) {
        log_limited(&s->fd_log, "client %u (pid %d uid %u) sent descriptors: refused",
                    c->id, (int)c->pid, (unsigned)c->uid);
    }
    return any;
}

typedef union FdControl {
    char buf[CMSG_SPACE(sizeof(int) * SCM_MAX_FD)];
    struct cmsghdr align;
} FdControl;

/* PUBLISH: peek the metadata, then receive the pages straight into slots. */
static void handle_publish(Server *s, BrokerClient *c, size_t total)
{
    static uint8_t meta[QD_PUBLISH_META_SIZE(QD_MAX_PUBLISH)];
    static FdControl control;
    uint64_t dest[QD_MAX_PUBLISH];
    struct iovec iov[1 + QD_MAX_PUBLISH];
    struct msghdr mh = { .msg_iov = iov, .msg_control = control.buf,
                         .msg_controllen = sizeof(control.buf) };
    Pool *pool = c->domain ? &c->domain->pool : NULL;
    uint32_t count = UINT32_MAX;
    QdMessage m;
    ssize_t n;
    int err;

    n = recv(c->sock, meta, QD_HEADER_SIZE + 4, MSG_PEEK | MSG_DONTWAIT);
    if (n == QD_HEADER_SIZE + 4) {
        count = meta[16] | meta[17] << 8 | meta[18] << 16 | (uint32_t)meta[19] << 24;
    }
    if (count > QD_MAX_PUBLISH || total < QD_PUBLISH_META_SIZE(count)) {
        recv(c->sock, meta, 0, MSG_TRUNC | MSG_DONTWAIT);     /* discard the packet */
        protocol_error(s, c, 0, "PUBLISH count over the limit or truncated");
        return;
    }
    n = recv(c->sock, meta, QD_PUBLISH_META_SIZE(count), MSG_PEEK | MSG_DONTWAIT);
    err = n < 0 ? QD_DECODE_SHORT : qd_decode_publish_meta(meta, n, total, &m);
    if (err) {
        recv(c->sock, meta, 0, MSG_TRUNC | MSG_DONTWAIT);
        protocol_error(s, c, 0, qd_decode_strerror(err));
        return;
    }
    if (!pool) {
        recv(c->sock, meta, 0, MSG_TRUNC | MSG_DONTWAIT);
        send_error(s, c, m.hdr.seq, QD_ERR_STATE, "PUBLISH before HELLO");
        return;
    }
    broker_publish_plan(s->broker, c, &m, dest, results);
    iov[0] = (struct iovec) { meta, QD_PUBLISH_META_SIZE(count) };
    for (uint32_t i = 0; i < count; i++) {
        void *to = dest[i] == POOL_NO_SLOT ? scratch_page : pool_page(pool, dest[i]);

        iov[1 + i] = (struct iovec) { to, QD_PAGE_SIZE };
    }
    mh.msg_iovlen = 1 + count;
    do {
        n = recvmsg(c->sock, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    if (n >= 0 && refuse_fds(s, c, &mh)) {
        n = -1;
    }
    if (n != (ssize_t)total) {
        /* Never keep unchecked slots. */
        for (uint32_t i = 0; i < count; i++) {
            if (dest[i] != POOL_NO_SLOT) {
                pool_free(pool, dest[i]);
            }
        }
        protocol_error(s, c, m.hdr.seq, "PUBLISH receive failed");
        return;
    }
    broker_publish_commit(s->broker, c, &m, dest, results);
    send_reply(s, c, qd_encode_results(buf, sizeof(buf), QD_MSG_PUBLISH_REPLY,
                                       m.hdr.seq, results, count), -1);
}

static void handle_packet(Server *s, BrokerClient *c, size_t len, const GArray *groups)
{
    QdMessage m;
    int err = qd_decode(buf, len, &m);
    uint32_t type = m.hdr.type;

    if (err) {
        protocol_error(s, c, m.hdr.seq, qd_decode_strerror(err));
        return;
    }
    if (type == QD_MSG_HELLO) {
        handle_hello(s, c, &m, groups);
        return;
    }
    if (type != QD_MSG_LOOKUP && type != QD_MSG_UNREF && type != QD_MSG_RESTORE) {
        protocol_error(s, c, m.hdr.seq, "a client may not send this message type");
        return;
    }
    if (!c->domain) {
        send_error(s, c, m.hdr.seq, QD_ERR_STATE, "HELLO first");
        return;
    }
    switch (type) {
    case QD_MSG_LOOKUP:
        broker_lookup(s->broker, c, &m, results);
        send_reply(s, c, qd_encode_results(buf, sizeof(buf), QD_MSG_LOOKUP_REPLY,
                                           m.hdr.seq, results, m.u.array.count), -1);
        break;
    case QD_MSG_UNREF:
        if (broker_unref(s->broker, c, &m)) {
            send_error(s, c, m.hdr.seq, QD_ERR_NOT_HELD,
                       "UNREF of a reference this client does not hold; nothing released");
        } else {
            send_reply(s, c, qd_encode_ok(buf, sizeof(buf), m.hdr.seq, m.u.array.count), -1);
        }
        break;
    case QD_MSG_RESTORE:
        broker_restore(s->broker, c, &m, results);
        send_reply(s, c, qd_encode_results(buf, sizeof(buf), QD_MSG_RESTORE_REPLY,
                                           m.hdr.seq, results, m.u.array.count), -1);
        break;
    }
}

/* Supplementary groups of the peer (SO_PEERGROUPS). */
static GArray *peer_groups(int sock)
{
    gid_t groups[256];
    socklen_t len = sizeof(groups);
    GArray *a = g_array_new(FALSE, FALSE, sizeof(guint));

    if (getsockopt(sock, SOL_SOCKET, SO_PEERGROUPS, groups, &len) == 0) {
        for (socklen_t i = 0; i < len / sizeof(gid_t); i++) {
            g_array_append_val(a, (guint) { groups[i] });
        }
    }
    return a;
}

/* One packet (not PUBLISH) into buf: its length, 0 at the end, or -errno. */
static ssize_t recv_packet(Server *s, BrokerClient *c)
{
    static FdControl control;
    struct iovec iov = { buf, sizeof(buf) };
    struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                         .msg_controllen = sizeof(control.buf) };
    ssize_t n;

    do {
        n = recvmsg(c->sock, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        return -errno;
    }
    if (refuse_fds(s, c, &mh)) {
        return -EBADMSG;
    }
    return (mh.msg_flags & MSG_TRUNC) ? -EMSGSIZE : n;
}

static gboolean on_client(int sock, GIOCondition cond, gpointer opaque)
{
    BrokerClient *c = opaque;
    Server *s = c->server;

    for (int i = 0; i < PACKETS_PER_WAKEUP && c->sock >= 0; i++) {
        uint8_t hdr[QD_HEADER_SIZE];
        ssize_t total = recv(sock, hdr, sizeof(hdr), MSG_PEEK | MSG_TRUNC | MSG_DONTWAIT);

        if (total == 0) {
            client_drop(s, c, "end of stream");
            break;
        }
        if (total < 0) {
            if (errno != EAGAIN && errno != EINTR) {
                client_drop(s, c, g_strerror(errno));
            }
            break;
        }
        if (total >= QD_HEADER_SIZE && hdr[4] == QD_MSG_PUBLISH && hdr[5] == 0) {
            handle_publish(s, c, total);
            continue;
        }
        total = recv_packet(s, c);
        if (total == -EMSGSIZE || total == -EBADMSG) {
            protocol_error(s, c, 0, total == -EBADMSG ? "descriptors are refused"
                                                      : "message too long");
            break;
        }
        if (total <= 0) {
            client_drop(s, c, total ? g_strerror(-total) : "end of stream");
            break;
        }
        {
            g_autoptr(GArray) groups = c->domain ? NULL : peer_groups(sock);

            handle_packet(s, c, total, groups);
        }
    }
    if (c->sock < 0) {
        client_gone(s, c);
        return G_SOURCE_REMOVE;
    }
    return G_SOURCE_CONTINUE;
}

static guint client_records(Server *s)
{
    return g_hash_table_size(s->broker->clients);
}

static gboolean on_accept(int lsock, GIOCondition cond, gpointer opaque);

static gboolean resume_accept(gpointer opaque)
{
    Server *s = opaque;

    s->resume = 0;
    s->watch = g_unix_fd_add(s->sock, G_IO_IN, on_accept, s);
    return G_SOURCE_REMOVE;
}

/*
 * Refuse a connection with a reason it can read.  What the client sent
 * already (its HELLO) is read first: closing a unix socket with unread data
 * resets the peer, which would then see ECONNRESET instead of the reason.
 * The socket refuses descriptors, so nothing read here holds one.
 */
static void refuse(Server *s, int sock, const struct ucred *cred, const char *msg)
{
    size_t n = qd_encode_error(buf, sizeof(buf), 0, QD_ERR_DENIED, msg);

    log_limited(&s->refuse_log, "refused pid %d uid %u: %s", (int)cred->pid,
                (unsigned)cred->uid, msg);
    s->broker->stats.clients_refused++;
    send(sock, buf, n, MSG_DONTWAIT | MSG_NOSIGNAL);
    for (int i = 0; i < 4 && recv(sock, buf, sizeof(buf), MSG_DONTWAIT | MSG_TRUNC) > 0; i++) {
    }
    shutdown(sock, SHUT_RDWR);
    close(sock);
}

static gboolean on_accept(int lsock, GIOCondition cond, gpointer opaque)
{
    Server *s = opaque;
    BrokerConfig *cfg = s->broker->cfg;
    int off = 0;
    struct ucred cred;
    socklen_t len = sizeof(cred);
    g_autoptr(GArray) groups = NULL;
    g_autofree char *msg = NULL;
    BrokerClient *c;
    UidUsage *u;
    int sock = accept4(lsock, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);

    if (sock < 0) {
        if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
            /* The connection stays queued: pause rather than spin on it. */
            log_limited(&s->refuse_log, "cannot accept clients: %s; pausing %u ms",
                        g_strerror(errno), ACCEPT_PAUSE_MS);
            s->watch = 0;
            s->resume = g_timeout_add(ACCEPT_PAUSE_MS, resume_accept, s);
            return G_SOURCE_REMOVE;
        }
        return G_SOURCE_CONTINUE;
    }
    /* Inherited from the listening socket already; a systemd socket may predate it. */
    setsockopt(sock, SOL_SOCKET, SO_PASSRIGHTS, &off, sizeof(off));
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) {
        close(sock);
        return G_SOURCE_CONTINUE;
    }
    groups = peer_groups(sock);
    u = limits_uid(&s->limits, cred.uid);
    if (!broker_peer_allowed(s->broker, cred.uid, cred.gid, groups)) {
        msg = g_strdup_printf("uid %u is not allowed to use this broker "
                              "(allow-uids/allow-gids)", (unsigned)cred.uid);
    } else if (u->connections + orphans_of(s, cred.uid) >= cfg->uid_connections) {
        msg = g_strdup_printf("uid %u has %u connections and disconnected clients already "
                              "(uid-connections = %u)", (unsigned)cred.uid,
                              u->connections + orphans_of(s, cred.uid), cfg->uid_connections);
    } else if (u->handshakes >= cfg->uid_handshakes) {
        msg = g_strdup_printf("uid %u has %u connections that have not said HELLO "
                              "(uid-handshakes = %u)", (unsigned)cred.uid, u->handshakes,
                              cfg->uid_handshakes);
    } else if (client_records(s) >= s->max_clients) {
        msg = g_strdup_printf("the broker has %u clients, as many as its descriptor "
                              "limit allows (LimitNOFILE)", client_records(s));
    }
    if (msg) {
        refuse(s, sock, &cred, msg);
        return G_SOURCE_CONTINUE;
    }
    c = broker_client_new(s->broker, sock, cred.pid, cred.uid, cred.gid);
    c->pidfd = peer_pidfd(sock, cred.pid);
    c->server = s;
    u->connections++;
    u->handshakes++;
    c->watch = g_unix_fd_add(sock, G_IO_IN | G_IO_HUP | G_IO_ERR, on_client, c);
    return G_SOURCE_CONTINUE;
}

void server_tick(Server *s, gint64 now)
{
    gint64 timeout = (gint64)s->broker->cfg->handshake_timeout * G_USEC_PER_SEC;
    GHashTableIter it;
    gpointer v;
    GSList *late = NULL, *dead = NULL;

    g_hash_table_iter_init(&it, s->broker->clients);
    while (g_hash_table_iter_next(&it, NULL, &v)) {
        BrokerClient *c = v;

        if (c->sock >= 0 && !c->domain && now - c->connected_at > timeout) {
            late = g_slist_prepend(late, c);
        } else if (c->sock < 0 && c->pidfd < 0) {
            /* An orphan we could not watch: try again (descriptors may be back). */
            c->pidfd = syscall(SYS_pidfd_open, c->pid, 0);
            if (c->pidfd >= 0) {
                c->pid_watch = g_unix_fd_add(c->pidfd, G_IO_IN, on_pid_exit, c);
            } else if (errno == ESRCH) {
                dead = g_slist_prepend(dead, c);
            }
        }
    }
    for (GSList *l = late; l; l = l->next) {
        BrokerClient *c = l->data;

        g_source_remove(c->watch);
        client_drop(s, c, "no HELLO in time");
        client_gone(s, c);
    }
    for (GSList *l = dead; l; l = l->next) {
        broker_client_free(s->broker, l->data);
    }
    g_slist_free(late);
    g_slist_free(dead);
    limits_prune(&s->limits, now);
}

int server_listen(const char *path, int type, guint mode, GError **errp)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    g_autofree char *dir = g_path_get_dirname(path);
    struct stat st;
    int sock;

    if (strlen(path) >= sizeof(sa.sun_path)) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_NAMETOOLONG,
                    "socket path too long: %s", path);
        return -1;
    }
    strcpy(sa.sun_path, path);
    if (g_mkdir_with_parents(dir, 0755) < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "cannot create %s: %s", dir, g_strerror(errno));
        return -1;
    }
    /* A stale socket of a previous broker: replace it; never another file. */
    if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode)) {
        unlink(path);
    }
    sock = socket(AF_UNIX, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (sock < 0 || bind(sock, (struct sockaddr *)&sa, sizeof(sa)) < 0 ||
        chmod(path, mode) < 0 || listen(sock, 64) < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "cannot listen on %s: %s", path, g_strerror(errno));
        if (sock >= 0) {
            close(sock);
        }
        return -1;
    }
    return sock;
}

/* As many descriptors as the hard limit allows; the clients that fit. */
static guint fit_clients(const BrokerConfig *cfg)
{
    struct rlimit rl;
    guint64 budget;

    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (getrlimit(RLIMIT_NOFILE, &rl) < 0 || rl.rlim_cur == RLIM_INFINITY) {
        rl.rlim_cur = 1024;
    }
    /* A domain costs two descriptors (its pool), a client two (socket, pidfd). */
    budget = rl.rlim_cur > FD_RESERVE + 2ull * cfg->max_domains
             ? (rl.rlim_cur - FD_RESERVE - 2ull * cfg->max_domains) / 2 : 0;
    if (budget < 16) {
        g_warning("RLIMIT_NOFILE (%llu) leaves room for %llu clients with max-domains = "
                  "%u: raise LimitNOFILE", (unsigned long long)rl.rlim_cur,
                  (unsigned long long)budget, cfg->max_domains);
        budget = MAX(budget, 1);
    }
    return MIN(budget, G_MAXUINT);
}

gboolean server_start(Server *s, Broker *b, GError **errp)
{
    int off = 0;

    s->broker = b;
    limits_init(&s->limits, b->cfg->auth_failures);
    s->auth_log.per_minute = 20;
    s->refuse_log.per_minute = 20;
    s->fd_log.per_minute = 10;
    s->protocol_log.per_minute = 20;
    s->max_clients = fit_clients(b->cfg);
    s->sock = activation_take("broker", SOCK_SEQPACKET);
    s->activated = s->sock >= 0;
    if (s->activated) {
        g_message("client socket from systemd (socket activation)");
    } else {
        s->sock = server_listen(b->cfg->socket_path, SOCK_SEQPACKET, b->cfg->socket_mode,
                                errp);
    }
    if (s->sock < 0) {
        return FALSE;
    }
    /* Accepted sockets inherit it: no client can ever send us a descriptor. */
    if (setsockopt(s->sock, SOL_SOCKET, SO_PASSRIGHTS, &off, sizeof(off)) < 0) {
        g_warning("this kernel cannot refuse descriptors (SO_PASSRIGHTS, Linux 6.16): "
                  "those a client sends are closed on a separate thread");
    }
    s->watch = g_unix_fd_add(s->sock, G_IO_IN, on_accept, s);
    return TRUE;
}

void server_stop(Server *s)
{
    if (s->watch) {
        g_source_remove(s->watch);
    }
    if (s->resume) {
        g_source_remove(s->resume);
    }
    if (s->sock >= 0) {
        close(s->sock);
        if (!s->activated) {       /* systemd's socket stays for the next broker */
            unlink(s->broker->cfg->socket_path);
        }
    }
    limits_destroy(&s->limits);
}

/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The client socket: accept, authenticate (SO_PEERCRED), receive one
 * packet at a time, hand it to ops.c, reply.  Single-threaded on the glib
 * main loop: an io_uring loop was measured and did not beat it
 * (scripts/bench/loop-bench.c, docs/broker.md).
 *
 * A client that sends anything malformed, or does not read its replies, is
 * dropped; its references stay until its process exits (broker.h).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <glib-unix.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include "qdedup/transport.h"
#include "activation.h"
#include "server.h"

#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77
#endif

#define PACKETS_PER_WAKEUP 32

static uint8_t buf[QD_SMALL_MSG_MAX];
static uint8_t scratch_page[QD_PAGE_SIZE];
static QdResult results[QD_MAX_LOOKUP];

static void client_drop(Server *s, BrokerClient *c, const char *why);

static gboolean send_reply(Server *s, BrokerClient *c, size_t len, int fd)
{
    int ret;

    if (len == 0) {
        g_critical("client %u: reply does not encode", c->id);
        return FALSE;
    }
    ret = qd_send(c->sock, buf, len, NULL, 0, fd);
    if (ret < 0) {
        /* EAGAIN: it does not read its replies.  Either way: gone. */
        client_drop(s, c, g_strerror(-ret));
        return FALSE;
    }
    return TRUE;
}

static gboolean send_error(Server *s, BrokerClient *c, uint32_t seq, uint32_t code,
                           const char *msg)
{
    if (s->broker->cfg->verbose || code == QD_ERR_PROTOCOL) {
        g_message("client %u (pid %d): %s error: %s", c->id, (int)c->pid,
                  qd_error_name(code), msg);
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
                  " references released", c->id, (int)c->pid, c->refs.total);
    }
    broker_client_free(s->broker, c);
    return G_SOURCE_REMOVE;
}

/*
 * Close the connection.  Only ever called from within on_client(), which
 * sees sock < 0, stops, and lets go of the client (client_gone) after it.
 */
static void client_drop(Server *s, BrokerClient *c, const char *why)
{
    if (c->sock < 0) {
        return;
    }
    if (s->broker->cfg->verbose) {
        g_message("client %u (pid %d) disconnected: %s", c->id, (int)c->pid, why);
    }
    close(c->sock);
    c->sock = -1;
}

/* After the connection closed: keep the references while the process lives. */
static void client_gone(Server *s, BrokerClient *c)
{
    c->watch = 0;
    if (broker_client_orphan(s->broker, c)) {
        c->pid_watch = g_unix_fd_add(c->pidfd, G_IO_IN, on_pid_exit, c);
    } else {
        broker_client_free(s->broker, c);
    }
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

static void handle_hello(Server *s, BrokerClient *c, const QdMessage *m, int fd,
                         const GArray *groups)
{
    QdHelloReply reply = { 0 };
    g_autofree char *msg = NULL;
    int ro_fd = -1;
    int code;

    if (m->u.hello.flags & QD_HELLO_RECONNECT) {
        reap_closed(s, c);
    }
    code = broker_hello(s->broker, c, &m->u.hello, fd, groups, &reply, &ro_fd, &msg);

    if (code) {
        send_error(s, c, m->hdr.seq, code, msg);
        return;
    }
    if (s->broker->cfg->verbose) {
        g_message("client %u: pid %d uid %u '%s' joined domain '%s'%s", c->id,
                  (int)c->pid, (unsigned)c->uid, c->name, c->domain->name,
                  reply.flags & QD_REPLY_REFS_KEPT ? " (references kept)" : "");
    }
    send_reply(s, c, qd_encode_hello_reply(buf, sizeof(buf), m->hdr.seq, &reply), ro_fd);
    close(ro_fd);
}

/* PUBLISH: peek the metadata, then receive the pages straight into slots. */
static void handle_publish(Server *s, BrokerClient *c, size_t total)
{
    static uint8_t meta[QD_PUBLISH_META_SIZE(QD_MAX_PUBLISH)];
    uint64_t dest[QD_MAX_PUBLISH];
    struct iovec iov[1 + QD_MAX_PUBLISH];
    char control[CMSG_SPACE(sizeof(int) * 4)];
    struct msghdr mh = { .msg_iov = iov, .msg_control = control,
                         .msg_controllen = sizeof(control) };
    uint32_t count;
    QdMessage m;
    ssize_t n;
    int err;

    n = recv(c->sock, meta, QD_HEADER_SIZE + 4, MSG_PEEK);
    count = n == QD_HEADER_SIZE + 4 ? meta[16] | meta[17] << 8 | meta[18] << 16 |
                                      (uint32_t)meta[19] << 24 : UINT32_MAX;
    if (count > QD_MAX_PUBLISH || total < QD_PUBLISH_META_SIZE(count)) {
        recv(c->sock, meta, 0, MSG_TRUNC);     /* discard the packet */
        protocol_error(s, c, 0, "PUBLISH count over the limit or truncated");
        return;
    }
    n = recv(c->sock, meta, QD_PUBLISH_META_SIZE(count), MSG_PEEK);
    err = n < 0 ? QD_DECODE_SHORT : qd_decode_publish_meta(meta, n, total, &m);
    if (err) {
        recv(c->sock, meta, 0, MSG_TRUNC);
        protocol_error(s, c, 0, qd_decode_strerror(err));
        return;
    }
    if (!c->domain) {
        recv(c->sock, meta, 0, MSG_TRUNC);
        send_error(s, c, m.hdr.seq, QD_ERR_STATE, "PUBLISH before HELLO");
        return;
    }
    broker_publish_plan(s->broker, c, &m, dest, results);
    iov[0] = (struct iovec) { meta, QD_PUBLISH_META_SIZE(count) };
    for (uint32_t i = 0; i < count; i++) {
        void *to = dest[i] == POOL_NO_SLOT ? scratch_page
                                           : pool_page(&s->broker->pool, dest[i]);

        iov[1 + i] = (struct iovec) { to, QD_PAGE_SIZE };
    }
    mh.msg_iovlen = 1 + count;
    do {
        n = recvmsg(c->sock, &mh, MSG_CMSG_CLOEXEC);
    } while (n < 0 && errno == EINTR);
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); n >= 0 && cm; cm = CMSG_NXTHDR(&mh, cm)) {
        if (cm->cmsg_type == SCM_RIGHTS) {
            for (size_t i = 0; i < (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int); i++) {
                close(((int *)CMSG_DATA(cm))[i]);
            }
        }
    }
    if (n != (ssize_t)total) {
        /* Cannot happen with a peeked packet; never keep unchecked slots. */
        for (uint32_t i = 0; i < count; i++) {
            if (dest[i] != POOL_NO_SLOT) {
                pool_free(&s->broker->pool, dest[i]);
            }
        }
        client_drop(s, c, "PUBLISH receive failed");
        return;
    }
    broker_publish_commit(s->broker, c, &m, dest, results);
    send_reply(s, c, qd_encode_results(buf, sizeof(buf), QD_MSG_PUBLISH_REPLY,
                                       m.hdr.seq, results, count), -1);
}

static void handle_packet(Server *s, BrokerClient *c, size_t len, int fd,
                          const GArray *groups)
{
    QdMessage m;
    int err = qd_decode(buf, len, &m);
    uint32_t type = m.hdr.type;

    if (err) {
        protocol_error(s, c, m.hdr.seq, qd_decode_strerror(err));
        return;
    }
    if (type == QD_MSG_HELLO) {
        handle_hello(s, c, &m, fd, groups);
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

static gboolean on_client(int sock, GIOCondition cond, gpointer opaque)
{
    BrokerClient *c = opaque;
    Server *s = c->server;

    for (int i = 0; i < PACKETS_PER_WAKEUP && c->sock >= 0; i++) {
        uint8_t hdr[QD_HEADER_SIZE];
        ssize_t total = recv(sock, hdr, sizeof(hdr), MSG_PEEK | MSG_TRUNC);
        int fd = -1;

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
        total = qd_recv(sock, buf, sizeof(buf), c->domain ? NULL : &fd);
        if (total == -EMSGSIZE) {
            protocol_error(s, c, 0, "message too long");
            break;
        }
        if (total <= 0) {
            client_drop(s, c, total ? g_strerror(-total) : "end of stream");
            break;
        }
        {
            g_autoptr(GArray) groups = c->domain ? NULL : peer_groups(sock);

            handle_packet(s, c, total, fd, groups);
        }
        if (fd >= 0) {
            close(fd);
        }
    }
    if (c->sock < 0) {
        client_gone(s, c);
        return G_SOURCE_REMOVE;
    }
    return G_SOURCE_CONTINUE;
}

static int peer_pidfd(int sock, pid_t pid)
{
    int fd;
    socklen_t len = sizeof(fd);

    if (getsockopt(sock, SOL_SOCKET, SO_PEERPIDFD, &fd, &len) == 0) {
        return fd;
    }
    fd = syscall(SYS_pidfd_open, pid, 0);
    return fd;
}

static gboolean on_accept(int lsock, GIOCondition cond, gpointer opaque)
{
    Server *s = opaque;
    struct ucred cred;
    socklen_t len = sizeof(cred);
    g_autoptr(GArray) groups = NULL;
    BrokerClient *c;
    int sock = accept4(lsock, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);

    if (sock < 0) {
        return G_SOURCE_CONTINUE;
    }
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) {
        close(sock);
        return G_SOURCE_CONTINUE;
    }
    groups = peer_groups(sock);
    if (!broker_peer_allowed(s->broker, cred.uid, cred.gid, groups)) {
        g_autofree char *msg = g_strdup_printf(
            "uid %u is not allowed to use this broker (allow-uids/allow-gids)",
            (unsigned)cred.uid);
        size_t n = qd_encode_error(buf, sizeof(buf), 0, QD_ERR_DENIED, msg);

        g_message("refused pid %d: %s", (int)cred.pid, msg);
        s->broker->stats.clients_refused++;
        qd_send(sock, buf, n, NULL, 0, -1);
        close(sock);
        return G_SOURCE_CONTINUE;
    }
    c = broker_client_new(s->broker, sock, cred.pid, cred.uid, cred.gid);
    c->pidfd = peer_pidfd(sock, cred.pid);
    c->server = s;
    c->watch = g_unix_fd_add(sock, G_IO_IN | G_IO_HUP | G_IO_ERR, on_client, c);
    return G_SOURCE_CONTINUE;
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

gboolean server_start(Server *s, Broker *b, GError **errp)
{
    s->broker = b;
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
    s->watch = g_unix_fd_add(s->sock, G_IO_IN, on_accept, s);
    return TRUE;
}

void server_stop(Server *s)
{
    if (s->watch) {
        g_source_remove(s->watch);
    }
    if (s->sock >= 0) {
        close(s->sock);
        if (!s->activated) {       /* systemd's socket stays for the next broker */
            unlink(s->broker->cfg->socket_path);
        }
    }
}

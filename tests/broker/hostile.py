#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Hostile local clients against a real qemu-dedup-broker.

Attacker processes (forked from this test, most of them running as
unprivileged uids) speak the wire protocol themselves (tests/lib/qdwire.py)
and try to:
  1. read another domain's pages through the pool descriptor they get;
  2. claim another domain's slots with RESTORE, outside recovery and while
     the broker recovers after a SIGKILL and restart (handing back a pool
     they do not hold);
  3. grab free slots with RESTORE (zero-page and garbage hashes, huge slots);
  4. inflate a reference count with 100,000 LOOKUP hits on one slot;
  5. flood the candidate table with hashes that share their low bits;
  6. send descriptors (a lingering TCP socket, a pipe), in HELLO and after;
  7. hold 600 idle connections, and connections that never say HELLO, and
     fill a second broker (started with a small RLIMIT_NOFILE) to its limit;
  8. guess a domain secret, and name a domain that does not exist;
  9. never read their replies.
Each attack must fail, while real clients (tests/broker/test-client.c, which
merge pages into their own memory) keep being served and keep their data,
checked after every group.  Also checked: a live client whose connection
drops keeps its references on reconnecting (REFS_KEPT), in a named domain
and in a private one.

Usage: hostile.py BUILD_DIR [--proto=1]
BUILD_DIR is the build of qdedup's own meson project (broker, qemu-dedup-ctl,
broker-test-client).  --proto=1 speaks protocol version 1 to an older broker
(and writes a configuration it understands), to show which attacks the
older broker let through; it is not part of make check.
Needs root: attackers run as other uids."""

import argparse
import collections
import encodings.idna  # noqa: F401  (attackers cannot import it once they are another uid)
import errno
import json
import mmap
import os
import pickle
import random
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from tap import Tap  # noqa: E402
import qdwire as w  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("build")
ap.add_argument("--proto", type=int, default=2, choices=(1, 2))
opts = ap.parse_args()
PROTO = opts.proto
BROKER = os.path.join(opts.build, "broker", "qemu-dedup-broker")
CTL = os.path.join(opts.build, "tools", "qemu-dedup-ctl")
CLIENT = os.path.join(opts.build, "tests", "broker-test-client")

PAGE = w.PAGE
POOL_MAX_MB = 64
POOL_SLOTS = POOL_MAX_MB << 20 >> 12
SECRET_SEED = 0x5EC7E7          # domain a's pages
SECRET_PAGES = 1024             # 4 MiB
SHARED_SEED, SHARED_PAGES = 202, 256
FRESH_SEED = 303
RESTART_GRACE = 4
HANDSHAKE_TIMEOUT = 2
UID_CONNECTIONS = 200
UID_HANDSHAKES = 8
AUTH_FAILURES = 5
CLIENT_CANDIDATES = 32768
LINGER = 4                      # seconds a lingering socket's close may block

ATTACKER = 65534                # domain b, shared, private
PRIV_ATTACKER = 65533           # a private domain
IDLE_UIDS = (65520, 65521, 65522)
HANDSHAKE_UID = 65523
GUESSER, OTHER_GUESSER, NAMER = 65531, 65530, 65529
FLOODER = 65528                 # its candidates are capped per uid: a uid of its own
ALL_UIDS = (ATTACKER, PRIV_ATTACKER, HANDSHAKE_UID, GUESSER, OTHER_GUESSER, NAMER,
            FLOODER) + IDLE_UIDS

started = time.monotonic()
t = Tap()
if os.geteuid() != 0:
    print("1..0 # SKIP needs root: attackers run as other uids", flush=True)
    sys.exit(0)
tmp = tempfile.mkdtemp(prefix="qdedup-hostile-")
os.chmod(tmp, 0o755)            # the attackers must reach the socket
SOCK = os.path.join(tmp, "broker.sock")
CONTROL = os.path.join(tmp, "control.sock")
LOG = os.path.join(tmp, "broker.log")
secret_file = os.path.join(tmp, "gold.secret")
GOLD_SECRET = "correct horse battery staple"
with open(secret_file, "w") as f:
    f.write(GOLD_SECRET + "\n")
config = os.path.join(tmp, "broker.conf")
new_keys = f"""handshake-timeout = {HANDSHAKE_TIMEOUT}
uid-connections = {UID_CONNECTIONS}
uid-handshakes = {UID_HANDSHAKES}
auth-failures = {AUTH_FAILURES}
uid-candidates = {CLIENT_CANDIDATES}
""" if PROTO >= 2 else ""      # the version-1 broker refuses keys it does not know
with open(config, "w") as f:
    f.write(f"""[broker]
pool-max = {POOL_MAX_MB}M
allow-uids = {';'.join(str(u) for u in ALL_UIDS)}
socket-mode = 0666
restart-grace = {RESTART_GRACE}
{new_keys}
[domain a]
allow-uids = 0

[domain b]
[domain shared]

[domain gold]
secret-file = {secret_file}
""")

# A second broker that may open only SMALL_NOFILE descriptors.
SMALL_NOFILE = 256
SMALL_SOCK = os.path.join(tmp, "small.sock")
SMALL_CONTROL = os.path.join(tmp, "small-control.sock")
small_config = os.path.join(tmp, "small.conf")
with open(small_config, "w") as f:
    f.write(f"""[broker]
pool-max = {POOL_MAX_MB}M
allow-uids = {';'.join(str(u) for u in ALL_UIDS)}
socket-mode = 0666
{"max-domains = 8" if PROTO >= 2 else ""}

[domain b]
""")

# Descriptors: 600 idle connections, and the broker's share of them.
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, 8192), max(hard, 8192)))


# ---- pages -------------------------------------------------------------------

def fill_page(seed, index):
    """The page test-client.c's fill_page() makes: xorshift from seed and index."""
    m = (1 << 64) - 1
    x = ((seed * 0x9E3779B97F4A7C15) ^ ((index + 1) * 0xBF58476D1CE4E5B9)) & m
    words = []
    for _ in range(PAGE // 8):
        x ^= (x << 13) & m
        x ^= x >> 7
        x ^= (x << 17) & m
        words.append(x)
    return struct.pack(f"<{PAGE // 8}Q", *words)


SECRET_HASHES = [w.hash_page(fill_page(SECRET_SEED, i)) for i in range(SECRET_PAGES)]
ZERO_HASH = w.hash_page(w.ZERO_PAGE)


# ---- the broker and its control socket -------------------------------------------

class Broker:
    def __init__(self, sock=SOCK, control=CONTROL, conf=None, log=LOG, nofile=None):
        self.control = control
        if os.path.exists(control):     # left by a broker that was killed
            os.unlink(control)
        self.log = open(log, "a")

        def limit():
            if nofile:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        # No --verbose: failed authentications must be logged without it.
        self.proc = subprocess.Popen([BROKER, f"--config={conf or config}", f"--socket={sock}",
                                      f"--control={control}"],
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     preexec_fn=limit)
        deadline = time.monotonic() + 10
        while not os.path.exists(control):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("broker did not start")
            time.sleep(0.05)

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def cpu_seconds(self):
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, sig=signal.SIGTERM):
        if self.alive():
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.log.close()
        return rc


def ctl(what, timeout=10, control=CONTROL):
    out = subprocess.run([CTL, f"--control={control}", "--json", what],
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode:
        raise RuntimeError(f"qemu-dedup-ctl {what}: {out.stderr.strip()}")
    return json.loads(out.stdout)


def ctl_answers(timeout=3, control=CONTROL):
    """Does the control socket answer within timeout seconds?"""
    try:
        return "slots-used" in ctl("stats", timeout=timeout, control=control)
    except (subprocess.TimeoutExpired, RuntimeError, ValueError):
        return False


def domains(name):
    return [d for d in ctl("domains") if d.get("name") == name]


def domain(name):
    found = domains(name)
    return found[0] if found else {}


def log_text():
    with open(LOG, errors="replace") as f:
        return f.read()


# ---- real clients ----------------------------------------------------------------

class Client:
    """A broker-test-client process: a VM that merges pages into its memory."""

    def __init__(self, name):
        self.name = name
        self.proc = subprocess.Popen([CLIENT], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, bufsize=0)
        self.buf = b""
        self.late = 0           # replies to commands that timed out
        self.merged = 0         # pages it has merged, as check must find them

    def _line(self, timeout):
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise TimeoutError(f"{self.name}: no answer in {timeout} s")
            data = os.read(self.proc.stdout.fileno(), 65536)
            if not data:
                raise RuntimeError(f"client {self.name} died")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def do(self, line, timeout=60):
        while self.late:
            self._line(60)
            self.late -= 1
        self.proc.stdin.write(line.encode() + b"\n")
        try:
            return self._line(timeout)
        except TimeoutError:
            self.late += 1
            raise

    def connect(self, domain="-", secret="", sock=SOCK):
        return self.do(f"connect {sock} {domain} {self.name} {secret}".strip())

    def exit(self):
        try:
            self.proc.stdin.write(b"exit\n")
        except BrokenPipeError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def answered(cl, line, timeout=3):
    """Is cl's request answered (ok) within timeout seconds?"""
    try:
        return cl.do(line, timeout=timeout).get("ok", False)
    except TimeoutError:
        return False


# ---- attackers -------------------------------------------------------------------

class Agent:
    """A forked attacker running as uid.  call(fn, ...) runs the module-level
    function fn(state, ...) in it; state (connections, descriptors) persists
    between calls.  It inherits no descriptor of ours."""

    def __init__(self, uid, name):
        self.name = name
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                ours.close()
                os.dup2(2, 1)       # nothing of ours may reach the TAP stream
                keep = {0, 1, 2, theirs.fileno()}
                for fd in [int(x) for x in os.listdir("/proc/self/fd")]:
                    if fd not in keep:
                        try:
                            os.close(fd)
                        except OSError:
                            pass
                if uid is not None:
                    os.setgroups([])
                    os.setresgid(uid, uid, uid)
                    os.setresuid(uid, uid, uid)
                agent_loop(theirs)
                status = 0
            finally:
                os._exit(status)
        theirs.close()
        self.pid = pid
        self.sock = ours

    def call(self, fn, *args, timeout=90, **kw):
        data = pickle.dumps((fn.__name__, args, kw))
        self.sock.settimeout(timeout)
        self.sock.sendall(struct.pack("<I", len(data)) + data)
        status, value = pickle.loads(_recv_msg(self.sock))
        if status != "ok":
            raise RuntimeError(f"agent {self.name}: {fn.__name__}: {value}")
        return value

    def stop(self):
        try:
            self.sock.close()
        finally:
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass


def _recv_exact(sock, n):
    data = b""
    while len(data) < n:
        part = sock.recv(n - len(data))
        if not part:
            raise EOFError("agent channel closed")
        data += part
    return data


def _recv_msg(sock):
    (n,) = struct.unpack("<I", _recv_exact(sock, 4))
    return _recv_exact(sock, n)


def agent_loop(chan):
    state = {"conns": {}, "keep": []}
    while True:
        try:
            name, args, kw = pickle.loads(_recv_msg(chan))
        except EOFError:
            return
        try:
            reply = ("ok", globals()[name](state, *args, **kw))
        except Exception:
            reply = ("error", traceback.format_exc())
        data = pickle.dumps(reply)
        chan.sendall(struct.pack("<I", len(data)) + data)


def summary(m, c=None):
    """What a reply says, as plain data."""
    if m is None:
        return {"type": "EOF"}
    d = {"type": m.name}
    if m.type == w.HELLO_REPLY:
        d.update(m.reply)
        d["adopted"] = bool(m.reply["flags"] & w.REPLY_ADOPTED)
        d["refs_kept"] = bool(m.reply["flags"] & w.REPLY_REFS_KEPT)
        if c is not None and c.pool_fd >= 0:
            st = os.fstat(c.pool_fd)
            d.update(fd=c.pool_fd, fd_ino=st.st_ino, fd_dev=st.st_dev)
    elif m.type == w.ERROR:
        d.update(error=m.error, message=m.message)
    elif m.results is not None:
        d["results"] = dict(collections.Counter(w.RESULT_NAMES[r] if r < len(w.RESULT_NAMES)
                                                else str(r) for r, _ in m.results))
        d["slots"] = sorted({s for r, s in m.results if r in (w.HIT, w.STORED)})
    else:
        d["count"] = m.count
    return d


def merge_counts(into, more):
    for k, v in more.items():
        into[k] = into.get(k, 0) + v
    return into


def ag_hello(st, key, domain, name=None, secret="", reconnect=False, pool_dev=0,
             pool_ino=0, pool_fd=-1):
    """A new connection (replacing key's): HELLO, the reply summarised."""
    if key in st["conns"]:
        ag_close(st, key)
    c = w.Conn(SOCK, proto=PROTO, timeout=20)
    st["conns"][key] = c
    try:
        m = c.hello(domain, name=name or key, secret=secret, reconnect=reconnect,
                    pool_dev=pool_dev, pool_ino=pool_ino, pool_fd=pool_fd)
    except (ConnectionError, OSError) as e:
        return {"type": "EOF", "errno": getattr(e, "errno", None), "message": str(e)}
    return summary(m, c)


def ag_close(st, key):
    c = st["conns"].pop(key, None)
    if c is not None:
        c.close()


def ag_keep_pool(st, key):
    """Keep a copy of key's pool descriptor past its connection: its number."""
    fd = os.dup(st["conns"][key].pool_fd)
    st["keep"].append(fd)
    return fd


def ag_read_pool(st, key, secret_hashes):
    """Read through key's pool descriptor every way there is; which of its
    pages are another domain's secret pages?"""
    fd = st["conns"][key].pool_fd
    secret = set(map(tuple, secret_hashes))
    s = os.fstat(fd)
    out = {"ino": s.st_ino, "dev": s.st_dev, "size": s.st_size, "blocks": s.st_blocks}
    try:
        out["seek_data"] = os.lseek(fd, 0, os.SEEK_DATA)
    except OSError as e:
        out["seek_data"] = None if e.errno == errno.ENXIO else f"errno {e.errno}"
    try:
        out["seek_hole"] = os.lseek(fd, 0, os.SEEK_HOLE)
    except OSError as e:
        out["seek_hole"] = f"errno {e.errno}"
    nonzero = found = 0
    chunk = 1 << 20
    for off in range(0, s.st_size, chunk):
        data = os.pread(fd, chunk, off)
        for p in range(0, len(data), PAGE):
            page = data[p:p + PAGE]
            if page != w.ZERO_PAGE:
                nonzero += 1
                found += w.hash_page(page) in secret
    out.update(pread_nonzero=nonzero, pread_secret=found)
    nonzero = found = 0
    mm = mmap.mmap(fd, s.st_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    for off in range(0, s.st_size, PAGE):
        page = mm[off:off + PAGE]
        if page != w.ZERO_PAGE:
            nonzero += 1
            found += w.hash_page(page) in secret
    mm.close()
    out.update(mmap_nonzero=nonzero, mmap_secret=found)
    # A private writable mapping is allowed: it copies, and reads the same.
    mm = mmap.mmap(fd, s.st_size, flags=mmap.MAP_PRIVATE,
                   prot=mmap.PROT_READ | mmap.PROT_WRITE)
    out["private_nonzero"] = sum(mm[o:o + PAGE] != w.ZERO_PAGE
                                 for o in range(0, s.st_size, PAGE))
    mm.close()
    return out


def ag_restore(st, key, entries):
    """RESTORE (slot, lo, hi) entries, 1024 a message; the results added up."""
    c = st["conns"][key]
    total, slots = {}, set()
    for i in range(0, len(entries), w.MAX_RESTORE):
        m = c.restore(entries[i:i + w.MAX_RESTORE])
        s = summary(m)
        if m.results is None:
            return s
        merge_counts(total, s["results"])
        slots.update(s["slots"])
    return {"type": "RESTORE_REPLY", "results": total, "slots": sorted(slots)}


def ag_restore_sweep(st, key, first, count, kind):
    """RESTORE of every slot in [first, first + count) with the zero page's
    hash or garbage."""
    rnd = random.Random(first ^ count)
    entries = []
    for slot in range(first, first + count):
        lo, hi = ZERO_HASH if kind == "zero" else (rnd.getrandbits(64), rnd.getrandbits(64))
        entries.append((slot, lo, hi))
    return ag_restore(st, key, entries)


def ag_lookup(st, key, hashes, cookie=1):
    m = st["conns"][key].lookup([(lo, hi, cookie + i) for i, (lo, hi) in enumerate(hashes)])
    return summary(m)


def ag_lookup_same(st, key, h, batches):
    """batches LOOKUPs of 1024 entries that all name hash h."""
    c = st["conns"][key]
    packet = w.encode_lookup(0, [(h[0], h[1], 7)] * w.MAX_LOOKUP)
    total, slots = {}, set()
    for _ in range(batches):
        s = summary(c.lookup_raw(packet))
        if "results" not in s:
            return s
        merge_counts(total, s["results"])
        slots.update(s["slots"])
    return {"type": "LOOKUP_REPLY", "results": total, "slots": sorted(slots)}


def ag_unref(st, key, slots):
    c = st["conns"][key]
    out = {}
    for i in range(0, len(slots), w.MAX_UNREF):
        out = summary(c.unref(slots[i:i + w.MAX_UNREF]))
        if out["type"] != "OK":
            break
    return out


def ag_store_page(st, key1, key2, page):
    """Two connections of one domain make page a pool page: the first names
    it, the second is asked to publish it."""
    h = w.hash_page(page)
    a = st["conns"][key1].lookup([(h[0], h[1], 1)])
    b = st["conns"][key2].lookup([(h[0], h[1], 2)])
    if b.results[0][0] != w.PUBLISH_IT:
        return {"first": summary(a), "second": summary(b)}
    return summary(st["conns"][key2].publish([(h[0], h[1], 2)], [page]))


def ag_flood(st, key, kind, batches, seconds):
    """LOOKUPs of new hashes, 1024 a message: random ones, or ones chosen
    to share their low 24 bits (and differ above), for up to seconds."""
    c = st["conns"][key]
    rnd = random.Random(42 if kind == "random" else 43)
    total, done, start = {}, 0, time.monotonic()
    for b in range(batches):
        if time.monotonic() - start > seconds:
            break
        if kind == "random":
            entries = [(rnd.getrandbits(64), rnd.getrandbits(64), i) for i in range(w.MAX_LOOKUP)]
        else:
            base = b * w.MAX_LOOKUP
            entries = [(((base + i) << 24) | 0x5A5A5A, rnd.getrandbits(64), i)
                       for i in range(w.MAX_LOOKUP)]
        s = summary(c.lookup(entries))
        if "results" not in s:
            return s
        merge_counts(total, s["results"])
        done += w.MAX_LOOKUP
    return {"lookups": done, "results": total, "seconds": time.monotonic() - start}


def ag_fake_pool(st, size):
    """A memfd of our own, named like the broker's pools."""
    fd = os.memfd_create("qemu-dedup-pool", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    os.pwrite(fd, b"x" * PAGE, 0)
    st["keep"].append(fd)
    s = os.fstat(fd)
    return {"fd": fd, "ino": s.st_ino, "dev": s.st_dev}


def _lingering_socket():
    """A TCP socket with SO_LINGER and a send queue its peer never drains: its
    last close blocks for LINGER seconds."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    cli = socket.create_connection(srv.getsockname())
    peer, _ = srv.accept()
    srv.close()
    cli.setblocking(False)
    sent = 0
    try:
        while sent < 64 << 20:
            sent += cli.send(b"q" * 65536)
    except BlockingIOError:
        pass
    cli.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, LINGER))
    return cli, peer, sent


FD_CASES = [(when, kind) for when in ("hello", "lookup", "publish")
            for kind in ("tcp-linger", "pipe")]


def ag_fd_prepare(st):
    """Connections for the descriptor attacks (those sending a LOOKUP or a
    PUBLISH say HELLO first), and the descriptors to send."""
    st["fd"] = {}
    for when, kind in FD_CASES:
        c = w.Conn(SOCK, proto=PROTO, timeout=4 * LINGER + 10)
        st["conns"][f"fd-{when}-{kind}"] = c
        if when != "hello":
            m = c.hello("b", name=f"fd-{when}")
            if m.type != w.HELLO_REPLY:
                return f"HELLO refused: {m!r}"
        if kind == "pipe":
            r, wr = os.pipe()
            st["keep"] += [r, wr]
            st["fd"][(when, kind)] = (wr, None)
        else:
            cli, peer, _ = _lingering_socket()
            st["fd"][(when, kind)] = (cli, peer)
    return "ready"


def ag_fd_send(st):
    """Each packet with its descriptor: 'EPERM', another errno or 'sent'.  A
    lingering socket that was sent is closed here at once, so that the
    broker's copy is its last (the test holds the broker stopped meanwhile)."""
    out = {}
    for when, kind in FD_CASES:
        c = st["conns"][f"fd-{when}-{kind}"]
        obj, peer = st["fd"][(when, kind)]
        fd = obj if kind == "pipe" else obj.fileno()
        h = (random.getrandbits(64), random.getrandbits(64))
        if when == "hello":
            data = w.encode_hello(c.next_seq(), "b", name="fd-hello", proto=PROTO)
        elif when == "lookup":
            data = w.encode_lookup(c.next_seq(), [(h[0], h[1], 1)])
        else:
            data = w.encode_publish(c.next_seq(), [(h[0], h[1], 1)], [w.ZERO_PAGE])
        try:
            c.send(data, [fd])
            out[f"{when}/{kind}"] = "sent"
        except OSError as e:
            out[f"{when}/{kind}"] = errno.errorcode.get(e.errno, str(e.errno))
            continue
        if kind == "tcp-linger":
            os.close(obj.detach())
            st["fd"][(when, kind)] = (None, peer)
    return out


def ag_fd_after(st, sent):
    """The replies to what was sent, then a harmless request on each
    connection: still served, or dropped?"""
    out = {}
    for when, kind in FD_CASES:
        c = st["conns"][f"fd-{when}-{kind}"]
        try:
            if sent[f"{when}/{kind}"] == "sent":
                out[f"{when}/{kind} reply"] = summary(c.recv())["type"]
            if when == "hello":
                m = c.hello("b", name="fd-hello")
            else:
                m = c.lookup([(random.getrandbits(64), random.getrandbits(64), 2)])
            out[f"{when}/{kind} then"] = summary(m)["type"]
        except (OSError, socket.timeout) as e:
            out[f"{when}/{kind} then"] = f"dropped ({e!r})"
    return out


def ag_fd_release(st):
    """Let go of the lingering sockets at once (an abortive close)."""
    for obj, peer in st.pop("fd", {}).values():
        for sk in (obj, peer):
            if isinstance(sk, socket.socket):
                sk.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sk.close()
    for key in [k for k in st["conns"] if k.startswith("fd-")]:
        ag_close(st, key)
    return True


def ag_slow_reader(st, seconds):
    """LOOKUPs sent without ever reading a reply, until the broker gives up
    on us (or seconds pass)."""
    c = w.Conn(SOCK, proto=PROTO, timeout=20)
    st["conns"]["slow"] = c
    m = c.hello("b", name="slow-reader")
    if m.type != w.HELLO_REPLY:
        return {"hello": summary(m)}
    c.sock.setblocking(False)
    packet = w.encode_lookup(0, [(random.getrandbits(64), random.getrandbits(64), i)
                                 for i in range(w.MAX_LOOKUP)])
    sent, stop, why = 0, time.monotonic() + seconds, "time"
    while time.monotonic() < stop:
        try:
            c.send(packet[:8] + struct.pack("<I", c.next_seq()) + packet[12:])
            sent += 1
        except BlockingIOError:
            time.sleep(0.01)
        except OSError as e:
            why = errno.errorcode.get(e.errno, str(e.errno))
            break
    return {"sent": sent, "stopped": why}


def ag_slow_reader_drain(st):
    """Read what the broker sent before it dropped us: replies, then the end?"""
    c = st["conns"].pop("slow")
    c.sock.settimeout(5)
    n = 0
    try:
        while True:
            if c.recv() is None:
                return {"replies": n, "end": "EOF"}
            n += 1
    except (OSError, socket.timeout) as e:
        return {"replies": n, "end": repr(e)}
    finally:
        c.close()


def ag_open_idle(st, n, extra, domain, path=SOCK):
    """n connections that say HELLO and then nothing, then extra more tries."""
    st.setdefault("idle", [])
    ok, refused = 0, []
    for i in range(n + extra):
        c = None
        try:
            c = w.Conn(path, proto=PROTO, timeout=10)
            m = c.hello(domain, name=f"idle-{i}")
        except OSError as e:
            # Refused before our HELLO was read: the reset comes first, the
            # broker's reason after it.
            why = repr(e)
            try:
                m = c.recv() if c is not None else None
                why += f", then {m.message if m is not None else 'EOF'}"
            except OSError:
                pass
            refused.append(why)
            if c is not None:
                c.close()
            continue
        if m.type == w.HELLO_REPLY:
            os.close(c.pool_fd)     # descriptors are the scarce thing here
            c.pool_fd = -1
            st["idle"].append(c)
            ok += 1
        else:
            refused.append(m.message)
            c.close()
    return {"connected": ok, "refused": refused}


def ag_open_unauth(st, n, path=SOCK):
    """n connections that never say HELLO; which did the broker refuse at once?"""
    conns = [w.Conn(path, proto=PROTO, timeout=10) for _ in range(n)]
    time.sleep(0.5)
    kept, refused = [], []
    for c in conns:
        if select.select([c.sock], [], [], 0)[0]:
            try:
                m = c.recv()
                refused.append(m.message if m is not None else "EOF")
            except OSError as e:
                refused.append(repr(e))
            c.close()
        else:
            kept.append(c)
    st["unauth"] = kept
    return {"kept": len(kept), "refused": refused}


def ag_unauth_closed(st):
    """How many of the kept silent connections has the broker closed?"""
    closed = 0
    for c in st["unauth"]:
        if select.select([c.sock], [], [], 0)[0]:
            try:
                while c.recv() is not None:
                    pass
                closed += 1
            except OSError:
                closed += 1
    return closed


def ag_make_orphans(st, path, domain, n):
    """Connections that take a reference and drop, from this one live
    process: each leaves the broker an orphan holding the reference."""
    page = bytes([0x0F]) * PAGE
    h = w.hash_page(page)
    first, second = w.Conn(path, proto=PROTO), w.Conn(path, proto=PROTO)
    first.hello(domain, name="orphan-maker")
    second.hello(domain, name="orphan-maker")
    first.lookup([(h[0], h[1], 1)])
    second.lookup([(h[0], h[1], 2)])
    second.publish([(h[0], h[1], 2)], [page])
    first.close()
    second.close()
    made, why = 0, None
    for i in range(n):
        try:
            c = w.Conn(path, proto=PROTO, timeout=10)
            m = c.hello(domain, name=f"orphan-{i}")
            if m.type != w.HELLO_REPLY:
                why = m.message
                c.close()
                break
            c.lookup([(h[0], h[1], 3)])
            c.close()
            made += 1
        except OSError as e:
            why = repr(e)
            break
    return {"dropped": made, "stopped": why}


def ag_close_all(st):
    for c in st.pop("idle", []) + st.pop("unauth", []):
        c.close()
    for key in list(st["conns"]):
        ag_close(st, key)
    return True


# ---- the test ------------------------------------------------------------------

def group(title, fn):
    t.diag(f"--- {title}")
    try:
        fn()
    except Exception:
        t.check(False, f"{title}: the group ran to its end", traceback.format_exc())


def real_clients_ok(label):
    """Every real client still reads its data; a's pool still holds a's pages."""
    for cl in live_clients:
        r = cl.do("check")
        t.check(r["ok"] and r["merged"] == cl.merged,
                f"{label}: {cl.name} reads its {cl.merged} merged pages intact", r)
    r = r1.do("pool-check")
    t.check(r["ok"] and r["checked"] == SECRET_PAGES,
            f"{label}: domain a's pool holds a's pages unchanged", r)


def result_names(s):
    return set(s.get("results", {})) if isinstance(s, dict) else set()


def merge_pair(x, y, pages, seed):
    """x and y fill the same pages and merge them: all shared."""
    for cl in (x, y):
        cl.do(f"fill {pages} {seed}")
    x.do("merge")
    y.do("merge")
    rx = x.do("merge")
    x.merged = y.merged = pages
    return rx


broker = Broker()
live_clients = []
agents = []
X = Agent(ATTACKER, "X")
P = Agent(PRIV_ATTACKER, "P")
agents += [X, P]


def setup():
    global r1, r2
    r1, r2 = Client("vm-a1"), Client("vm-a2")
    for cl in (r1, r2):
        t.check(cl.connect("a")["ok"], f"real client {cl.name} joins domain a")
    merge_pair(r1, r2, SECRET_PAGES, SECRET_SEED)
    live_clients.extend([r1, r2])
    d = domain("a")
    t.equal((d.get("slots"), d.get("pages-shared")), (SECRET_PAGES, 2 * SECRET_PAGES),
            "domain a: 4 MiB of secret pages merged by two real clients")


r1 = r2 = None
group("setup", setup)
A_SLOTS = []


def attack_read():
    global A_SLOTS
    # A root client of a looks the pages up: the test's copy of the pattern is
    # right, and these are a's slot numbers (for the RESTORE attacks).
    root = w.Conn(SOCK, proto=PROTO)
    root.hello("a", name="root-probe")
    m = root.lookup([(lo, hi, i) for i, (lo, hi) in enumerate(SECRET_HASHES)])
    A_SLOTS = [s for r, s in m.results if r == w.HIT]
    t.equal(len(A_SLOTS), SECRET_PAGES, "the test's secret pattern is domain a's (all hit)")
    root.unref(A_SLOTS)
    root.close()
    a_ino = domain("a").get("pool-inode")
    for agent, dom, what in ((X, "b", "domain b"), (P, "", "a private domain")):
        h = agent.call(ag_hello, "read", dom)
        t.equal(h["type"], "HELLO_REPLY", f"attacker in {what} connects and gets a descriptor")
        if a_ino is not None:
            t.check(h.get("fd_ino") != a_ino, f"{what}: its descriptor is not a's pool",
                    f"a's pool inode {a_ino}, got {h.get('fd_ino')}")
        r = agent.call(ag_read_pool, "read", SECRET_HASHES)
        t.equal((r["pread_secret"], r["mmap_secret"]), (0, 0),
                f"{what}: no page of a read through the descriptor (pread, mmap)", r)
        t.equal((r["pread_nonzero"], r["mmap_nonzero"], r["private_nonzero"]), (0, 0, 0),
                f"{what}: nothing but zeros to read in an empty domain", r)
        t.equal(r["blocks"], 0, f"{what}: fstat st_blocks 0: no sign of a's activity", r)
        t.check(r["seek_data"] is None and r["seek_hole"] == 0,
                f"{what}: SEEK_DATA finds no data, SEEK_HOLE a hole at 0", r)
        t.equal(r["size"], POOL_SLOTS * PAGE, f"{what}: st_size is the configured maximum only")
        agent.call(ag_close, "read")
    real_clients_ok("after reading through descriptors")


group("1. read another domain's pages through the descriptor", attack_read)


def attack_grab_slots():
    root = w.Conn(SOCK, proto=PROTO)
    root.hello("a", name="root-restorer")
    X.call(ag_hello, "x", "b")
    P.call(ag_hello, "p", "")
    before = ctl("stats")
    dom_before = {n: domain(n) for n in ("a", "b")}
    # Another domain's slots, with their exact hashes, outside recovery.
    a_entries = [(s, lo, hi) for s, (lo, hi) in zip(A_SLOTS, SECRET_HASHES)]
    r = X.call(ag_restore, "x", a_entries)
    t.check(result_names(r) <= {"refused", "mismatch"} and not r.get("slots"),
            "RESTORE of a's slots with their hashes from domain b, no restart: refused", r)
    if PROTO >= 2:
        t.equal(r["results"].get("refused"), len(a_entries), "... every one REFUSED", r)
    # Free slots, with the zero page's hash and garbage, from every kind of domain.
    grabbed = {}
    for who, call in (("domain b", lambda k: X.call(ag_restore_sweep, "x", 0, POOL_SLOTS, k)),
                      ("a private domain",
                       lambda k: P.call(ag_restore_sweep, "p", 0, POOL_SLOTS, k)),
                      ("a member of domain a", None)):
        for kind in ("zero", "garbage"):
            if call is None:
                res = ag_restore_sweep({"conns": {"r": root}}, "r", 0, POOL_SLOTS, kind)
            else:
                res = call(kind)
            grabbed[(who, kind)] = res
            t.check(not res.get("slots") and result_names(res) <= {"refused", "mismatch"},
                    f"RESTORE of all {POOL_SLOTS} slots with {kind} hashes from {who}: "
                    "nothing restored", res)
    after = ctl("stats")
    for key in ("slots-used", "pool-resident-bytes", "pages-shared", "saved-bytes",
                "restored"):
        t.equal(after.get(key), before.get(key), f"stats {key} unchanged by the RESTOREs")
    for n in ("a", "b"):
        d = domain(n)
        t.equal((d.get("slots"), d.get("pages-shared")),
                (dom_before[n].get("slots"), dom_before[n].get("pages-shared")),
                f"domain {n}: slots and references unchanged")
    # UNREF of references it does not hold: a's slots, huge numbers.
    a_refs = domain("a").get("pages-shared")
    for what, slots in (("a's slots", A_SLOTS[:16]),
                        ("huge slot numbers", [1 << 40, (1 << 64) - 1])):
        r = X.call(ag_unref, "x", slots)
        t.equal(r.get("error"), "not-held", f"UNREF of {what} from domain b: NOT_HELD", r)
    t.equal(domain("a").get("pages-shared"), a_refs, "... a's references unchanged")
    # Handing back a live domain's pool it does not hold, without a restart.
    own = X.call(ag_hello, "own-b", "b")
    a_ino = domain("a").get("pool-inode", own.get("fd_ino"))   # version 1: one pool
    for dom in ("b", "a"):
        r = X.call(ag_hello, "re", dom, reconnect=True, pool_dev=own["fd_dev"],
                   pool_ino=a_ino, pool_fd=own["fd"])
        t.check(r.get("error") in ("denied", "pool-changed"),
                f"RECONNECT to {dom} naming a's live pool with its own descriptor: "
                "refused", r)
    X.call(ag_close, "re")
    X.call(ag_close, "own-b")
    # Slot numbers far beyond the pool.
    meta = ctl("stats").get("metadata-bytes", 0)
    huge = [(1 << 40, *ZERO_HASH), ((1 << 63) + 5, *ZERO_HASH), ((1 << 64) - 1, 1, 2),
            (POOL_SLOTS, *ZERO_HASH)]
    r = X.call(ag_restore, "x", huge)
    t.check(not r.get("slots"), "RESTORE of huge slot numbers: nothing restored", r)
    t.check(ctl("stats").get("metadata-bytes", 0) - meta < 4096,
            "... and the metadata does not grow",
            f"{meta} -> {ctl('stats').get('metadata-bytes')}")
    t.check(X.call(ag_lookup, "x", [ZERO_HASH])["type"] == "LOOKUP_REPLY",
            "the attacker's connection is still served (no crash)")
    # Give back whatever an old broker let them grab.
    for agent, key in ((X, "x"), (P, "p")):
        slots = sorted({s for (who, _), res in grabbed.items() for s in res.get("slots", [])
                        if who.startswith("domain b" if key == "x" else "a private")})
        if slots:
            agent.call(ag_unref, key, slots)
        agent.call(ag_close, key)
    root.close()
    real_clients_ok("after the RESTORE attacks")


group("3 (and 2, outside recovery). claim slots with RESTORE", attack_grab_slots)


def attack_refcount():
    global r3, r4
    r3, r4 = Client("vm-s1"), Client("vm-s2")
    for cl in (r3, r4):
        cl.connect("shared")
    merge_pair(r3, r4, SHARED_PAGES, SHARED_SEED)
    live_clients.extend([r3, r4])
    d = domain("shared")
    t.equal((d.get("slots"), d.get("pages-shared")), (SHARED_PAGES, 2 * SHARED_PAGES),
            "domain shared: two real clients share 1 MiB")
    target = w.hash_page(fill_page(SHARED_SEED, 0))
    slots = set()
    for key in ("h1", "h2"):
        X.call(ag_hello, key, "shared")
        r = X.call(ag_lookup_same, key, target, 50)
        t.equal(r.get("results"), {"hit": 50 * w.MAX_LOOKUP},
                f"attacker connection {key}: 51,200 LOOKUPs of one hash, all hits", r)
        slots.update(r.get("slots", []))
    t.equal(len(slots), 1, "... all of one slot")
    d = domain("shared")
    t.equal(d.get("pages-shared"), 2 * SHARED_PAGES + 2,
            "102,400 hits leave one reference per attacker connection on the slot", d)
    t.equal(d.get("saved-bytes"), (SHARED_PAGES + 2) * PAGE, "saved-bytes not inflated", d)
    per_client = {c["name"]: c["slots"] for c in ctl("clients") if c["name"] in ("h1", "h2")}
    t.equal(per_client, {"h1": 1, "h2": 1}, "each attacker connection holds one slot")
    slot = sorted(slots)[0] if slots else 0
    r = X.call(ag_unref, "h1", [slot])
    t.equal(r.get("type"), "OK", "one UNREF releases the attacker's reference", r)
    r = X.call(ag_unref, "h1", [slot])
    t.equal(r.get("error"), "not-held", "a second UNREF of it is NOT_HELD", r)
    t.equal(domain("shared").get("pages-shared"), 2 * SHARED_PAGES + 1,
            "the count went down by exactly one")
    t.equal(X.call(ag_unref, "h2", [slot]).get("type"), "OK", "the other one releases its own")
    X.call(ag_close, "h1")
    X.call(ag_close, "h2")
    t.equal(domain("shared").get("pages-shared"), 2 * SHARED_PAGES,
            "the slot has the real clients' references only")
    real_clients_ok("after the reference-count attack")


r3 = r4 = rq = None
group("4. wrap a reference count", attack_refcount)


def attack_candidates():
    results = {}
    F = Agent(FLOODER, "F")
    agents.append(F)
    for key, kind in (("f-random", "random"), ("f-chosen", "chosen")):
        F.call(ag_hello, key, "shared")
        s0, cpu0 = ctl("stats"), broker.cpu_seconds()
        r = F.call(ag_flood, key, kind, 100, 30, timeout=120)
        s1, cpu1 = ctl("stats"), broker.cpu_seconds()
        results[kind] = (r, s0, s1, cpu1 - cpu0)
        t.check(r.get("lookups", 0) >= 100 * w.MAX_LOOKUP,
                f"{kind} flood: 102,400 LOOKUPs answered within 30 s", r)
        F.call(ag_close, key)
    F.stop()
    agents.remove(F)
    (_, r0, r1_, rcpu), (cr, c0, c1, ccpu) = results["random"], results["chosen"]
    if "table-probes" in c1:
        def per_lookup(before, after):
            return ((after["table-probes"] - before["table-probes"]) /
                    max(1, after["lookups"] - before["lookups"]))

        avg_random, avg_chosen = per_lookup(r0, r1_), per_lookup(c0, c1)
        t.diag(f"table probes per lookup: random hashes {avg_random:.2f}, "
               f"chosen low bits {avg_chosen:.2f}")
        t.check(avg_chosen < 2 * avg_random + 1 and avg_chosen < 12,
                "hashes sharing their low 24 bits cost no more probes than random ones "
                f"({avg_chosen:.2f} vs {avg_random:.2f} per lookup)")
    else:
        t.diag(f"broker CPU: random flood {rcpu:.2f} s, chosen flood {ccpu:.2f} s "
               f"({cr.get('lookups')} lookups in {cr.get('seconds', 0):.1f} s)")
        t.check(False, "the broker reports table-probes (no: judged by CPU instead)")
        t.check(ccpu < 3 * rcpu + 1 and cr.get("lookups", 0) >= 100 * w.MAX_LOOKUP,
                f"chosen hashes cost about what random ones do ({ccpu:.2f} s vs {rcpu:.2f} s)")
    refused = c1.get("candidates-refused", 0) - c0.get("candidates-refused", 0)
    t.check(refused >= 100 * w.MAX_LOOKUP - 2 * CLIENT_CANDIDATES,
            f"one user's candidates are capped (uid-candidates): {refused} refused")
    r5, r6 = Client("vm-s3"), Client("vm-s4")
    for cl in (r5, r6):
        cl.connect("shared")
    merge_pair(r5, r6, SHARED_PAGES, FRESH_SEED)
    res = [cl.do("check") for cl in (r5, r6)]
    t.check(all(x["ok"] and x["merged"] == SHARED_PAGES for x in res),
            "after the flood, two real clients still merge new pages of their own", res)
    r5.exit()
    r6.exit()
    real_clients_ok("after the candidate flood")


group("5. flood the candidates with chosen hash bits", attack_candidates)


def attack_descriptors():
    t.equal(X.call(ag_fd_prepare), "ready", "attacker connections and descriptors ready")
    # Held stopped while they are sent, so that the attacker's copies are gone
    # before the broker could get and close one (a broker holding the last
    # reference of a lingering socket would block in close for LINGER s).
    broker.proc.send_signal(signal.SIGSTOP)
    try:
        sent = X.call(ag_fd_send)
    finally:
        broker.proc.send_signal(signal.SIGCONT)
    t.check(ctl_answers(3), "right after: the control socket answers within 3 s")
    t.check(answered(r1, "lookup-only", 3), "right after: a real client's LOOKUP is "
            "answered within 3 s")
    after = X.call(ag_fd_after, sent, timeout=8 * LINGER + 60)
    t.diag(json.dumps(sent))
    t.diag(json.dumps(after))
    for when, kind in FD_CASES:
        got = sent.get(f"{when}/{kind}", "")
        then = after.get(f"{when}/{kind} then", "")
        t.check(got == "EPERM" or "dropped" in then,
                f"a descriptor ({kind}) with {when.upper()}: EPERM at the sender "
                "(or dropped)", f"{got}; then {then}")
        if got == "EPERM" and when == "hello":
            t.equal(then, "HELLO_REPLY", "... and the connection is still served")
    X.call(ag_fd_release)
    if not ctl_answers(3):
        time.sleep(4 * LINGER)
    real_clients_ok("after the descriptor attacks")


group("6. send descriptors", attack_descriptors)


def attack_slow_reader():
    r = X.call(ag_slow_reader, 5)
    t.diag(json.dumps(r))
    t.check(ctl_answers(3), "while a client does not read its replies, the control "
            "socket answers")
    t.check(answered(r1, "lookup-only", 3), "... and a real client is served")
    d = X.call(ag_slow_reader_drain)
    t.check(d.get("end") == "EOF" or "Reset" in d.get("end", ""),
            "the client that does not read its replies is dropped", d)
    real_clients_ok("after the slow reader")


group("9. never read the replies", attack_slow_reader)


def attack_restart():
    # The attacker makes domain b hold a page, so that b too recovers.
    X.call(ag_hello, "b1", "b")
    X.call(ag_hello, "b2", "b")
    q = bytes([0x51]) * PAGE
    r = X.call(ag_store_page, "b1", "b2", q)
    t.check(r.get("results") == {"stored": 1}, "the attacker stores a page of its own in b", r)
    b_fd = X.call(ag_keep_pool, "b2")
    a_ino = domain("a").get("pool-inode")
    hb = X.call(ag_hello, "probe", "b")
    b_dev, b_ino = hb.get("fd_dev"), hb.get("fd_ino")
    if a_ino is None:       # one pool for all (version 1): a's pool is the one it holds
        a_ino = b_ino
    fake = X.call(ag_fake_pool, POOL_SLOTS * PAGE)
    # A real client of a private domain, and an attacker in a private domain
    # of its own that will name the real one's pool.
    global rq
    rq = Client("vm-private-1")
    rq.connect("-")
    rq.do("fill 64 11 uniform")
    rq.do("merge")
    rq.do("merge")
    rq.merged = 64
    live_clients.append(rq)
    me = [x for x in ctl("clients") if x["name"] == "vm-private-1"]
    rq_id = me[0].get("domain-id") if me else None
    rq_dom = [d for d in ctl("domains") if rq_id is not None and d.get("id") == rq_id]
    rq_ino = (rq_dom[0].get("pool-inode") if rq_dom else None) or b_ino  # version 1: one pool
    hp = P.call(ag_hello, "own-p", "")
    t.equal(hp.get("type"), "HELLO_REPLY", "an attacker gets a private domain", hp)
    p_fd = P.call(ag_keep_pool, "own-p")
    P.call(ag_close, "own-p")
    for key in ("b1", "b2", "probe"):
        X.call(ag_close, key)
    a_before = domain("a")

    def state_current():
        # The broker may write its state file at its next tick only.
        try:
            with open(SOCK + ".state") as f:
                text = f.read()
        except FileNotFoundError:
            return False
        return all(f"ino={d.get('pool-inode', b_ino)}\n" in text for d in ctl("domains"))

    t.wait("the state file to name every pool", state_current, 5, step=0.2)

    broker.stop(signal.SIGKILL)
    restart = time.monotonic()
    globals()["broker"] = Broker()
    # The attacker is first to reconnect, naming a's pool.
    tries = {
        "domain b, a's pool, its own b pool's descriptor":
            dict(domain="b", pool_dev=b_dev, pool_ino=a_ino, pool_fd=b_fd),
        "domain b, a's pool, a memfd named qemu-dedup-pool":
            dict(domain="b", pool_dev=b_dev, pool_ino=a_ino, pool_fd=fake["fd"]),
        "domain b, its fake pool":
            dict(domain="b", pool_dev=fake["dev"], pool_ino=fake["ino"], pool_fd=fake["fd"]),
        "domain a, a's pool, a memfd named qemu-dedup-pool":
            dict(domain="a", pool_dev=b_dev, pool_ino=a_ino, pool_fd=fake["fd"]),
    }
    for what, kw in tries.items():
        r = X.call(ag_hello, "re", reconnect=True, **kw)
        t.check(r.get("error") in ("denied", "pool-changed"),
                f"after a restart, RECONNECT naming {what}: DENIED or POOL_CHANGED", r)
        t.check(not r.get("adopted"), "... and nothing adopted")
        X.call(ag_close, "re")
    # A member of a (root) that does not hold a's pool names it with a fake.
    me = ag_fake_pool({"keep": []}, POOL_SLOTS * PAGE)
    root = w.Conn(SOCK, proto=PROTO)
    m = root.hello("a", name="root-fake", reconnect=True, pool_dev=b_dev, pool_ino=a_ino,
                   pool_fd=me["fd"])
    t.check(m.type == w.ERROR and m.error in ("denied", "pool-changed"),
            "a client of a handing back a fake for a's pool: DENIED or POOL_CHANGED", m)
    root.close()
    os.close(me["fd"])
    r = P.call(ag_hello, "re", "", reconnect=True, pool_dev=hp.get("fd_dev", b_dev),
               pool_ino=rq_ino, pool_fd=p_fd)
    t.check(r.get("error") in ("denied", "pool-changed") and not r.get("adopted"),
            "a private-domain attacker naming another private domain's pool with its own "
            "descriptor: DENIED or POOL_CHANGED, nothing adopted", r)
    P.call(ag_close, "re")
    st = ctl("stats")
    t.check(not domain("a"), "a's pool is not adopted by any of them",
            json.dumps(ctl("domains")))
    t.check(st.get("pools-pending", 1) >= 1, "a's pool still waits for its clients", st)
    # The attacker's own pool back, honestly: then RESTORE a's slots in b.
    r = X.call(ag_hello, "xr", "b", reconnect=True, pool_dev=b_dev, pool_ino=b_ino,
               pool_fd=b_fd)
    t.equal(r.get("type"), "HELLO_REPLY", "the attacker hands its own pool back", r)
    a_entries = [(s, lo, hi) for s, (lo, hi) in zip(A_SLOTS, SECRET_HASHES)]
    r = X.call(ag_restore, "xr", a_entries)
    t.check(not r.get("slots") and result_names(r) <= {"refused", "mismatch"},
            "RESTORE of a's slot numbers with a's hashes in b while recovering: "
            "REFUSED/MISMATCH", r)
    stolen = collections.Counter(r.get("slots", []))
    r = X.call(ag_restore_sweep, "xr", 0, POOL_SLOTS, "zero")
    t.check(not r.get("slots"), "RESTORE of every slot with the zero page's hash while "
            "recovering: nothing restored", r)
    stolen.update(r.get("slots", []))
    # The rightful clients come back.
    ra = r1.do(f"reconnect {SOCK}")
    rb = r2.do(f"reconnect {SOCK}")
    t.diag(f"reconnected {time.monotonic() - restart:.1f} s after the restart")
    t.check(ra.get("ok") and ra.get("adopted") and ra.get("restored") == SECRET_PAGES,
            "a's first client hands a's pool back (adopted) and restores all its pages", ra)
    t.check(rb.get("ok") and rb.get("restored") == SECRET_PAGES,
            "a's second client restores all its pages", rb)
    for cl in (r3, r4):
        rr = cl.do(f"reconnect {SOCK}")
        t.check(rr.get("ok") and rr.get("restored") == SHARED_PAGES,
                f"{cl.name} reconnects to shared and restores its pages", rr)
    rr = rq.do(f"reconnect {SOCK}")
    t.check(rr.get("ok") and rr.get("adopted") and rr.get("restored") == 1,
            "the private-domain client takes its own pool back and restores its slot", rr)
    r = X.call(ag_restore, "xr", a_entries)
    t.check(not r.get("slots"), "the attacker's RESTORE of a's slots again: nothing", r)
    stolen.update(r.get("slots", []))
    d = domain("a")
    t.equal((d.get("pages-shared"), d.get("slots")), (2 * SECRET_PAGES, SECRET_PAGES),
            "domain a: its references and slots rebuilt, exactly", d)
    if "restored" in domain("b"):
        t.equal(domain("b")["restored"], 0, "domain b restored nothing")
    t.wait("recovery to end", lambda: not ctl("stats").get("recovering"),
           3 * RESTART_GRACE + 10)
    d = domain("a")
    t.equal((d.get("slots"), d.get("pages-shared"), d.get("slots-held", 0)),
            (SECRET_PAGES, 2 * SECRET_PAGES, 0), "after recovery: a's slots all in use, "
            "none held or lost", d)
    t.equal(domain("a").get("pool-inode", a_before.get("pool-inode")),
            a_before.get("pool-inode"), "a kept its pool")
    # Whatever it got, the attacker lets go of: slots nobody else holds are
    # freed, whoever still maps them.
    if stolen:
        t.diag(f"the attacker restored {len(stolen)} slots; it releases them")
        X.call(ag_unref, "xr", sorted(stolen.elements()))
        time.sleep(RESTART_GRACE)
    X.call(ag_close, "xr")
    real_clients_ok("after the restart")


group("2. claim slots while the broker recovers from a restart", attack_restart)


def attack_idle():
    idlers = [Agent(uid, f"idle-{uid}") for uid in IDLE_UIDS]
    agents.extend(idlers)
    held = 0
    for ag in idlers:
        r = ag.call(ag_open_idle, UID_CONNECTIONS, 3, "b")
        held += r["connected"]
        t.equal(r["connected"], UID_CONNECTIONS, f"{ag.name}: {UID_CONNECTIONS} idle "
                "connections after HELLO")
        t.check(len(r["refused"]) == 3 and all("uid-connections" in x for x in r["refused"]),
                f"{ag.name}: at uid-connections the next ones are refused, saying why",
                r["refused"][:1])
    hs = Agent(HANDSHAKE_UID, "silent")
    agents.append(hs)
    r = hs.call(ag_open_unauth, UID_HANDSHAKES + 4)
    t.equal(r["kept"], UID_HANDSHAKES, f"a uid gets {UID_HANDSHAKES} connections before HELLO")
    t.check(len(r["refused"]) == 4 and all("uid-handshakes" in x for x in r["refused"]),
            "... the others are refused, saying why", r["refused"][:1])
    t.diag(f"{held + r['kept']} idle connections")
    opened = time.monotonic()
    cpu0 = broker.cpu_seconds()
    time.sleep(3)
    cpu = (broker.cpu_seconds() - cpu0) / 3
    t.check(cpu < 0.5, f"with {held + r['kept']} idle connections the broker does not "
            f"spin ({cpu * 100:.0f}% of a core)")
    t.check(ctl_answers(3), "the control socket answers")
    t.check(ctl("stats").get("clients", 0) >= held, "it counts the idle clients")
    rn = Client("vm-a3")
    t.check(rn.connect("a").get("ok"), "a real client of another uid connects meanwhile")
    rn.do(f"fill {SECRET_PAGES} {SECRET_SEED}")
    m = rn.do("merge")
    t.equal((m.get("hit"), m.get("merged")), (SECRET_PAGES, SECRET_PAGES),
            "... and merges a's pages: all hits", m)
    t.check(rn.do("check").get("ok"), "... correctly")
    rn.exit()
    t.wait("silent connections to be closed",
           lambda: hs.call(ag_unauth_closed) == UID_HANDSHAKES,
           HANDSHAKE_TIMEOUT + 4, step=0.25)
    closed = hs.call(ag_unauth_closed)
    t.equal(closed, UID_HANDSHAKES, f"connections that never say HELLO are closed after "
            f"handshake-timeout ({HANDSHAKE_TIMEOUT} s; {time.monotonic() - opened:.1f} s)")
    for ag in idlers + [hs]:
        ag.call(ag_close_all)
        ag.stop()
        agents.remove(ag)
    t.wait("idle clients to go", lambda: ctl("stats").get("clients", 0) < 50, 10)
    real_clients_ok("after the idle connections")


group("7. 600 idle connections", attack_idle)


def attack_nofile():
    small = Broker(SMALL_SOCK, SMALL_CONTROL, small_config, os.path.join(tmp, "small.log"),
                   nofile=SMALL_NOFILE)
    try:
        idlers = [Agent(uid, f"idle-{uid}") for uid in IDLE_UIDS]
        agents.extend(idlers)
        held, refused = 0, []
        for ag in idlers:
            r = ag.call(ag_open_idle, 50, 0, "b", path=SMALL_SOCK)
            held += r["connected"]
            refused += r["refused"]
        t.diag(f"{held} connections held, {len(refused)} refused: {refused[:1]}")
        t.check(0 < held < 150 and refused and all("descriptor limit" in x for x in refused),
                f"with RLIMIT_NOFILE {SMALL_NOFILE}, the broker takes the clients that fit "
                "and refuses the rest, saying why", refused[:2])
        # And connections that never say HELLO, beyond that.
        silent = [ag.call(ag_open_unauth, UID_HANDSHAKES, path=SMALL_SOCK) for ag in idlers]
        t.diag(f"silent connections: {[x['kept'] for x in silent]} kept, "
               f"{sum(len(x['refused']) for x in silent)} refused")
        t.check(all(x["kept"] == 0 for x in silent),
                "at the limit, connections that would not say HELLO are refused too",
                [x["refused"][:1] for x in silent])
        cpu0 = small.cpu_seconds()
        time.sleep(2)
        cpu = (small.cpu_seconds() - cpu0) / 2
        t.check(cpu < 0.5, f"at its limit it does not spin ({cpu * 100:.0f}% of a core)")
        t.check(ctl_answers(3, control=SMALL_CONTROL), "at its limit its control socket "
                "answers")
        t.check(small.alive(), "it lives")
        for ag in idlers:
            ag.call(ag_close_all)
            ag.stop()
            agents.remove(ag)
        t.wait("the idle clients to go",
               lambda: ctl("stats", control=SMALL_CONTROL).get("clients", 0) == 0, 10)
        rn = Client("vm-small")
        t.check(rn.connect("b", sock=SMALL_SOCK).get("ok"), "once they are gone, a real "
                "client connects")
        rn.exit()
        # One live process that drops its connections, each holding a reference.
        om = Agent(ATTACKER, "orphan-maker")
        agents.append(om)
        r = om.call(ag_make_orphans, SMALL_SOCK, "b", 150)
        st = ctl("stats", control=SMALL_CONTROL)
        t.diag(f"one process with no connection open left {st.get('orphans')} orphans "
               f"({r})")
        rn = Client("vm-small-2")
        got = rn.connect("b", sock=SMALL_SOCK)
        t.check(st.get("orphans", 0) <= 1, "one process and domain leave one orphan: later "
                "ones are merged into it", st.get("orphans"))
        t.check(got.get("ok"), "while one process of another uid leaves orphans, a real "
                "client still connects", got)
        rn.exit()
        om.stop()
        agents.remove(om)
        t.wait("the orphans to go",
               lambda: ctl("stats", control=SMALL_CONTROL).get("orphans", 0) == 0, 10)
        rn = Client("vm-small-3")
        t.check(rn.connect("b", sock=SMALL_SOCK).get("ok"), "once its process is gone, a "
                "real client connects")
        rn.exit()
    finally:
        small.stop()
    real_clients_ok("after filling the second broker")


group("7b. at the descriptor limit", attack_nofile)


def attack_secrets():
    g, g2, n = Agent(GUESSER, "guesser"), Agent(OTHER_GUESSER, "other"), Agent(NAMER, "namer")
    agents.extend([g, g2, n])
    replies = []
    for i in range(AUTH_FAILURES):
        replies.append(g.call(ag_hello, "g", "gold", secret=f"guess-{i}"))
    t.check(all(r.get("error") == "denied" and "secret" in r.get("message", "")
                for r in replies), f"{AUTH_FAILURES} wrong secrets: refused", replies[:1])
    r = g.call(ag_hello, "g", "gold", secret=GOLD_SECRET)
    t.check(r.get("error") == "denied" and "too many" in r.get("message", ""),
            "then the right secret from the same uid: refused as rate-limited", r)
    more = [g.call(ag_hello, "g", "gold", secret=f"more-{i}") for i in range(3)]
    t.check(all("too many" in x.get("message", "") for x in more),
            "... and further guesses too, without being compared", more)
    r = g2.call(ag_hello, "right", "gold", secret=GOLD_SECRET)
    t.equal(r.get("type"), "HELLO_REPLY", "another uid with the right secret is not affected")
    r = n.call(ag_hello, "unknown", "no-such-tenant")
    t.check(r.get("error") == "denied" and "no-such-tenant" in r.get("message", ""),
            "a domain that is not declared is refused, by name", r)
    text = log_text()
    lines = [x for x in text.splitlines()
             if "authentication failed" in x and f"uid {GUESSER}" in x]
    t.check(len(lines) >= AUTH_FAILURES, "the broker logs the failures (without --verbose)",
            lines[:2])
    t.check(any("too many failed authentications" in x and f"uid {GUESSER}" in x
                for x in text.splitlines()), "... and the rate limiting")
    t.check(ctl("stats").get("auth-failures", 0) >= AUTH_FAILURES + 4,
            "stats count the failed authentications")
    for ag in (g, g2, n):
        ag.call(ag_close_all)
    real_clients_ok("after guessing secrets")


group("8. guess secrets", attack_secrets)


def refs_kept():
    r = r1.do(f"reconnect {SOCK}")
    t.check(r.get("ok") and r.get("refs_kept") and r.get("restored") == 0,
            "a live client whose connection dropped gets its references back (REFS_KEPT)", r)
    # Dropped for a while: an orphan meanwhile.
    shared0 = domain("a").get("pages-shared")
    c = w.Conn(SOCK, proto=PROTO)
    c.hello("a", name="orphan-a")
    m = c.lookup([(SECRET_HASHES[0][0], SECRET_HASHES[0][1], 1)])
    slot = m.results[0][1]
    dev, ino, pool_fd = c.info["pool_dev"], c.info["pool_ino"], c.pool_fd
    c.sock.close()
    t.wait("the orphan", lambda: any(x["name"] == "orphan-a" and x["state"] == "orphan"
                                     for x in ctl("clients")), 5, step=0.1)
    t.equal(domain("a").get("pages-shared"), shared0 + 1, "its reference stays meanwhile")
    c2 = w.Conn(SOCK, proto=PROTO)
    m = c2.hello("a", name="orphan-a", reconnect=True, pool_dev=dev, pool_ino=ino,
                 pool_fd=pool_fd)
    os.close(pool_fd)
    t.check(m.type == w.HELLO_REPLY and m.reply["flags"] & w.REPLY_REFS_KEPT,
            "reconnecting after a while: REFS_KEPT", m)
    t.equal(c2.unref([slot]).name, "OK", "... the reference really is its own again")
    c2.close()
    # A private domain: the same pool, the same references.
    rp = Client("vm-private")
    rp.connect("-")
    rp.do("fill 64 9 uniform")
    rp.do("merge")
    rp.do("merge")
    rp.merged = 64
    me = [x for x in ctl("clients") if x["name"] == "vm-private"]
    dom_id = me[0].get("domain-id") if me else None
    ino0 = [d.get("pool-inode") for d in ctl("domains") if d.get("id") == dom_id]
    r = rp.do(f"reconnect {SOCK}")
    t.check(r.get("ok") and r.get("refs_kept"),
            "a private-domain client that reconnects gets its references back", r)
    me = [x for x in ctl("clients") if x["name"] == "vm-private"]
    t.check(len(me) == 1 and me[0].get("domain-id") == dom_id and me[0].get("slots") == 1,
            "... in its same private domain, holding its one slot", me)
    t.equal([d.get("pool-inode") for d in ctl("domains") if d.get("id") == dom_id], ino0,
            "... with the same pool")
    r = rp.do("pool-check")
    t.check(r.get("ok") and r.get("checked") == 64, "... whose pages it reads intact", r)
    live_clients.append(rp)
    real_clients_ok("after reconnecting")


group("references kept across a dropped connection", refs_kept)

try:
    t.check(broker.alive(), "the broker survived every attack")
    t.check("CRITICAL" not in log_text() and "ERROR" not in log_text(),
            "it logged no critical error")
    for cl in live_clients:
        cl.exit()
    for ag in agents:
        ag.stop()
    t.equal(broker.stop(), 0, "SIGTERM stops it cleanly (exit 0)")
finally:
    if broker.alive():
        broker.stop(signal.SIGKILL)
t.diag(f"run time {time.monotonic() - started:.1f} s (protocol {PROTO}, {opts.build})")
if t.failures == 0:
    shutil.rmtree(tmp, ignore_errors=True)
else:
    t.diag(f"broker logs and configuration kept in {tmp}")
t.done()

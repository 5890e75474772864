#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""The qdedup wire protocol in Python, for tests that speak to a broker
directly (tests/broker/hostile.py plays hostile clients with it).

It encodes and decodes the messages of include/qdedup/protocol.h with the
byte layouts of protocol/codec.c: a 16-byte header (magic, type, flags,
seq, length), little-endian fixed-width fields, strings as a 16-bit length
and printable bytes, arrays as a 32-bit count and fixed-size entries, and
PUBLISH as its metadata followed by the pages.  The encoders do not check
the protocol's limits (counts, string lengths): a hostile client may break
them on purpose.

Protocol version 2 is the default.  Version 1, the previous broker's, is
there for showing what the new broker refuses and the old one accepted
(Conn(..., proto=1)): its HELLO has no pool_fd field and a RECONNECT hands
the pool descriptor over with SCM_RIGHTS instead of naming it.

hash_page() is XXH3-128 of a 4 KiB page as the broker computes it, through
the system's libxxhash (a build dependency of qdedup)."""

import array
import ctypes
import ctypes.util
import errno
import os
import socket
import struct

MAGIC = 0x50444451
PAGE = 4096
HEADER = struct.Struct("<IHHII")
MAX_LOOKUP = 1024
MAX_PUBLISH = 32
MAX_UNREF = 1024
MAX_RESTORE = 1024
SMALL_MSG_MAX = HEADER.size + 4 + MAX_LOOKUP * 24

# Message types
HELLO, HELLO_REPLY, LOOKUP, LOOKUP_REPLY, PUBLISH, PUBLISH_REPLY, UNREF, \
    RESTORE, RESTORE_REPLY, OK, ERROR = range(1, 12)
TYPE_NAMES = {HELLO: "HELLO", HELLO_REPLY: "HELLO_REPLY", LOOKUP: "LOOKUP",
              LOOKUP_REPLY: "LOOKUP_REPLY", PUBLISH: "PUBLISH",
              PUBLISH_REPLY: "PUBLISH_REPLY", UNREF: "UNREF", RESTORE: "RESTORE",
              RESTORE_REPLY: "RESTORE_REPLY", OK: "OK", ERROR: "ERROR"}

# Per-entry results
MISS, HIT, PUBLISH_IT, STORED, MISMATCH, QUOTA, FULL, UNWANTED, REFUSED = range(9)
RESULT_NAMES = ["miss", "hit", "publish", "stored", "mismatch", "quota", "full",
                "unwanted", "refused"]

# Error codes
E_PROTOCOL, E_VERSION, E_DENIED, E_STATE, E_NOT_HELD, E_RETRY, E_POOL_CHANGED, \
    E_INTERNAL = range(1, 9)
ERROR_NAMES = {E_PROTOCOL: "protocol", E_VERSION: "version", E_DENIED: "denied",
               E_STATE: "state", E_NOT_HELD: "not-held", E_RETRY: "retry",
               E_POOL_CHANGED: "pool-changed", E_INTERNAL: "internal"}

HELLO_RECONNECT = 1
REPLY_ADOPTED = 1
REPLY_REFS_KEPT = 2

_HELLO_REPLY = struct.Struct("<IIIIIIQQQQQ")
_LOOKUP_ENTRY = struct.Struct("<QQQ")      # hash lo, hash hi, cookie
_RESULT_ENTRY = struct.Struct("<IIQ")      # result, reserved, slot
_RESTORE_ENTRY = struct.Struct("<QQQ")     # slot, hash lo, hash hi


class ProtocolError(Exception):
    """A packet that does not decode."""


# ---- hashing -----------------------------------------------------------------

class _XXH128(ctypes.Structure):
    _fields_ = [("low64", ctypes.c_uint64), ("high64", ctypes.c_uint64)]


_xxh = None


def hash_page(page):
    """XXH3-128 of bytes (a page) as (lo, hi): the protocol's QdHash."""
    global _xxh
    if _xxh is None:
        lib = ctypes.CDLL(ctypes.util.find_library("xxhash") or "libxxhash.so.0")
        lib.XXH3_128bits.restype = _XXH128
        lib.XXH3_128bits.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
        _xxh = lib
    h = _xxh.XXH3_128bits(bytes(page), len(page))
    return (h.low64, h.high64)


ZERO_PAGE = bytes(PAGE)


# ---- encoding ----------------------------------------------------------------

def _header(mtype, seq, body_len):
    return HEADER.pack(MAGIC, mtype, 0, seq, HEADER.size + body_len)


def _string(s):
    b = s.encode() if isinstance(s, str) else bytes(s)
    return struct.pack("<H", len(b)) + b


def encode_hello(seq, domain="", name="hostile", secret=b"", flags=0, pid=None,
                 uuid=bytes(16), pool_dev=0, pool_ino=0, pool_fd=0, proto=2):
    """HELLO; proto=1 leaves out the trailing pool_fd (version 1 layout)."""
    body = struct.pack("<III", proto, flags, os.getpid() if pid is None else pid)
    body += bytes(uuid)[:16].ljust(16, b"\0")
    body += _string(name) + _string(domain) + _string(secret)
    body += struct.pack("<QQ", pool_dev, pool_ino)
    if proto >= 2:
        body += struct.pack("<I", pool_fd)
    return _header(HELLO, seq, len(body)) + body


def encode_lookup(seq, entries):
    """entries: (lo, hi, cookie) triples."""
    body = struct.pack("<I", len(entries))
    body += b"".join(_LOOKUP_ENTRY.pack(lo, hi, cookie) for lo, hi, cookie in entries)
    return _header(LOOKUP, seq, len(body)) + body


def encode_publish(seq, entries, pages):
    """PUBLISH: metadata (count, entries) then the pages appended."""
    body = struct.pack("<I", len(entries))
    body += b"".join(_LOOKUP_ENTRY.pack(lo, hi, cookie) for lo, hi, cookie in entries)
    data = b"".join(bytes(p) for p in pages)
    return _header(PUBLISH, seq, len(body) + len(data)) + body + data


def encode_unref(seq, slots):
    body = struct.pack("<I", len(slots)) + b"".join(struct.pack("<Q", s) for s in slots)
    return _header(UNREF, seq, len(body)) + body


def encode_restore(seq, entries):
    """entries: (slot, lo, hi) triples."""
    body = struct.pack("<I", len(entries))
    body += b"".join(_RESTORE_ENTRY.pack(slot, lo, hi) for slot, lo, hi in entries)
    return _header(RESTORE, seq, len(body)) + body


# ---- decoding ----------------------------------------------------------------

class Message:
    """A decoded broker message: type, seq and, by type, reply (HELLO_REPLY
    fields), results ([(result, slot)]), count (OK), code/message (ERROR)."""

    def __init__(self, mtype, seq):
        self.type = mtype
        self.seq = seq
        self.reply = None
        self.results = None
        self.count = None
        self.code = None
        self.message = None
        self.fd = -1            # descriptor that came with it (HELLO_REPLY)

    @property
    def name(self):
        return TYPE_NAMES.get(self.type, f"type-{self.type}")

    @property
    def error(self):
        return ERROR_NAMES.get(self.code, f"code-{self.code}") if self.code else None

    def __repr__(self):
        if self.type == ERROR:
            return f"<ERROR {self.error}: {self.message}>"
        if self.type == HELLO_REPLY:
            return f"<HELLO_REPLY {self.reply}>"
        if self.results is not None:
            return f"<{self.name} {len(self.results)} results>"
        return f"<{self.name} {self.count}>"


def decode(buf):
    """Decode a broker-to-client packet (checks lengths as the C decoder does)."""
    if len(buf) < HEADER.size:
        raise ProtocolError(f"packet of {len(buf)} bytes")
    magic, mtype, flags, seq, length = HEADER.unpack_from(buf)
    if magic != MAGIC or flags != 0 or length != len(buf):
        raise ProtocolError(f"bad header: magic {magic:#x} flags {flags} "
                            f"len {length} of {len(buf)}")
    m = Message(mtype, seq)
    body = memoryview(buf)[HEADER.size:]
    if mtype == HELLO_REPLY:
        if len(body) != _HELLO_REPLY.size:
            raise ProtocolError("HELLO_REPLY length")
        keys = ("version", "flags", "client_id", "page_size", "max_lookup", "max_publish",
                "pool_slots", "client_quota", "domain_quota", "pool_dev", "pool_ino")
        m.reply = dict(zip(keys, _HELLO_REPLY.unpack(body)))
    elif mtype in (LOOKUP_REPLY, PUBLISH_REPLY, RESTORE_REPLY):
        (count,) = struct.unpack_from("<I", body)
        if len(body) != 4 + count * _RESULT_ENTRY.size:
            raise ProtocolError(f"{m.name} length for {count} results")
        m.results = [(r, slot) for r, _, slot in _RESULT_ENTRY.iter_unpack(body[4:])]
    elif mtype == OK:
        if len(body) != 4:
            raise ProtocolError("OK length")
        (m.count,) = struct.unpack("<I", body)
    elif mtype == ERROR:
        m.code, n = struct.unpack_from("<IH", body)
        if len(body) != 6 + n:
            raise ProtocolError("ERROR length")
        m.message = bytes(body[6:6 + n]).decode(errors="replace")
    else:
        raise ProtocolError(f"unexpected message type {mtype} from the broker")
    return m


# ---- a connection --------------------------------------------------------------

class Conn:
    """One SOCK_SEQPACKET connection to a broker, one request at a time."""

    def __init__(self, path, proto=2, timeout=30):
        self.proto = proto
        self.seq = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.pool_fd = -1
        self.info = None

    def fileno(self):
        return self.sock.fileno()

    def next_seq(self):
        self.seq += 1
        return self.seq

    def send(self, data, fds=()):
        """Send one packet, with descriptors (SCM_RIGHTS) if fds."""
        anc = []
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        return self.sock.sendmsg([data], anc)

    def recv(self):
        """One packet, decoded; a descriptor that came with it in .fd.
        None at the end of the stream."""
        fdsize = array.array("i").itemsize
        data, anc, flags, _ = self.sock.recvmsg(SMALL_MSG_MAX + 16,
                                                socket.CMSG_SPACE(4 * fdsize))
        fds = []
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(payload[:len(payload) - len(payload) % fdsize])
                fds.extend(a)
        if not data:
            for fd in fds:
                os.close(fd)
            return None
        m = decode(data)
        if fds:
            m.fd = fds[0]
            for fd in fds[1:]:
                os.close(fd)
        return m

    def request(self, data, fds=()):
        self.send(data, fds)
        m = self.recv()
        if m is None:
            raise ConnectionResetError(errno.ECONNRESET, "broker closed the connection")
        return m

    def hello(self, domain="", name="hostile", secret=b"", reconnect=False, pool_dev=0,
              pool_ino=0, pool_fd=-1, pid=None):
        """HELLO; returns the reply (HELLO_REPLY or ERROR).  On success the pool
        descriptor is kept in self.pool_fd.  A RECONNECT names pool_fd (version 2)
        or sends it (version 1)."""
        flags = HELLO_RECONNECT if reconnect else 0
        data = encode_hello(self.next_seq(), domain=domain, name=name,
                            secret=secret.encode() if isinstance(secret, str) else secret,
                            flags=flags, pid=pid, pool_dev=pool_dev, pool_ino=pool_ino,
                            pool_fd=max(pool_fd, 0), proto=self.proto)
        fds = [pool_fd] if reconnect and self.proto < 2 and pool_fd >= 0 else []
        m = self.request(data, fds)
        if m.type == HELLO_REPLY:
            if self.pool_fd >= 0:
                os.close(self.pool_fd)
            self.pool_fd = m.fd
            self.info = m.reply
        elif m.fd >= 0:
            os.close(m.fd)
        return m

    def lookup(self, entries):
        return self.request(encode_lookup(self.next_seq(), entries))

    def lookup_raw(self, packet_without_seq):
        """Send a pre-encoded LOOKUP (seq patched in): for floods."""
        seq = self.next_seq()
        data = packet_without_seq[:8] + struct.pack("<I", seq) + packet_without_seq[12:]
        return self.request(data)

    def publish(self, entries, pages):
        return self.request(encode_publish(self.next_seq(), entries, pages))

    def unref(self, slots):
        return self.request(encode_unref(self.next_seq(), slots))

    def restore(self, entries):
        return self.request(encode_restore(self.next_seq(), entries))

    def close(self):
        if self.pool_fd >= 0:
            os.close(self.pool_fd)
            self.pool_fd = -1
        self.sock.close()

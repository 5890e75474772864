#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""A QMP client with deadlines, for watching a QEMU that may stop answering:
every command carries an id, a command that gets no answer in time raises
TimeoutError and leaves the connection usable (its late reply is skipped
when it comes), and events are collected without sending anything."""

import json
import select
import socket
import time


class QMPWatch:
    def __init__(self, path, timeout=30):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.sock.setblocking(False)
        self.buf = b""
        self.events = []
        self.replies = {}
        self.next_id = 0
        if "QMP" not in self._next(timeout, greeting=True):
            raise RuntimeError("no QMP greeting")
        self.cmd("qmp_capabilities", timeout=timeout)

    def _fill(self, deadline):
        """Read what arrives until DEADLINE; False if nothing came."""
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([self.sock], [], [], left)[0]:
            return False
        data = self.sock.recv(1 << 20)
        if not data:
            raise EOFError("QMP connection closed")
        self.buf += data
        return True

    def _lines(self):
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            if line.strip():
                yield json.loads(line)

    def _next(self, timeout, greeting=False):
        deadline = time.monotonic() + timeout
        while True:
            for msg in self._lines():
                if greeting:
                    return msg
                self._file(msg)
            if not self._fill(deadline):
                raise TimeoutError("no QMP greeting" if greeting else "QMP timed out")

    def _file(self, msg):
        if "event" in msg:
            self.events.append(msg)
        elif "id" in msg:
            self.replies[msg["id"]] = msg

    def pump(self, timeout=0.0):
        """Collect events (and late replies) for up to TIMEOUT seconds."""
        deadline = time.monotonic() + timeout
        while True:
            for msg in self._lines():
                self._file(msg)
            if not self._fill(deadline):
                return

    def cmd(self, name, timeout=10, **args):
        """Run NAME; its result, or TimeoutError after TIMEOUT seconds,
        or RuntimeError if QEMU answered with an error."""
        self.next_id += 1
        cid = f"w{self.next_id}"
        msg = {"execute": name, "id": cid}
        if args:
            msg["arguments"] = args
        self.sock.setblocking(True)
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        self.sock.setblocking(False)
        deadline = time.monotonic() + timeout
        while cid not in self.replies:
            for m in self._lines():
                self._file(m)
            if cid not in self.replies and not self._fill(deadline):
                raise TimeoutError(f"{name}: no answer in {timeout} s")
        reply = self.replies.pop(cid)
        if "error" in reply:
            raise RuntimeError(f"{name}: {reply['error']}")
        return reply["return"]

    def wait_event(self, name, timeout):
        """The first event NAME collected so far or within TIMEOUT s; None."""
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events:
                if e["event"] == name:
                    return e
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.pump(min(left, 0.2))

    def close(self):
        self.sock.close()

# SPDX-License-Identifier: GPL-2.0-or-later
"""A small synchronous QMP client for tests (stdlib only), and a helper that
starts a QEMU with a QMP socket and stops it again."""

import json
import os
import socket
import subprocess
import tempfile
import time


class QMPError(Exception):
    def __init__(self, error):
        super().__init__(f"{error.get('class')}: {error.get('desc')}")
        self.error = error


class QMP:
    def __init__(self, path, timeout=60):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.file = self.sock.makefile("rwb")
        self.events = []
        greeting = self._read()
        if "QMP" not in greeting:
            raise RuntimeError(f"no QMP greeting: {greeting}")
        self.cmd("qmp_capabilities")

    def _read(self):
        line = self.file.readline()
        if not line:
            raise EOFError("QMP connection closed")
        return json.loads(line)

    def cmd(self, name, **args):
        """Run a command; return its result or raise QMPError."""
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise QMPError(reply["error"])
            return reply["return"]

    def hmp(self, line):
        return self.cmd("human-monitor-command", **{"command-line": line})

    def close(self):
        self.sock.close()


class QemuProcess:
    """qemu-system-x86_64 with a QMP socket; use as a context manager."""

    def __init__(self, binary, args):
        self.dir = tempfile.mkdtemp(prefix="qdedup-qmp-")
        self.qmp_path = os.path.join(self.dir, "qmp.sock")
        self.log_path = os.path.join(self.dir, "qemu.log")
        self.argv = [binary, "-qmp", f"unix:{self.qmp_path},server=on,wait=off"] + args
        self.proc = None
        self.qmp = None

    def __enter__(self):
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while self.qmp is None:
            try:
                self.qmp = QMP(self.qmp_path)
            except (FileNotFoundError, ConnectionRefusedError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"QEMU did not start: {self.output()}")
                time.sleep(0.05)
        return self

    def output(self):
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()

    def __exit__(self, *exc):
        if self.qmp:
            try:
                self.qmp.cmd("quit")
            except (EOFError, OSError, QMPError):
                pass
            self.qmp.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        for name in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, name))
        os.rmdir(self.dir)
        return False

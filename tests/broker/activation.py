#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Socket activation of qemu-dedup-broker, as qemu-dedup-broker.socket does
it: the test plays systemd, creating the listening socket and handing it to
the broker as descriptor 3 with LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES.
The broker must serve clients on it, leave its file alone (systemd's), and
keep it when it exits.  Without the variables (or with LISTEN_PID of another
process) it makes its own socket, as before.

Usage: activation.py BUILD_DIR"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from host import broker_ctl  # noqa: E402
from tap import Tap  # noqa: E402

build = sys.argv[1]
BROKER = os.path.join(build, "broker", "qemu-dedup-broker")
CLIENT = os.path.join(build, "tests", "broker-test-client")
CTL = os.path.join(build, "tools", "qemu-dedup-ctl")
t = Tap()
tmp = tempfile.mkdtemp(prefix="qdedup-activation-")
path = os.path.join(tmp, "broker.sock")
control = os.path.join(tmp, "control.sock")
log = os.path.join(tmp, "broker.log")


def start(listen_pid_of_child=True):
    """Fork and exec the broker with the listening socket as descriptor 3."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(16)
    pid = os.fork()
    if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.dup2(listener.fileno(), 3)
        os.set_inheritable(3, True)     # dup2 onto itself keeps close-on-exec
        env = dict(os.environ, LISTEN_FDS="1", LISTEN_FDNAMES="broker",
                   LISTEN_PID=str(os.getpid() if listen_pid_of_child else 1))
        os.execve(BROKER, [BROKER, f"--socket={path}", f"--control={control}",
                           "--pool-max=16M", "--domain=act"], env)
    listener.close()
    deadline = time.monotonic() + 10
    while not os.path.exists(control) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pid


def stop(pid):
    os.kill(pid, 15)
    os.waitpid(pid, 0)
    os.unlink(control) if os.path.exists(control) else None


def client_connects():
    p = subprocess.Popen([CLIENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    p.stdin.write(f"connect {path} act vm-act\n")
    p.stdin.flush()
    reply = json.loads(p.stdout.readline())
    clients = broker_ctl(CTL, control, "clients") or []
    p.stdin.write("exit\n")
    p.stdin.flush()
    p.wait(timeout=10)
    return reply.get("ok") and any(c["name"] == "vm-act" for c in clients)


try:
    pid = start()
    ino = os.stat(path).st_ino
    t.check(os.path.exists(control), "the broker starts with a socket from 'systemd'")
    t.check("socket activation" in open(log).read(), "it says it uses the inherited socket")
    t.check(client_connects(), "a client connects through the inherited socket")
    t.equal(os.stat(path).st_ino, ino, "the socket file is systemd's: not replaced")
    stop(pid)
    t.check(os.path.exists(path) and os.stat(path).st_ino == ino,
            "after the broker exits the socket file is still there (systemd keeps it)")
    os.unlink(path)

    # LISTEN_PID names another process: the variables are not for us.
    pid = start(listen_pid_of_child=False)
    t.check(os.path.exists(control) and os.stat(path).st_ino != ino and client_connects(),
            "LISTEN_PID of another process: the broker makes its own socket")
    stop(pid)
    t.check(not os.path.exists(path), "and removes it when it exits")
finally:
    shutil.rmtree(tmp, ignore_errors=True)
t.done()

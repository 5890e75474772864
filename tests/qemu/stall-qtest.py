#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""A broker that stalls must not stall QEMU (ARCHITECTURE I10), on the
qtest accelerator.

1. A "broker" that accepts connections and never answers (this script,
   listening on a Unix socket).  QEMU's memory-dedup connects, says HELLO
   and waits.  Meanwhile query-memory-dedup is asked every 0.2 s through a
   second monitor, and the zero pages written through qtest must still be
   dropped (zero-dropping needs no broker).  Then object-del, while the
   engine waits for the HELLO's answer: it must not wait for the client's
   5 s timeout.
2. A real broker, SIGSTOPped while the engine merges fresh duplicates.
   query-memory-dedup answers the whole time, object-del does not wait for
   the stopped broker either, and after SIGCONT and QEMU's exit the broker
   holds no slot (the UNREFs object-del queued were handed to a thread of
   their own, dedup-release).

Every page written reads back right.  The figures (slowest answer,
object-del's time) are reported; the checks allow 1 s, well under the 5 s
a wait for the broker would take, so that a loaded machine does not make
them fail.

Usage: stall-qtest.py QEMU_BUILD_DIR OWN_BUILD_DIR"""

import os
import signal
import socket
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
import guestmem as gm  # noqa: E402
from host import broker_ctl, finish, start_broker  # noqa: E402
from qmp import QemuProcess  # noqa: E402
from qmpwatch import QMPWatch  # noqa: E402
from qtest import QTest  # noqa: E402
from tap import Tap  # noqa: E402

qemu = os.path.join(sys.argv[1], "qemu-system-x86_64")
own = sys.argv[2]
BROKER = os.path.join(own, "broker", "qemu-dedup-broker")
CTL = os.path.join(own, "tools", "qemu-dedup-ctl")
BASE = 0x100000
DUP, COPIES, ZERO = 256, 4, 512
FRESH_BASE = 0x4000000
LIMIT_S = 1.0                   # far below the 5 s of a wait for the broker
t = Tap()
tmp = tempfile.mkdtemp(prefix="qdedup-stall-")


def layout():
    pages = [gm.pattern(1, j) for _ in range(COPIES) for j in range(DUP)]
    return pages + [bytes(gm.PAGE)] * ZERO


EXPECTED = layout()
NZ = len(EXPECTED) - ZERO


class SilentBroker(threading.Thread):
    """Accepts every connection and never says a word."""

    def __init__(self, path):
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.bind(path)
        self.sock.listen(16)
        self.held = []

    def run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)


def start_vm(name, broker_path):
    qt = QTest(os.path.join(tmp, f"qtest-{name}.sock"))
    q = QemuProcess(qemu, [
        "-accel", "qtest", "-qtest", f"unix:{os.path.join(tmp, f'qtest-{name}.sock')}",
        "-qtest-log", "/dev/null",
        "-machine", "pc", "-nodefaults", "-display", "none", "-m", "128",
        "-name", f"{name},debug-threads=on",
        "-qmp", f"unix:{os.path.join(tmp, f'watch-{name}.sock')},server=on,wait=off",
        "-object", f"memory-dedup,id=d0,broker={broker_path},pass-interval=0,cpu-limit=100"])
    q.__enter__()
    qt.accept()
    w = QMPWatch(os.path.join(tmp, f"watch-{name}.sock"))
    gm.write_pages(qt, BASE, len(EXPECTED),
                   lambda i: EXPECTED[i] if i < NZ else gm.pattern(5, i))
    qt.cmd(f"memset {BASE + NZ * gm.PAGE:#x} {ZERO * gm.PAGE:#x} 0")
    return q, qt, w


def timed(w, name, **args):
    t0 = time.monotonic()
    try:
        got = w.cmd(name, timeout=10, **args)
    except TimeoutError:
        got = None
    return got, time.monotonic() - t0


def watch_monitor(w, seconds):
    """query-memory-dedup every 0.2 s: the slowest answer, and the last one."""
    slowest, last = 0.0, None
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        got, took = timed(w, "query-memory-dedup")
        slowest = max(slowest, took)
        last = got[0] if got else last
        time.sleep(0.2)
    return slowest, last


def object_del(w):
    got, took = timed(w, "object-del", id="d0")
    return got is not None, took


# 1. A broker that never answers.
silent = SilentBroker(os.path.join(tmp, "silent.sock"))
silent.start()
q = None
try:
    q, qt, w = start_vm("silent", os.path.join(tmp, "silent.sock"))
    slowest, last = watch_monitor(w, 12)
    t.diag(f"silent broker: {len(silent.held)} connections held; slowest "
           f"query-memory-dedup {slowest * 1000:.0f} ms")
    t.check(len(silent.held) >= 1, "the engine connected to the silent broker",
            q.output()[-2000:])
    t.check(slowest < LIMIT_S, f"query-memory-dedup answered within {LIMIT_S:.0f} s all "
            f"the time (slowest {slowest * 1000:.0f} ms)")
    t.check(last and not last["broker-connected"] and last["zero-pages"] >= ZERO,
            "no broker, but the zero pages were dropped", last)
    ok, took = object_del(w)
    t.diag(f"object-del while the engine waits for HELLO's answer: {took * 1000:.0f} ms")
    t.check(ok and took < LIMIT_S, f"object-del did not wait for the silent broker "
            f"({took * 1000:.0f} ms)")
    bad = gm.bad_pages(qt, BASE, len(EXPECTED), EXPECTED.__getitem__)
    t.check(not bad, "every page reads back right", bad[:10])
    w.close()
finally:
    if q:
        q.__exit__(None, None, None)
    silent.sock.close()

# 2. A real broker, SIGSTOPped mid-merge.
broker, bsock, control = start_broker(BROKER, tmp, "--pool-max=256M")
t.check(broker.poll() is None, "the broker started")
q = None
stopped = False
try:
    q, qt, w = start_vm("stopped", bsock)
    merged = t.wait("the duplicates to merge",
                    lambda: w.cmd("query-memory-dedup")[0]["merged-pages"] >= DUP * COPIES,
                    90)
    t.check(merged, "merged within the VM", w.cmd("query-memory-dedup")[0])
    broker.send_signal(signal.SIGSTOP)
    stopped = True
    # Fresh duplicates: the engine asks the stopped broker about them.
    gm.write_pages(qt, FRESH_BASE, 128, lambda i: gm.pattern(4, i % 64))
    slowest, last = watch_monitor(w, 10)
    t.diag(f"stopped broker: slowest query-memory-dedup {slowest * 1000:.0f} ms")
    t.check(slowest < LIMIT_S, f"query-memory-dedup answered within {LIMIT_S:.0f} s "
            f"while the broker was stopped (slowest {slowest * 1000:.0f} ms)")
    ok, took = object_del(w)
    t.diag(f"object-del with the broker stopped: {took * 1000:.0f} ms")
    t.check(ok and took < LIMIT_S, f"object-del did not wait for the stopped broker "
            f"({took * 1000:.0f} ms)")
    bad = gm.bad_pages(qt, BASE, len(EXPECTED), EXPECTED.__getitem__)
    bad_fresh = gm.bad_pages(qt, FRESH_BASE, 128, lambda i: gm.pattern(4, i % 64))
    t.check(not bad and not bad_fresh, "every page reads back right after object-del",
            (bad[:10], bad_fresh[:10]))
    broker.send_signal(signal.SIGCONT)
    stopped = False
    log = q.output()
    t.check("refused UNREF" not in log, "QEMU logged no refused UNREF", log[-2000:])
    w.close()
finally:
    if stopped:
        broker.send_signal(signal.SIGCONT)
    if q:
        q.__exit__(None, None, None)

gone = t.wait("the broker to free the VM's slots",
              lambda: (broker_ctl(CTL, control, "stats") or {}).get("slots-used") == 0, 30)
st = broker_ctl(CTL, control, "stats") or {}
t.check(gone and st.get("clients") == 0, f"QEMU exited: slots-used {st.get('slots-used')}, "
        f"clients {st.get('clients')}", st)
finish(t, broker, tmp)
t.done()

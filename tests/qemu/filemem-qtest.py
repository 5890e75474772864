#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Private file-backed guest RAM (ARCHITECTURE I9), on the qtest accelerator.

The guest's RAM is memory-backend-file,share=off over a file on /dev/shm
(tmpfs, where userfaultfd write-protect works) that is not empty: every
byte of it is 0xa5.  MADV_DONTNEED on such a private mapping reads the file
again, not zeros, so memory-dedup must never drop a zero page there the way
it does in anonymous RAM; it merges them with the pool's zero page instead.

The test zeroes 16 MiB of guest RAM and writes 4 MiB of duplicates through
qtest, waits until memory-dedup has handled them (merged-pages covers the
zero pages too), and reads everything back: the zeroed pages must read
zeros, never the file's old bytes, the duplicates their content, and RAM
the guest never wrote the file's bytes.

Usage: filemem-qtest.py QEMU_BUILD_DIR OWN_BUILD_DIR"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
import guestmem as gm  # noqa: E402
from host import broker_ctl, finish, start_broker  # noqa: E402
from qmp import QemuProcess  # noqa: E402
from qtest import QTest  # noqa: E402
from tap import Tap  # noqa: E402

qemu = os.path.join(sys.argv[1], "qemu-system-x86_64")
own = sys.argv[2]
BROKER = os.path.join(own, "broker", "qemu-dedup-broker")
CTL = os.path.join(own, "tools", "qemu-dedup-ctl")
PAGE = gm.PAGE
RAM_MB = 128
ZERO_BASE, ZERO = 0x1000000, 4096          # 16 MiB at 16 MiB, zeroed by the guest
DUP_BASE, DUP, COPIES = 0x3000000, 256, 4  # 4 MiB of duplicates at 48 MiB
UNTOUCHED = 0x5000000                      # 80 MiB: never written
OLD = b"\xa5" * PAGE
t = Tap()
tmp = tempfile.mkdtemp(prefix="qdedup-filemem-")
ram_file = tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="qdedup-filemem-", delete=False)


def dup(i):
    return gm.pattern(7, i % DUP)


with open(ram_file.name, "wb") as f:
    for _ in range(RAM_MB * 256):
        f.write(OLD)
broker, bsock, control = start_broker(BROKER, tmp, "--pool-max=256M")
t.check(broker.poll() is None, "the broker started")
q = None
try:
    qt = QTest(os.path.join(tmp, "qtest.sock"))
    q = QemuProcess(qemu, [
        "-accel", "qtest", "-qtest", f"unix:{os.path.join(tmp, 'qtest.sock')}",
        "-qtest-log", "/dev/null", "-nodefaults", "-display", "none",
        "-m", str(RAM_MB),
        "-object", f"memory-backend-file,id=ram0,size={RAM_MB}M,mem-path={ram_file.name},"
                   "share=off",
        "-machine", "pc,memory-backend=ram0",
        "-object", f"memory-dedup,id=d0,broker={bsock},pass-interval=0,cpu-limit=100"])
    q.__enter__()
    qt.accept()

    def info():
        return q.qmp.cmd("query-memory-dedup")[0]

    t.check(qt.read(ZERO_BASE, PAGE) == OLD, "guest RAM starts with the file's bytes")
    t.check(not any(r.startswith("ram0") for r in info()["refused"]),
            "the file-backed RAM is covered, not refused", info()["refused"])
    qt.cmd(f"memset {ZERO_BASE:#x} {ZERO * PAGE:#x} 0")
    gm.write_pages(qt, DUP_BASE, DUP * COPIES, dup)
    done = t.wait("memory-dedup to handle the zero pages and the duplicates",
                  lambda: info()["merged-pages"] >= ZERO + DUP * COPIES - 16, 120)
    got = info()
    t.check(done, f"zero pages and duplicates merged with the pool "
            f"(merged-pages {got['merged-pages']}, zero-pages {got['zero-pages']})", got)
    t.equal(got["zero-pages"], 0, "no zero page dropped with MADV_DONTNEED in file RAM")
    bad = gm.bad_pages(qt, ZERO_BASE, ZERO, lambda i: bytes(PAGE))
    t.check(not bad, f"the {ZERO} zeroed pages read zeros, not the file's old bytes",
            bad[:10])
    bad = gm.bad_pages(qt, DUP_BASE, DUP * COPIES, dup)
    t.check(not bad, "the duplicates read back right", bad[:10])
    bad = gm.bad_pages(qt, UNTOUCHED, 256, lambda i: OLD)
    t.check(not bad, "RAM the guest never wrote reads the file's bytes", bad[:10])
    st = broker_ctl(CTL, control, "stats") or {}
    t.check(st.get("slots-used", 0) >= 1, "the broker holds the pages once "
            f"(slots-used {st.get('slots-used')})", st)
finally:
    if q:
        q.__exit__(None, None, None)
    os.unlink(ram_file.name)

finish(t, broker, tmp)
t.done()

#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Memory hot-plug and unplug with memory-dedup, on the qtest accelerator:
a pc-dimm with its own memory backend is plugged in at run time, the test
writes pages into it (some identical to pages of the boot RAM), and the
object must cover it and merge them.  Then the DIMM is ejected (ACPI memory
hot-plug registers, as a guest's _EJ0 would) and its backend deleted: its
references go, the boot RAM reads right, and what the object still holds
is exactly what the broker holds for it.

Usage: hotplug-qtest.py QEMU_BUILD_DIR OWN_BUILD_DIR"""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from host import broker_ctl, finish, start_broker  # noqa: E402
from qmp import QemuProcess  # noqa: E402
from qtest import QTest  # noqa: E402
from tap import Tap  # noqa: E402

qemu = os.path.join(sys.argv[1], "qemu-system-x86_64")
own = sys.argv[2]
CTL = os.path.join(own, "tools", "qemu-dedup-ctl")
BASE = 0x1000000                # boot RAM, 16 MiB in
SHARED, UNIQUE = 512, 256       # pages
PAGE = 4096
MEMHP = 0x0a00                  # ACPI_MEMORY_HOTPLUG_BASE (pc)
t = Tap()
tmp = tempfile.mkdtemp(prefix="qdedup-hotplug-")


def page_bytes(seed, i):
    return (seed * 1000003 + i * 7919 + 1).to_bytes(8, "little") * (PAGE // 8)


def wait_for(cond, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.2)
    return False


broker, bsock, control = start_broker(os.path.join(own, "broker", "qemu-dedup-broker"),
                                      tmp, "--pool-max=64M", "--domain=hotplug")
q = None
try:
    qt = QTest(os.path.join(tmp, "qtest.sock"))
    q = QemuProcess(qemu, [
        "-accel", "qtest", "-qtest", f"unix:{os.path.join(tmp, 'qtest.sock')}",
        "-machine", "pc", "-nodefaults", "-display", "none",
        "-m", "128,slots=2,maxmem=1G",
        "-object", f"memory-dedup,id=d0,broker={bsock},domain=hotplug,"
                   "pass-interval=100,cpu-limit=100"]).__enter__()
    qt.accept()

    def info():
        return q.qmp.cmd("query-memory-dedup")[0]

    def broker_refs():
        for c in broker_ctl(CTL, control, "clients") or []:
            if c["pid"] == q.proc.pid:
                return c["slots"]
        return None

    for i in range(SHARED):
        qt.write(BASE + i * PAGE, page_bytes(1, i))
    covered = info()["covered-bytes"]

    q.qmp.cmd("object-add", **{"qom-type": "memory-backend-ram", "id": "mem1",
                               "size": 64 << 20})
    q.qmp.cmd("device_add", driver="pc-dimm", id="dimm1", memdev="mem1")
    dimm = q.qmp.cmd("query-memory-devices")[0]["data"]
    t.check(info()["covered-bytes"] == covered + (64 << 20),
            f"hot-plugged DIMM at {dimm['addr']:#x} is covered: covered-bytes "
            f"{covered >> 20} -> {info()['covered-bytes'] >> 20} MiB")
    # In the DIMM: the boot RAM's shared pages again, and pages of its own.
    for i in range(SHARED):
        qt.write(dimm["addr"] + i * PAGE, page_bytes(1, i))
    for i in range(UNIQUE):
        qt.write(dimm["addr"] + (SHARED + i) * PAGE, page_bytes(2, i))
    merged = wait_for(lambda: info()["merged-pages"] >= 2 * SHARED, 60)
    t.check(merged, f"the DIMM's copies merge with the boot RAM's: merged-pages "
            f"{info()['merged-pages']} (>= {2 * SHARED})")
    bad = [i for i in range(SHARED) if qt.read(dimm["addr"] + i * PAGE, PAGE) !=
           page_bytes(1, i) or qt.read(BASE + i * PAGE, PAGE) != page_bytes(1, i)]
    t.check(not bad, "boot RAM and DIMM read back right while merged", bad[:10])

    # Unplug: device_del, then the eject a guest's ACPI _EJ0 would do.
    refs_before = info()["pool-refs"]
    q.qmp.cmd("device_del", id="dimm1")
    qt.outl(MEMHP + 0x0, dimm["slot"])      # slot selector
    qt.outb(MEMHP + 0x14, 8)                # eject
    gone = wait_for(lambda: any(e["event"] == "DEVICE_DELETED" for e in q.qmp.events) or
                    (q.qmp.cmd("query-memory-devices") == []), 30)
    t.check(gone, "the DIMM was ejected")
    q.qmp.cmd("object-del", id="mem1")
    # The RAM block goes when the last memory view lets go of it (RCU).
    wait_for(lambda: info()["covered-bytes"] == covered, 30)
    t.equal(info()["covered-bytes"], covered, "its backend deleted: covered-bytes back "
            f"to {covered >> 20} MiB")
    dropped = wait_for(lambda: info()["pool-refs"] <= refs_before - SHARED, 30)
    t.check(dropped, f"the DIMM's references went: pool-refs {refs_before} -> "
            f"{info()['pool-refs']}")
    bad = [i for i in range(SHARED) if qt.read(BASE + i * PAGE, PAGE) != page_bytes(1, i)]
    t.check(not bad, "the boot RAM still reads right", bad[:10])
    # What the object holds is what the broker holds for it: unmerge both to 0.
    q.qmp.cmd("qom-set", path="/objects/d0", property="unmerge", value=True)
    done = wait_for(lambda: info()["pool-refs"] == 0, 60)
    t.check(done and broker_refs() == 0, "after unmerge the object holds no reference and "
            f"neither does the broker for it ({broker_refs()})")
    bad = [i for i in range(SHARED) if qt.read(BASE + i * PAGE, PAGE) != page_bytes(1, i)]
    t.check(not bad, "the boot RAM reads right after unmerge", bad[:10])
finally:
    if q:
        q.__exit__(None, None, None)
    finish(t, broker, tmp)
t.done()

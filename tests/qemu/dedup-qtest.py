#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Two QEMUs on the qtest accelerator with memory-dedup and one broker: the
test writes identical and unique patterns into guest RAM through qtest,
turns merging on with qom-set, waits for query-memory-dedup to show the
pages merged, checks the host-side saving (PSS of the two QEMUs), writes to
merged pages and reads everything back.

Usage: dedup-qtest.py QEMU_BUILD_DIR OWN_BUILD_DIR"""

import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from host import broker_ctl, pss_kib  # noqa: E402
from qmp import QemuProcess  # noqa: E402
from qtest import QTest  # noqa: E402
from tap import Tap  # noqa: E402

qemu = os.path.join(sys.argv[1], "qemu-system-x86_64")
own = sys.argv[2]
BROKER = os.path.join(own, "broker", "qemu-dedup-broker")
CTL = os.path.join(own, "tools", "qemu-dedup-ctl")
BASE = 0x1000000            # 16 MiB: plain RAM
SHARED, UNIQUE, ZERO = 1024, 256, 512   # pages
PAGE = 4096
t = Tap()
tmp = tempfile.mkdtemp(prefix="qdedup-qtest-")
bsock = os.path.join(tmp, "broker.sock")
control = os.path.join(tmp, "control.sock")


def page_bytes(seed, i):
    word = (seed * 1000003 + i * 7919 + 1).to_bytes(8, "little")
    return (word * (PAGE // 8))


def expected(vm, i):
    if i < SHARED:
        return page_bytes(1, i)
    if i < SHARED + UNIQUE:
        return page_bytes(100 + vm, i)
    return bytes(PAGE)


def ctl(what):
    return broker_ctl(CTL, control, what)


broker = subprocess.Popen([BROKER, "--pool-max=64M", "--domain=qtest", f"--socket={bsock}",
                           f"--control={control}"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
vms = []
try:
    while not os.path.exists(control):
        time.sleep(0.05)
    qts = [QTest(os.path.join(tmp, f"qtest{i}.sock")) for i in range(2)]
    for i in range(2):
        q = QemuProcess(qemu, [
            "-accel", "qtest", "-qtest", f"unix:{os.path.join(tmp, f'qtest{i}.sock')}",
            "-machine", "pc", "-nodefaults", "-display", "none", "-m", "128",
            "-name", f"vm{i},debug-threads=on",
            # A second monitor for qemu-dedup-ctl top (a QMP socket takes one client).
            "-qmp", f"unix:{os.path.join(tmp, f'top{i}.sock')},server=on,wait=off",
            "-trace", "memory_dedup_merged", "-trace", "memory_dedup_cow",
            "-trace", "memory_dedup_broker_lookup",
            "-object", f"memory-dedup,id=d0,broker={bsock},domain=qtest,enabled=off,"
                       "pass-interval=100,cpu-limit=100"])
        vms.append(q.__enter__())
        qts[i].accept()
    for vm, (q, qt) in enumerate(zip(vms, qts)):
        for i in range(SHARED + UNIQUE + ZERO):
            # Zero pages are written non-zero first, then zeroed: real memory.
            data = expected(vm, i) if i < SHARED + UNIQUE else page_bytes(7, i)
            qt.write(BASE + i * PAGE, data)
        for i in range(SHARED + UNIQUE, SHARED + UNIQUE + ZERO):
            qt.cmd(f"memset {BASE + i * PAGE:#x} {PAGE:#x} 0")
    info = vms[0].qmp.cmd("query-memory-dedup")[0]
    t.equal(info["state"], "paused", "enabled=off: the object starts paused")
    pss_before = sum(pss_kib(q.proc.pid) for q in vms)
    for q in vms:
        q.qmp.cmd("qom-set", path="/objects/d0", property="enabled", value=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        infos = [q.qmp.cmd("query-memory-dedup")[0] for q in vms]
        if all(i["merged-pages"] >= SHARED and i["zero-pages"] >= ZERO for i in infos):
            break
        time.sleep(0.5)
    for vm, i in enumerate(infos):
        t.check(i["broker-connected"] and i["state"] == "running",
                f"vm{vm}: running, broker connected", i)
        t.check(i["merged-pages"] >= SHARED, f"vm{vm}: the {SHARED} shared pages are merged "
                f"({i['merged-pages']})", i)
        t.check(i["zero-pages"] >= ZERO, f"vm{vm}: the {ZERO} zeroed pages are dropped "
                f"({i['zero-pages']})", i)
        t.check(i["covered-bytes"] >= 128 << 20, f"vm{vm}: covers all guest RAM", i)
        t.check(i["saved-bytes"] > 0 and i["cpu-ms"] >= 0 and i["passes"] >= 2,
                f"vm{vm}: saved-bytes {i['saved-bytes']}, passes {i['passes']}", i)
    pss_after = sum(pss_kib(q.proc.pid) for q in vms)
    # The shared pages are now one copy in the pool for both; zero pages are gone.
    want = (SHARED + 2 * ZERO) * PAGE // 1024 * 3 // 4
    t.check(pss_before - pss_after >= want,
            f"host PSS of the two QEMUs fell by {pss_before - pss_after} KiB "
            f"(at least {want} expected)")
    st = ctl("stats")
    t.check(st and st["clients"] == 2 and st["slots-used"] >= SHARED,
            "the broker sees both and holds the shared pages once", st)
    # qemu-dedup-ctl top: the dashboard over both QMP sockets and the broker.
    csv = os.path.join(tmp, "top.csv")
    top = subprocess.run([CTL, "top", f"--control={control}", "-n", "2", "-i", "200",
                          f"--csv={csv}"] + [f"--qmp={os.path.join(tmp, f'top{i}.sock')}"
                                             for i in range(2)],
                         capture_output=True, text=True, timeout=60)
    frame = top.stdout.split("qdedup top")[-1]
    rows = {line.split()[0]: line.split() for line in frame.splitlines()
            if line.startswith(("vm0", "vm1", "total"))}
    t.check(top.returncode == 0 and {"vm0", "vm1", "total"} <= set(rows) and
            float(rows["total"][2]) > 0 and "broker: pool" in frame,
            "qemu-dedup-ctl top shows both VMs, their total saving and the broker",
            top.stdout[-1500:] + top.stderr)
    with open(csv) as f:
        lines = [line.strip().split(",") for line in f][1:]
    t.check(len([r for r in lines if r[1] in ("vm0", "vm1")]) == 4 and
            all(int(r[3]) > 0 for r in lines if r[1] in ("vm0", "vm1")),
            "and its --csv has two samples of each VM with saved bytes", lines)
    # Write into merged pages: copy-on-write, the other VM keeps its copy.
    for i in range(0, SHARED, 97):
        qts[0].write(BASE + i * PAGE, page_bytes(55, i))
    bad = []
    for vm, qt in enumerate(qts):
        for i in range(SHARED + UNIQUE + ZERO):
            want_page = page_bytes(55, i) if vm == 0 and i < SHARED and i % 97 == 0 \
                else expected(vm, i)
            if qt.read(BASE + i * PAGE, PAGE) != want_page:
                bad.append((vm, i))
    t.check(not bad, "every page reads back right after merging and writing", bad[:10])
    deadline = time.monotonic() + 30
    while vms[0].qmp.cmd("query-memory-dedup")[0]["cow-events"] == 0 and \
            time.monotonic() < deadline:
        time.sleep(0.2)
    log = vms[0].output()
    for ev in ("memory_dedup_merged", "memory_dedup_cow", "memory_dedup_broker_lookup"):
        t.check(f"{ev} id=d0" in log, f"trace event {ev} fires", log[-500:])
    threads = os.listdir(f"/proc/{vms[0].proc.pid}/task")
    names = {open(f"/proc/{vms[0].proc.pid}/task/{x}/comm").read().strip() for x in threads}
    t.check({"dedup-scan", "dedup-uffd"} <= names, "our threads are named dedup-*",
            sorted(names))
    vms[0].qmp.cmd("object-del", id="d0")
    t.equal(vms[0].qmp.cmd("query-memory-dedup"), [], "object-del while merged")
    t.check(all(qts[0].read(BASE + i * PAGE, PAGE) == expected(0, i)
                for i in range(1, SHARED, 13)), "merged pages still read right after object-del")
    # object-del unmerged them; added again at run time, it merges them again.
    vms[0].qmp.cmd("object-add", **{"qom-type": "memory-dedup", "id": "d1",
                                    "broker": bsock, "domain": "qtest",
                                    "pass-interval": 100, "cpu-limit": 100})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        info = vms[0].qmp.cmd("query-memory-dedup")
        if info and info[0]["merged-pages"] >= SHARED - SHARED // 97 - 1:
            break
        time.sleep(0.3)
    t.check(info and info[0]["merged-pages"] >= SHARED - SHARED // 97 - 1,
            "object-add again: the shared pages merge again", info)
    for i in range(0, SHARED, 89):
        qts[0].write(BASE + i * PAGE, page_bytes(66, i))
    bad = [i for i in range(SHARED + UNIQUE + ZERO)
           if qts[0].read(BASE + i * PAGE, PAGE) !=
           (page_bytes(66, i) if i < SHARED and i % 89 == 0 else
            page_bytes(55, i) if i < SHARED and i % 97 == 0 else expected(0, i))]
    t.check(not bad, "after object-add, writes and reads are right everywhere", bad[:10])
finally:
    for q in vms:
        q.__exit__(None, None, None)
    broker.terminate()
    broker.wait(timeout=10)

t.done()

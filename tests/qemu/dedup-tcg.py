#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Three Linux guests on TCG with memory-dedup and one broker, each running
memcheck, the in-guest integrity checker (scripts/guest/memcheck.c): it fills
memory with patterns (some identical in every guest, some unique, some zero)
and verifies every page round after round while rewriting part of the shared
pages.  Along the way the broker is killed in the middle of merging and
started again, and one guest's object is deleted while it merges.  Every
round in every guest must pass, and the saving must show in QMP, in the
broker and in the host's PSS of the three QEMUs.

Usage: dedup-tcg.py QEMU_BUILD_DIR OWN_BUILD_DIR GUEST_DIR"""

import os
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from host import broker_ctl, finish, memcheck_rounds, pss_kib, tcg_guest_args  # noqa: E402
from qmp import QemuProcess  # noqa: E402
from tap import Tap  # noqa: E402

qemu = os.path.join(sys.argv[1], "qemu-system-x86_64")
own, guest = sys.argv[2], sys.argv[3]
BROKER = os.path.join(own, "broker", "qemu-dedup-broker")
CTL = os.path.join(own, "tools", "qemu-dedup-ctl")
NVM = 3
SHARED_MIB, UNIQUE_MIB, ZERO_MIB = 40, 8, 16
SHARED, ZERO = SHARED_MIB * 256, ZERO_MIB * 256
t = Tap()
tmp = tempfile.mkdtemp(prefix="qdedup-tcg-")
bsock = os.path.join(tmp, "broker.sock")
control = os.path.join(tmp, "control.sock")


def start_broker():
    if os.path.exists(control):
        os.unlink(control)
    b = subprocess.Popen([BROKER, "--pool-max=256M", "--domain=tcg", f"--socket={bsock}",
                          f"--control={control}"],
                         stdout=open(os.path.join(tmp, "broker.log"), "a"),
                         stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not os.path.exists(control) and time.monotonic() < deadline:
        if b.poll() is not None:
            break
        time.sleep(0.05)
    t.check(os.path.exists(control), "the broker started", open(os.path.join(tmp, "broker.log")).read())
    return b


def ctl(what):
    return broker_ctl(CTL, control, what)


def console(vm):
    with open(os.path.join(tmp, f"vm{vm}.log"), errors="replace") as f:
        return f.read()


def rounds(vm):
    """Passed memcheck rounds so far in VM, and any failure lines."""
    ok, bad = memcheck_rounds(console(vm))
    return (max(ok) if ok else 0), bad


def infos():
    return [q.qmp.cmd("query-memory-dedup") for q in vms]


def wait_for(what, cond, timeout):
    return t.wait(what, cond, timeout, 0.5)


def wait_rounds(n, timeout=240):
    """Every VM passes N more memcheck rounds from now."""
    start = [rounds(vm)[0] for vm in range(NVM)]
    return wait_for(f"{n} more memcheck rounds",
                    lambda: all(rounds(vm)[0] >= start[vm] + n or rounds(vm)[1]
                                for vm in range(NVM)), timeout)


def check_guests(when):
    for vm in range(NVM):
        n, bad = rounds(vm)
        t.check(not bad and n > 0, f"vm{vm}: memcheck passed every round {when} "
                f"({n} rounds)", bad[:5])


broker = start_broker()
vms = []
try:
    for vm in range(NVM):
        console_path = os.path.join(tmp, f"vm{vm}.log")
        q = QemuProcess(qemu, tcg_guest_args(guest, f"vm{vm}", console_path, 256, {
            "workload": "memcheck", "shared": SHARED_MIB, "unique": UNIQUE_MIB,
            "zero": ZERO_MIB, "seed": vm + 1, "rounds": 0, "interval": 1,
            "rewrite": 1}) + [
            "-no-reboot",
            "-object", f"memory-dedup,id=d0,broker={bsock},domain=tcg,enabled=off,"
                       "pass-interval=300,cpu-limit=50"])
        vms.append(q.__enter__())
    filled = wait_for("memcheck to fill guest memory",
                      lambda: all("MEMCHECK-ROUND n=1 " in console(vm) for vm in range(NVM)),
                      600)
    t.check(filled, "three guests booted and memcheck filled and verified their memory")
    if not filled:
        for vm in range(NVM):
            t.diag(f"vm{vm} console tail: {console(vm)[-800:]}")
        raise SystemExit
    pss_before = sum(pss_kib(q.proc.pid) for q in vms)

    # Merging starts; the broker dies while it is under way.
    for q in vms:
        q.qmp.cmd("qom-set", path="/objects/d0", property="enabled", value=True)
    wait_for("the first merges", lambda: any(i[0]["merges"] > 0 for i in infos()), 120)
    merged_at_kill = [i[0]["merges"] for i in infos()]
    broker.send_signal(signal.SIGKILL)
    broker.wait()
    t.diag(f"broker killed after merges {merged_at_kill}")
    lost = wait_for("the engines to notice the broker is gone",
                    lambda: all(not i[0]["broker-connected"] and i[0]["state"] == "no-broker"
                                for i in infos()), 60)
    t.check(lost, "broker killed mid-merge: every engine reports state no-broker",
            [(i[0]["state"], i[0]["broker-connected"]) for i in infos()])
    t.check(wait_rounds(2), "without the broker every guest passes two more rounds")
    check_guests("while the broker was gone")

    broker = start_broker()
    back = wait_for("the engines to reconnect",
                    lambda: all(i[0]["broker-connected"] and i[0]["broker-reconnects"] >= 1
                                for i in infos()), 90)
    t.check(back, "the broker restarted: every engine reconnected",
            [(i[0]["state"], i[0]["broker-reconnects"]) for i in infos()])
    for q in vms:
        names = {e["event"] for e in q.qmp.events}
        t.check({"MEMORY_DEDUP_BROKER_LOST", "MEMORY_DEDUP_BROKER_REGAINED"} <= names,
                "events: broker lost and regained", sorted(names))

    merged = wait_for("the shared and zero pages to merge",
                      lambda: all(i[0]["merged-pages"] >= SHARED * 3 // 4 and
                                  i[0]["zero-pages"] >= ZERO for i in infos()), 300)
    got = infos()
    for vm, i in enumerate(got):
        i = i[0]
        t.check(i["merged-pages"] >= SHARED * 3 // 4 and i["zero-pages"] >= ZERO,
                f"vm{vm}: merged-pages {i['merged-pages']} (of {SHARED} shared), "
                f"zero-pages {i['zero-pages']} (of {ZERO})", i)
    t.check(merged, "merging resumed after the broker came back")
    t.check(wait_rounds(3), "every guest passes three more rounds with its memory merged")
    got = [i[0] for i in infos()]
    t.check(all(i["cow-events"] > 0 for i in got),
            "memcheck's rewrites hit merged pages (cow-events)",
            [i["cow-events"] for i in got])
    saved = sum(i["saved-bytes"] for i in got)
    pss_after = sum(pss_kib(q.proc.pid) for q in vms)
    drop = pss_before - pss_after
    # Ideal: two of three copies of the shared data plus every zero page;
    # rewrites keep unmerging some, the guests' kernels add some.
    ideal = (2 * SHARED + NVM * ZERO) * 4
    t.diag(f"PSS of the three QEMUs {pss_before} -> {pss_after} KiB (drop {drop} KiB, "
           f"ideal for memcheck's data {ideal} KiB); QMP saved-bytes {saved >> 10} KiB")
    t.check(drop >= ideal * 2 // 3, f"host PSS fell by {drop} KiB (>= 2/3 of {ideal})")
    t.check(saved >= ideal * 2 // 3 * 1024,
            f"QMP saved-bytes of the three add up to {saved >> 10} KiB")
    st = ctl("stats")
    t.check(st and st["clients"] == NVM and st["slots-used"] >= SHARED * 3 // 4,
            "the broker sees three clients and holds the shared pages once", st)

    # object-del while merging: the guest keeps its memory and passes on.
    vms[2].qmp.cmd("object-del", id="d0")
    t.equal(vms[2].qmp.cmd("query-memory-dedup"), [], "vm2: object-del while merging")
    t.check(wait_rounds(2), "after object-del every guest passes two more rounds")
    check_guests("at the end")
finally:
    for vm, q in enumerate(vms):
        if q.proc.poll() is not None:
            t.check(False, f"vm{vm}: QEMU is still running (exit status {q.proc.returncode})",
                    q.output()[-3000:] + "\nconsole:\n" + console(vm)[-3000:])
        q.__exit__(None, None, None)
    finish(t, broker, tmp)

t.done()

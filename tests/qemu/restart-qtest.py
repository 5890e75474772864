#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""A broker crash and restart with three QEMUs of one trust domain in three
states, on the qtest accelerator.

The test writes guest RAM through qtest: pages identical in all three VMs,
pages only the `unmerging` and `paused` VMs share, one content 300 times
over, pages each VM holds twice (merged within the VM), unique pages and
zeroed pages.  memory-dedup merges them (query-memory-dedup shows it).
Then each VM gets a state:

  paused     qom-set enabled=false;
  unmerging  qom-set cpu-limit=1, unmerge=true: about 900 pages a second,
             and its own duplicates come first, so it is still unmerging,
             and still maps the shared pages, long after the restart
             (checked: state unmerging, pool-refs > 0 and unmerged-pages
             growing before and after the kill, and pool pages still mapped
             at the sweep after the paused VM restored);
  idle       enabled, nothing to do.

The broker is SIGKILLed and started again (restart-grace 5 s).  The idle
VM finds it and hands the pool back; the broker then holds every populated
slot.  While the domain recovers the idle VM merges new pages (they must not
get a held slot), and the sweeps (broker log, qemu-dedup-ctl stats:
domains-recovering, slots-held) must keep what the paused and unmerging
VMs map.  After the first sweep the paused VM resumes and RESTOREs its
slots; once the unmerging VM is done, recovery completes with exactly the
slots that the idle and paused VMs reference.  The unmerging VM then merges
again.

Throughout, every page of guest RAM (0-640 KiB and 1 MiB to the end) reads
back as written, and every VMA in /proc/PID/smaps that maps the pool memfd
or lies in guest RAM keeps MADV_DONTDUMP (`dd`; -machine dump-guest-core=off).
When the VMs exit, the broker holds no slot: slots-used 0, slots-held 0.

Usage: restart-qtest.py QEMU_BUILD_DIR OWN_BUILD_DIR"""

import os
import re
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
import guestmem as gm  # noqa: E402
from host import broker_ctl, finish  # noqa: E402
from qmp import QemuProcess  # noqa: E402
from qtest import QTest  # noqa: E402
from tap import Tap  # noqa: E402

qemu = os.path.join(sys.argv[1], "qemu-system-x86_64")
own = sys.argv[2]
BROKER = os.path.join(own, "broker", "qemu-dedup-broker")
CTL = os.path.join(own, "tools", "qemu-dedup-ctl")
PAGE = gm.PAGE
LOW = 0xa0000 // PAGE           # 0-640 KiB: RAM, never written
BASE = 0x100000                 # 1 MiB: where the test's pages start
# restart-grace, s.  The idle VM retries the broker at its backoff (2 s at
# most) and only between passes (0.8 s at most when backed off): it may take
# 3 s to hand the pool back, so 5 s and not less.
GRACE = 5
DOMAIN = "restart"
IDLE, PAUSED, UNMERGING = 0, 1, 2
NAMES = ["idle", "paused", "unmerging"]
MIB = [96, 96, 320]             # guest RAM
SHARED, PAIR, MANY, UNIQUE, ZERO = 8192, 2048, 300, 1024, 1024
# Contents each VM holds twice: the unmerging VM's many come first in its
# RAM, so that it unmerges them (a minute at cpu-limit=1) before the shared.
SELF = [1024, 1024, 32768]
NEWDUP = 512                    # contents written twice into idle during recovery
t = Tap()
tmp = tempfile.mkdtemp(prefix="qdedup-restart-")
bsock = os.path.join(tmp, "broker.sock")
control = os.path.join(tmp, "control.sock")
blog = os.path.join(tmp, "broker.log")
conf = os.path.join(tmp, "broker.conf")


def segments(vm):
    """The VM's layout from BASE: (name, pages, content of page i)."""
    # Self-duplicates in blocks of 512 pages, each block twice running: one
    # VMA a block, and unmerging lets go of a block's slots block by block.
    seg = [("self", 2 * SELF[vm], lambda i: gm.pattern(10 + vm, i // 1024 * 512 + i % 512)),
           ("shared", SHARED, lambda i: gm.pattern(1, i))]
    if vm != IDLE:
        seg.append(("pair", PAIR, lambda i: gm.pattern(2, i)))
    seg += [("many", MANY, lambda i: gm.pattern(3, 0)),
            ("unique", UNIQUE, lambda i: gm.pattern(20 + vm, i)),
            ("zero", ZERO, lambda i: bytes(PAGE))]
    return seg


class Guest:
    """One QEMU, its qtest socket, and what its RAM must hold."""

    def __init__(self, vm):
        self.vm, self.name = vm, NAMES[vm]
        self.pages = MIB[vm] * 256
        self.seg, first = [], BASE // PAGE
        for name, n, fn in segments(vm):
            self.seg.append((name, first, n, fn))
            first += n
        self.used = first               # pages from 0 the layout reaches
        self.extra = {}                 # page -> content written later
        assert self.used < self.pages
        self.qt = QTest(os.path.join(tmp, f"qtest-{self.name}.sock"))
        self.q = QemuProcess(qemu, [
            "-accel", "qtest", "-qtest", f"unix:{os.path.join(tmp, f'qtest-{self.name}.sock')}",
            "-qtest-log", "/dev/null",
            "-machine", "pc,dump-guest-core=off", "-nodefaults", "-display", "none",
            "-m", str(MIB[vm]), "-name", f"{self.name},debug-threads=on",
            "-object", f"memory-dedup,id=d0,broker={bsock},domain={DOMAIN},enabled=off,"
                       "pass-interval=50,cpu-limit=100"])

    def start(self):
        self.q.__enter__()
        self.qt.accept()
        self.pid = self.q.proc.pid

    def expected(self, p):
        """Content of guest page P (physical page number)."""
        if p in self.extra:
            return self.extra[p]
        for name, first, n, fn in self.seg:
            if first <= p < first + n:
                return fn(p - first)
        if LOW <= p < BASE // PAGE:
            return None         # VGA window and BIOS: not RAM
        return bytes(PAGE)      # never written: zeros

    def fill(self):
        for name, first, n, fn in self.seg:
            if name == "zero":
                # Written non-zero first, then zeroed: real memory.
                gm.write_pages(self.qt, first * PAGE, n, lambda i: gm.pattern(5, i))
                self.qt.cmd(f"memset {first * PAGE:#x} {n * PAGE:#x} 0")
            else:
                gm.write_pages(self.qt, first * PAGE, n, fn)

    def bad(self):
        return gm.bad_pages(self.qt, 0, self.pages, self.expected)

    def info(self):
        return self.q.qmp.cmd("query-memory-dedup")[0]

    def set(self, prop, value):
        self.q.qmp.cmd("qom-set", path="/objects/d0", property=prop, value=value)

    def dontdump(self):
        """VMAs in guest RAM or of the pool without MADV_DONTDUMP, and how many
        VMAs were looked at."""
        ranges = [(hva, hva + size) for name, (hva, size) in gm.ramblocks(self.q.qmp).items()
                  if name == "pc.ram"]
        bad, seen = gm.vmas_without(self.pid, "dd", ranges, "/memfd:qemu-dedup-pool")
        return bad, seen, ranges


def ctl(what):
    return broker_ctl(CTL, control, what) or {}


def start_broker():
    if os.path.exists(control):
        os.unlink(control)
    log = open(blog, "a")
    b = subprocess.Popen([BROKER, f"--config={conf}", f"--socket={bsock}",
                          f"--control={control}", "--pool-max=1G"],
                         stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not os.path.exists(control) and time.monotonic() < deadline and b.poll() is None:
        time.sleep(0.05)
    return b


def broker_log():
    with open(blog, errors="replace") as f:
        return f.read()


def sweeps(since):
    """The broker's recovery reports for our domain after log offset SINCE."""
    return re.findall(rf"recovery of {DOMAIN}[^\n]*", broker_log()[since:])


def check_data(guests, when):
    t0 = time.monotonic()
    for g in guests:
        bad = g.bad()
        t.check(not bad, f"{g.name}: every page of its {MIB[g.vm]} MiB reads back right "
                f"{when}", f"{len(bad)} bad pages, first {bad[:10]}")
    t.diag(f"read back {sum(MIB[g.vm] for g in guests)} MiB in "
           f"{time.monotonic() - t0:.1f} s")


def check_dontdump(guests, when):
    for g in guests:
        bad, seen, ranges = g.dontdump()
        t.check(not bad and seen > 0 and ranges,
                f"{g.name}: all {seen} VMAs of guest RAM and of the pool are "
                f"MADV_DONTDUMP {when}", "\n".join(bad[:10]) or f"ranges {ranges}")


def wait_for(what, cond, timeout):
    return t.wait(what, cond, timeout, 0.5)


with open(conf, "w") as f:
    f.write(f"[broker]\nrestart-grace = {GRACE}\n\n[domain {DOMAIN}]\n")
broker = start_broker()
t.check(broker.poll() is None and os.path.exists(control), "the broker started",
        broker_log())
guests = []
try:
    guests = [Guest(vm) for vm in range(3)]
    for g in guests:
        g.start()
    idle, paused, unm = guests
    t0 = time.monotonic()
    for g in guests:
        g.fill()
    t.diag(f"wrote {sum(g.used - BASE // PAGE for g in guests) * PAGE >> 20} MiB "
           f"in {time.monotonic() - t0:.1f} s")

    # Merge: the shared, paired, repeated and self-duplicated pages.
    for g in guests:
        g.set("enabled", True)
    want_merged = [SHARED + MANY + 2 * SELF[vm] + (PAIR if vm != IDLE else 0)
                   for vm in range(3)]
    want_slots = SHARED + PAIR + 1 + sum(SELF)
    merged = wait_for("the VMs to merge",
                      lambda: all(g.info()["merged-pages"] >= want_merged[g.vm] and
                                  g.info()["zero-pages"] >= ZERO for g in guests) and
                      ctl("stats").get("slots-used") == want_slots, 120)
    for g in guests:
        i = g.info()
        t.check(i["merged-pages"] >= want_merged[g.vm] and i["zero-pages"] >= ZERO and
                i["broker-connected"],
                f"{g.name}: merged-pages {i['merged-pages']} (>= {want_merged[g.vm]}), "
                f"zero-pages {i['zero-pages']}, pool-refs {i['pool-refs']}", i)
    st = ctl("stats")
    t.check(merged and st.get("slots-used") == want_slots and st.get("clients") == 3,
            f"the broker holds each content once: slots-used {st.get('slots-used')} "
            f"(want {want_slots}), 3 clients", st)
    check_data(guests, "once merged")
    check_dontdump(guests, "once merged")

    # The three states.
    paused.set("enabled", False)
    unm.set("cpu-limit", 1)
    unm.set("unmerge", True)
    wait_for("the first unmerge step", lambda: unm.info()["unmerged-pages"] > 0, 30)
    i_unm = unm.info()
    before_kill = ctl("stats")
    t.check(paused.info()["state"] == "paused" and idle.info()["state"] == "running" and
            i_unm["state"] == "unmerging" and 0 < i_unm["unmerged-pages"] and
            i_unm["pool-refs"] > SHARED,
            f"states: idle running, paused paused, unmerging unmerging (unmerged-pages "
            f"{i_unm['unmerged-pages']}, pool-refs {i_unm['pool-refs']} left)",
            [g.info()["state"] for g in guests])

    # The crash.
    broker.send_signal(signal.SIGKILL)
    broker.wait()
    log_at_kill = len(broker_log())
    i2 = unm.info()
    t.check(i2["state"] == "unmerging" and i2["pool-refs"] > 0,
            f"the broker was SIGKILLed while unmerging was still under way "
            f"(pool-refs {i2['pool-refs']} left)", i2)
    check_data(guests, "with the broker dead")
    check_dontdump([unm], "while unmerging")
    # One step of 4096 pages every few seconds at cpu-limit=1.
    wait_for("the next unmerge step",
             lambda: unm.info()["unmerged-pages"] > i2["unmerged-pages"], 30)
    i3 = unm.info()
    t.check(i3["unmerged-pages"] > i2["unmerged-pages"] and i3["pool-refs"] > SHARED,
            f"unmerging goes on without the broker: unmerged-pages "
            f"{i2['unmerged-pages']} -> {i3['unmerged-pages']}", i3)
    # The idle VM notices when it next asks the broker (its unique pages).
    noticed = wait_for("the idle VM to notice", lambda: not idle.info()["broker-connected"], 60)
    t.check(noticed and idle.info()["state"] == "no-broker",
            "the idle VM noticed the broker is gone (state no-broker)", idle.info())

    broker = start_broker()
    t.check(broker.poll() is None and os.path.exists(control),
            "the broker started again with the state file")
    adopted = wait_for("the pool to be handed back",
                       lambda: f"adopted the previous pool of {DOMAIN}" in
                       broker_log()[log_at_kill:], GRACE + 10)
    st = ctl("stats")
    held_at_adopt = st.get("slots-held", 0)
    t.check(adopted and idle.info()["broker-connected"] and
            idle.info()["broker-reconnects"] == 1,
            "the idle VM reconnected and handed its pool back", broker_log()[log_at_kill:])
    t.check(st.get("domains-recovering") == 1 and
            SHARED + PAIR + 1 + SELF[IDLE] + SELF[PAUSED] <= st.get("slots-held", 0) <=
            before_kill.get("slots-used", 0),
            f"the broker holds every populated slot: slots-held {st.get('slots-held')} "
            f"(slots-used was {before_kill.get('slots-used')} before the kill), "
            f"domains-recovering {st.get('domains-recovering')}", st)
    # New merges during recovery must not be given held slots.
    first = idle.used + 16
    for k in range(2 * NEWDUP):
        idle.extra[first + k] = gm.pattern(30, k % NEWDUP)
    gm.write_pages(idle.qt, first * PAGE, 2 * NEWDUP, lambda k: gm.pattern(30, k % NEWDUP))
    newdup = wait_for("the new duplicates to merge in the idle VM", lambda:
                      idle.info()["merged-pages"] >= want_merged[IDLE] + 2 * NEWDUP, 60)
    t.check(newdup, f"the idle VM merges {2 * NEWDUP} new pages while the domain recovers "
            f"(merged-pages {idle.info()['merged-pages']})", idle.info())

    # Past restart-grace: the first sweep keeps what paused and unmerging map.
    swept = wait_for("the first recovery sweep", lambda: sweeps(log_at_kill), GRACE + 20)
    st = ctl("stats")
    t.check(swept and st.get("domains-recovering") == 1 and
            st.get("slots-held", 0) >= SHARED + PAIR + 1 + SELF[PAUSED],
            f"first sweep: still recovering, slots-held {st.get('slots-held')} (the paused "
            f"VM maps {SHARED + PAIR + 1 + SELF[PAUSED]} slots it has not restored)",
            sweeps(log_at_kill))
    t.diag("\n".join(sweeps(log_at_kill)))
    check_data(guests, "after the first sweep")

    # Resume the paused VM: it reconnects and RESTOREs what it maps.
    paused.set("enabled", True)
    back = wait_for("the paused VM to reconnect", lambda: paused.info()["broker-connected"] and
                    paused.info()["broker-reconnects"] >= 1, 30)
    mine = [c for c in ctl("clients") if c["pid"] == paused.pid] if back else []
    want = SHARED + PAIR + 1 + SELF[PAUSED]
    t.check(back and len(mine) == 1 and mine[0]["restored"] == want and
            mine[0]["slots"] == want,
            f"paused VM resumed: it reconnected and restored its {want} slots",
            mine or paused.info())
    t.check(paused.info()["merged-pages"] >= want_merged[PAUSED] and
            paused.info()["restored"] == 0,
            f"paused VM: nothing moved back (merged-pages {paused.info()['merged-pages']})",
            paused.info())
    # The next sweep releases the paused VM's own slots, not the ones the
    # unmerging VM still maps.
    n = len(sweeps(log_at_kill))
    wait_for("the next sweep", lambda: len(sweeps(log_at_kill)) > n, 8 * GRACE + 10)
    st = ctl("stats")
    i_unm = unm.info()
    t.check(st.get("domains-recovering") == 1 and i_unm["pool-refs"] > SHARED + PAIR + MANY and
            st.get("slots-held", 0) >= SHARED + PAIR + 1,
            f"the sweep after the resume: slots-held {st.get('slots-held')}, the unmerging VM "
            f"still maps the shared slots (pool-refs {i_unm['pool-refs']}) and has restored "
            "none", sweeps(log_at_kill))
    early = sum(int(n) for r in sweeps(log_at_kill) for n in re.findall(r"(\d+) slots punched", r))
    t.check(early > 0, f"meanwhile the sweeps punched {early} held slots of the unmerging VM's "
            "own duplicates that it has let go of, while the domain still recovers",
            sweeps(log_at_kill))
    check_data(guests, "while the unmerging VM maps held slots")
    check_dontdump(guests, "during recovery")

    # Let the unmerging VM finish; the next sweep completes recovery.
    unm.set("cpu-limit", 100)
    done = wait_for("unmerging to finish", lambda: unm.info()["pool-refs"] == 0 and
                    unm.info()["merged-pages"] == 0, 60)
    t.check(done, f"the unmerging VM finished (unmerged-pages {unm.info()['unmerged-pages']})",
            unm.info())
    complete = wait_for("recovery to complete", lambda: ctl("stats").get("domains-recovering")
                        == 0 and ctl("stats").get("slots-held") == 0, 64 * GRACE)
    st = ctl("stats")
    want_slots = SHARED + PAIR + 1 + SELF[IDLE] + SELF[PAUSED] + NEWDUP
    t.check(complete and st.get("slots-used") == want_slots and st.get("restores-refused") == 0,
            f"recovery complete: slots-held {st.get('slots-held')}, slots-used "
            f"{st.get('slots-used')} = what idle and paused reference ({want_slots}), "
            f"restores-refused {st.get('restores-refused')}", st)
    reports = sweeps(log_at_kill)
    punched = sum(int(n) for r in reports for n in re.findall(r"(\d+) slots punched", r)) + \
        sum(int(n) for r in reports for n in re.findall(r"(\d+) unclaimed slots freed", r))
    want = held_at_adopt - (SHARED + PAIR + 1 + SELF[IDLE] + SELF[PAUSED])
    t.check(punched == want,
            f"the sweeps punched the {want} held slots only the unmerging VM had mapped, "
            f"once it let go ({punched} punched)", reports)
    t.diag("\n".join(sweeps(log_at_kill)))
    check_data(guests, "after recovery")

    # The unmerging VM merges again.
    unm.set("unmerge", False)
    again = wait_for("the unmerging VM to merge again", lambda: unm.info()["merged-pages"] >=
                     want_merged[UNMERGING], 120)
    t.check(again and unm.info()["broker-connected"],
            f"unmerge=false: it reconnects and merges again (merged-pages "
            f"{unm.info()['merged-pages']})", unm.info())
    t.check(ctl("stats").get("slots-used") == want_slots + SELF[UNMERGING],
            f"the broker holds its {SELF[UNMERGING]} own duplicates again "
            f"(slots-used {ctl('stats').get('slots-used')})", ctl("stats"))
    check_data(guests, "at the end")
    check_dontdump(guests, "at the end")
    for g in guests:
        log = g.q.output()
        t.check("refused UNREF" not in log and "that no page used" not in log and
                "cannot unmerge" not in log,
                f"{g.name}: QEMU logged no refused UNREF and no failed unmerge", log[-2000:])
        if t.failures:
            t.diag(f"{g.name} log tail:\n{log[-1500:]}")
finally:
    for g in guests:
        if g.q.proc and g.q.proc.poll() is not None:
            t.check(False, f"{g.name}: QEMU is still running (exit {g.q.proc.returncode})",
                    g.q.output()[-3000:])
        if g.q.proc:
            g.q.__exit__(None, None, None)

gone = wait_for("the broker to let go of every slot",
                lambda: ctl("stats").get("slots-used") == 0 and
                ctl("stats").get("slots-held") == 0, 30)
st = ctl("stats")
t.check(gone and st.get("clients") == 0 and st.get("pool-resident-bytes") == 0,
        f"the VMs exited: slots-used {st.get('slots-used')}, slots-held "
        f"{st.get('slots-held')}, pool-resident-bytes {st.get('pool-resident-bytes')}", st)
if t.failures:
    t.diag("broker log tail:\n" + broker_log()[-4000:])
finish(t, broker, tmp)
t.done()

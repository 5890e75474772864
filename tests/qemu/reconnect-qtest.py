#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""A VM with no trust domain (a private domain of its own) loses the broker
and finds the same broker again, on the qtest accelerator.

The test writes duplicate pages into one QEMU's RAM through qtest (512
contents eight times over, one content 300 times, which overflows the
engine's one-byte use count, plus unique and zeroed pages) and waits for
memory-dedup to merge them within the VM.  It notes merged-pages, pool-refs
and vmas-used, and the broker's client entry.  Then it SIGSTOPs the broker
and writes fresh duplicates, so that the engine asks the stopped broker,
times out (5 s) and reports the loss (MEMORY_DEDUP_BROKER_LOST,
broker-connected false), and SIGCONTs it after a few more seconds.

The engine must reconnect (broker-reconnects 1, MEMORY_DEDUP_BROKER_REGAINED)
to the same broker and get its references back (REFS_KEPT): no mass
move-back (merged-pages and pool-refs do not drop, restored and
unmerged-pages do not move, vmas-used does not grow beyond the new merges),
and the broker lists the same pid in the same private domain, connected,
with at least its references of before, no orphan, no second domain and no
refused RESTORE.  The fresh duplicates merge afterwards.  QMP must answer
within 2 s the whole time: the monitor must not wait for a stopped broker.
Every page written reads back right.  Then the broker is killed and started
again without its state file: it does not know the pool the engine hands
back (POOL_CHANGED), so the engine copies its merged pages out of the old
pool and merges again into the new one.  Once QEMU exits the broker holds
no slot.

Usage: reconnect-qtest.py QEMU_BUILD_DIR OWN_BUILD_DIR"""

import os
import signal
import sys
import tempfile
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
PAGE = gm.PAGE
BASE = 0x100000                 # 1 MiB: plain RAM
DISTINCT, COPIES = 512, 8       # 512 contents, each in 8 places
MANY = 300                      # one content in 300 places (use count > 254)
UNIQUE, ZERO = 512, 512
FRESH = 64                      # contents written twice while the broker is stopped
FRESH_BASE = 0x4000000          # 64 MiB, never written before
QMP_MAX_S = 2.0                 # longest a QMP command may take
t = Tap()
tmp = tempfile.mkdtemp(prefix="qdedup-reconnect-")


def layout():
    """Expected content of every page written from BASE (before the stop)."""
    pages = [gm.pattern(1, j) for _ in range(COPIES) for j in range(DISTINCT)]
    pages += [gm.pattern(2, 0)] * MANY
    pages += [gm.pattern(3, j) for j in range(UNIQUE)]
    pages += [bytes(PAGE)] * ZERO
    return pages


def fresh(i):
    """The fresh pages: FRESH contents, each twice."""
    return gm.pattern(4, i % FRESH)


EXPECTED = layout()
DUPLICATES = DISTINCT * COPIES + MANY       # pages that should merge
SLOTS = DISTINCT + 1                        # and the slots they need

broker, bsock, control = start_broker(BROKER, tmp, "--pool-max=256M", "--verbose")
t.check(broker.poll() is None and os.path.exists(control), "the broker started")
q = None
stopped = False
try:
    qt = QTest(os.path.join(tmp, "qtest.sock"))
    q = QemuProcess(qemu, [
        "-accel", "qtest", "-qtest", f"unix:{os.path.join(tmp, 'qtest.sock')}",
        "-qtest-log", "/dev/null",
        "-machine", "pc", "-nodefaults", "-display", "none", "-m", "128",
        "-name", "private,debug-threads=on",
        # A second monitor, watched with deadlines (qmpwatch.py).
        "-qmp", f"unix:{os.path.join(tmp, 'watch.sock')},server=on,wait=off",
        # No domain: a private domain of its own.
        "-object", f"memory-dedup,id=d0,broker={bsock},pass-interval=100,cpu-limit=100"])
    q.__enter__()
    qt.accept()
    w = QMPWatch(os.path.join(tmp, "watch.sock"))
    latencies = []

    def info(timeout=30):
        t0 = time.monotonic()
        got = w.cmd("query-memory-dedup", timeout=timeout)[0]
        latencies.append(time.monotonic() - t0)
        return got

    def client():
        """The broker's entries for our pid, and all of its clients."""
        clients = broker_ctl(CTL, control, "clients") or []
        return [c for c in clients if c["pid"] == q.proc.pid], clients

    # Zeroed pages are written non-zero first, then zeroed: real memory.
    nz = len(EXPECTED) - ZERO
    gm.write_pages(qt, BASE, len(EXPECTED),
                   lambda i: EXPECTED[i] if i < nz else gm.pattern(5, i))
    qt.cmd(f"memset {BASE + nz * PAGE:#x} {ZERO * PAGE:#x} 0")
    t.equal(info()["domain"], "", "the object names no domain")
    settled = t.wait("the duplicates to merge",
                     lambda: info()["merged-pages"] >= DUPLICATES and
                     info()["zero-pages"] >= ZERO, 90)
    # A few quiet passes more: the figures before the stop are final.
    time.sleep(2)
    before = info()
    mine, _ = client()
    t.check(settled, f"merged within the VM: merged-pages {before['merged-pages']} "
            f"(>= {DUPLICATES}), zero-pages {before['zero-pages']}, pool-refs "
            f"{before['pool-refs']}, vmas-used {before['vmas-used']}", before)
    t.check(len(mine) == 1 and mine[0]["domain"] == "" and mine[0]["state"] == "connected"
            and mine[0]["slots"] == SLOTS,
            f"the broker lists our pid, private, connected, with {SLOTS} references "
            "(one per slot however many pages map it)", mine)
    bad = gm.bad_pages(qt, BASE, len(EXPECTED), EXPECTED.__getitem__)
    t.check(not bad, "every page reads back right while merged", bad[:10])
    old = mine[0] if mine else {}

    # Stop the broker; new duplicates make the engine ask it, and time out.
    broker.send_signal(signal.SIGSTOP)
    stopped = True
    t0 = time.monotonic()
    gm.write_pages(qt, FRESH_BASE, 2 * FRESH, fresh)
    w.events.clear()
    lost_at = None
    slow = []
    while time.monotonic() - t0 < 40:
        p0 = time.monotonic()
        try:
            i = info(timeout=QMP_MAX_S)
            if not i["broker-connected"] and lost_at is None:
                lost_at = time.monotonic() - t0
        except TimeoutError:
            slow.append(round(p0 - t0, 1))
        w.pump(0)
        if lost_at is None and any(e["event"] == "MEMORY_DEDUP_BROKER_LOST"
                                   for e in w.events):
            lost_at = time.monotonic() - t0
        # Stay stopped a few seconds after the loss: the engine retries meanwhile.
        if lost_at is not None and time.monotonic() - t0 > lost_at + 4:
            break
        time.sleep(0.5)
    held = time.monotonic() - t0
    t.check(lost_at is not None, "broker SIGSTOPped: the engine lost it "
            f"({'after %.1f s' % lost_at if lost_at is not None else 'never'}: "
            "MEMORY_DEDUP_BROKER_LOST or broker-connected false)")
    t.check(any(e["event"] == "MEMORY_DEDUP_BROKER_LOST" for e in w.events),
            "the MEMORY_DEDUP_BROKER_LOST event was sent",
            [e["event"] for e in w.events])
    t.check(not slow, f"QMP answered within {QMP_MAX_S:.0f} s all the {held:.0f} s the "
            "broker was stopped (the monitor must not wait for the broker)",
            f"query-memory-dedup got no answer in {QMP_MAX_S} s when sent at "
            f"{slow} s after SIGSTOP")
    broker.send_signal(signal.SIGCONT)
    stopped = False
    t.diag(f"broker SIGCONTed after {held:.1f} s stopped")

    # The same broker again: our references must come back (REFS_KEPT).
    back = t.wait("the engine to reconnect",
                  lambda: info()["broker-connected"] and info()["broker-reconnects"] >= 1,
                  60)
    w.pump(0.5)
    t.check(back, "SIGCONT: the engine reconnected (broker-reconnects "
            f"{info()['broker-reconnects']})", info())
    t.check(any(e["event"] == "MEMORY_DEDUP_BROKER_REGAINED" for e in w.events),
            "the MEMORY_DEDUP_BROKER_REGAINED event was sent",
            [e["event"] for e in w.events])
    remerged = t.wait("the fresh duplicates to merge",
                      lambda: info()["merged-pages"] >= before["merged-pages"] + 2 * FRESH - 8,
                      60)

    def asked_again():
        """Has the new connection asked about every unique page again?  A
        unique page is a candidate the broker has seen from this VM before:
        the answer must be a miss, not a PUBLISH."""
        m, _ = client()
        return m and m[0]["misses"] + m[0]["publish-requests"] >= UNIQUE + 2 * FRESH

    reasked = t.wait("the unique pages to be asked about again", asked_again, 90)
    time.sleep(1)
    after = info()
    t.check(remerged, f"merging goes on: the {2 * FRESH} fresh pages merged too "
            f"(merged-pages {before['merged-pages']} -> {after['merged-pages']})", after)
    # Nothing was moved back or given up on the way.
    drop = max(before["merged-pages"] - after["merged-pages"],
               before["pool-refs"] - after["pool-refs"], 0)
    t.check(drop <= 4, f"the merges were kept: merged-pages {before['merged-pages']} -> "
            f"{after['merged-pages']}, pool-refs {before['pool-refs']} -> "
            f"{after['pool-refs']}", after)
    t.check(after["restored"] == before["restored"] and
            after["unmerged-pages"] == before["unmerged-pages"] and
            after["mismatches"] == before["mismatches"],
            f"no mass move-back: restored {before['restored']} -> {after['restored']}, "
            f"unmerged-pages {before['unmerged-pages']} -> {after['unmerged-pages']}, "
            f"mismatches {before['mismatches']} -> {after['mismatches']}", after)
    # The fresh pages are two runs of consecutive slots: a few VMAs, not hundreds.
    t.check(after["vmas-used"] <= before["vmas-used"] + 6,
            f"no VMA growth beyond the fresh merges: vmas-used {before['vmas-used']} -> "
            f"{after['vmas-used']}", after)
    mine, clients = client()
    st = broker_ctl(CTL, control, "stats") or {}
    now = mine[0] if mine else {}
    t.check(len(mine) == 1 and now.get("state") == "connected" and now.get("domain") == "" and
            now.get("domain-id") == old.get("domain-id"),
            "the broker lists our pid once, connected, in the same private domain "
            f"(domain-id {old.get('domain-id')} -> {now.get('domain-id')})", clients)
    t.check(now.get("slots", 0) >= old.get("slots", SLOTS),
            f"with its references of before: slots {old.get('slots')} -> "
            f"{now.get('slots')}", now)
    # Its own candidates are still its own after the reconnect: the unique
    # pages, asked about again, are misses and take no slot.
    t.check(reasked and now.get("slots") == old.get("slots", SLOTS) + FRESH and
            after["merged-pages"] <= before["merged-pages"] + 2 * FRESH,
            f"the {UNIQUE} unique pages, asked about again, did not merge: slots "
            f"{old.get('slots')} -> {now.get('slots')} (want +{FRESH} for the fresh "
            f"pages), merged-pages {before['merged-pages']} -> {after['merged-pages']} "
            f"(want +{2 * FRESH})",
            {k: now.get(k) for k in ("lookups", "misses", "publish-requests", "stored",
                                     "hits")})
    t.check(st.get("orphans") == 0 and st.get("domains") == 1 and
            st.get("restores-refused") == 0 and st.get("slots-held") == 0 and
            st.get("restored") == 0,
            f"no orphan left, one domain, nothing restored or refused (orphans "
            f"{st.get('orphans')}, domains {st.get('domains')}, restored "
            f"{st.get('restored')}, restores-refused {st.get('restores-refused')})", st)
    bad = gm.bad_pages(qt, BASE, len(EXPECTED), EXPECTED.__getitem__)
    bad_fresh = gm.bad_pages(qt, FRESH_BASE, 2 * FRESH, fresh)
    t.check(not bad and not bad_fresh, "every page reads back right after the reconnect",
            (bad[:10], bad_fresh[:10]))

    # A broker that does not know our pool (its state file lost, or the
    # grace passed): POOL_CHANGED.  The engine copies its merged pages out
    # of the old pool and merges again into the new broker's.
    broker.send_signal(signal.SIGKILL)
    broker.wait()
    os.unlink(bsock + ".state")
    broker, bsock, control = start_broker(BROKER, tmp, "--pool-max=256M", "--verbose")
    t.check(broker.poll() is None, "a new broker without the state file started")
    pre = info()
    again = t.wait("the engine to connect to the new broker",
                   lambda: info()["broker-connected"] and
                   info()["broker-reconnects"] > pre["broker-reconnects"], 60)
    t.check(again, "the engine connected to a broker that does not know its pool",
            info())
    remerged = t.wait("the duplicates to merge into the new pool",
                      lambda: info()["merged-pages"] >= DUPLICATES + 2 * FRESH - 8, 90)
    time.sleep(1)
    fresh_pool = info()
    mine, clients = client()
    t.check(remerged and fresh_pool["unmerged-pages"] >= after["unmerged-pages"] +
            DUPLICATES, "POOL_CHANGED: the old pool's pages were unmerged "
            f"(unmerged-pages {after['unmerged-pages']} -> {fresh_pool['unmerged-pages']}) "
            f"and merged again (merged-pages {fresh_pool['merged-pages']})", fresh_pool)
    t.check(len(mine) == 1 and mine[0].get("slots") == SLOTS + FRESH,
            f"the new broker holds our {SLOTS + FRESH} slots once", clients)
    bad = gm.bad_pages(qt, BASE, len(EXPECTED), EXPECTED.__getitem__)
    bad_fresh = gm.bad_pages(qt, FRESH_BASE, 2 * FRESH, fresh)
    t.check(not bad and not bad_fresh, "every page reads back right in the new pool",
            (bad[:10], bad_fresh[:10]))
    log = q.output()
    t.check("has a new pool: pages of the old one unmerged" in log,
            "QEMU logged that it left the old pool", log[-2000:])
    t.check("refused UNREF" not in log and "that no page used" not in log,
            "QEMU logged no refused UNREF and no release of an unused slot", log[-2000:])
    if t.failures:
        t.diag("QEMU log tail:\n" + log[-3000:])
    w.close()
finally:
    if stopped:
        broker.send_signal(signal.SIGCONT)
    if q:
        q.__exit__(None, None, None)

# QEMU is gone: its private domain and every slot with it.
gone = t.wait("the broker to free the private domain",
              lambda: (broker_ctl(CTL, control, "stats") or {}).get("slots-used") == 0, 30)
st = broker_ctl(CTL, control, "stats") or {}
t.check(gone and st.get("slots-held") == 0 and st.get("clients") == 0 and
        st.get("domains") == 0,
        f"QEMU exited: slots-used {st.get('slots-used')}, slots-held {st.get('slots-held')}, "
        f"clients {st.get('clients')}, domains {st.get('domains')}", st)
if t.failures:
    with open(os.path.join(tmp, "broker.log")) as f:
        t.diag("broker log tail:\n" + f.read()[-3000:])
finish(t, broker, tmp)
t.done()

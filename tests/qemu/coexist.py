#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""memory-dedup beside the rest of QEMU (issue 5), with two TCG guests
running memcheck (scripts/guest/memcheck.c), which verifies every byte of
its memory each round, and one broker.  On guest A, in turn:

  - background-snapshot and (on a migration destination) postcopy are
    refused with errors that name memory-dedup;
  - virtio-balloon inflate (and free page reporting): merged pages QEMU
    discards must read zeros afterwards (read back with pmemsave);
  - snapshot-save, more rounds, snapshot-load: the guest comes back as
    saved and passes on;
  - system_reset: the guest boots again and merges again;
  - precopy migration to a new QEMU whose memory-dedup waits for the
    migration to complete, then merges again;
  - unmerge=on counts pool-refs down to 0, object-del, object-add again;
  - object-del on guest B while merged (unmerge at once).

Every memcheck round in every guest must pass.  References: after
unmerging, the broker holds none for that QEMU (so none leaked on the
way), and no QEMU logs a refused UNREF (none released twice).

Usage: coexist.py QEMU_BUILD_DIR OWN_BUILD_DIR GUEST_DIR"""

import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from host import broker_ctl, finish, memcheck_rounds, tcg_guest_args  # noqa: E402
from qmp import QemuProcess, QMPError  # noqa: E402
from tap import Tap  # noqa: E402

qemu = os.path.join(sys.argv[1], "qemu-system-x86_64")
own, guest = sys.argv[2], sys.argv[3]
BROKER = os.path.join(own, "broker", "qemu-dedup-broker")
CTL = os.path.join(own, "tools", "qemu-dedup-ctl")
SHARED_MIB, UNIQUE_MIB, ZERO_MIB, SPARE_MIB = 40, 8, 16, 24
SHARED = SHARED_MIB * 256
PAGE = 4096
t = Tap()
tmp = tempfile.mkdtemp(prefix="qdedup-coexist-")
bsock = os.path.join(tmp, "broker.sock")
control = os.path.join(tmp, "control.sock")
DEDUP = f"memory-dedup,id=d0,broker={bsock},domain=coexist,pass-interval=300,cpu-limit=50"


def vm_args(name, seed, extra=()):
    return tcg_guest_args(guest, name, os.path.join(tmp, name + ".console"), 256, {
        "workload": "memcheck", "shared": SHARED_MIB, "unique": UNIQUE_MIB,
        "zero": ZERO_MIB, "seed": seed, "rounds": 0, "interval": 1, "rewrite": 1,
        "spare": SPARE_MIB, "free": 8}) + [
        "-device", "virtio-balloon-pci,id=balloon0,free-page-reporting=on",
        "-trace", "memory_dedup_discard", "-object", DEDUP, *extra]


def console(name):
    try:
        with open(os.path.join(tmp, name + ".console"), errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def rounds(name, since=0):
    """memcheck rounds passed in NAME's console after offset SINCE, and failures."""
    ok, bad = memcheck_rounds(console(name)[since:])
    return len(ok), bad


def wait_for(what, cond, timeout):
    return t.wait(what, cond, timeout, 0.3)


def passes_rounds(name, n, what, timeout=180):
    since = len(console(name))
    wait_for(f"{name}: {n} rounds", lambda: rounds(name, since)[0] >= n or
             rounds(name, since)[1], timeout)
    got, bad = rounds(name, since)
    t.check(got >= n and not bad, f"{name}: memcheck passes {n} more rounds {what}",
            bad[:5] or f"{got} rounds")


def info(q):
    got = q.qmp.cmd("query-memory-dedup")
    return got[0] if got else None


def client_of(q):
    for c in broker_ctl(CTL, control, "clients") or []:
        if c["pid"] == q.proc.pid and c["state"] != "orphan":
            return c
    return None


def wait_merged(q, what, timeout=240):
    ok = wait_for(f"{what} to merge", lambda: info(q)["merged-pages"] >= SHARED * 3 // 4,
                  timeout)
    i = info(q)
    t.check(ok, f"{what}: merged-pages {i['merged-pages']} (of {SHARED} shared)",
            {k: i[k] for k in ("state", "vmas-used", "pool-refs", "restored", "cow-events",
                               "merges", "passes")})


def wait_job(q, job):
    wait_for(f"job {job}", lambda: any(j["id"] == job and j["status"] == "concluded"
                                       for j in q.qmp.cmd("query-jobs")), 120)
    jobs = [j for j in q.qmp.cmd("query-jobs") if j["id"] == job]
    q.qmp.cmd("job-dismiss", id=job)
    return jobs[0] if jobs else {"error": "no such job"}


def unmerge_and_check_refs(q, name):
    """unmerge=on: pool-refs to 0; then the broker holds nothing for q."""
    q.qmp.cmd("qom-set", path="/objects/d0", property="unmerge", value=True)
    t.equal(info(q)["state"], "unmerging", f"{name}: unmerge=on, state unmerging")
    seen = []
    done = wait_for(f"{name}: unmerge", lambda: seen.append(info(q)["pool-refs"]) or
                    seen[-1] == 0, 120)
    t.check(done and info(q)["unmerged-pages"] > 0,
            f"{name}: pool-refs counted down to 0 ({seen[0]} -> {seen[-1]}, "
            f"{info(q)['unmerged-pages']} pages unmerged)", seen[-5:])
    c = client_of(q)
    t.check(c is not None and c["slots"] == 0,
            f"{name}: the broker holds no reference for it afterwards", c)


def discard_check(q, name, log_from):
    """Pages the balloon discarded (4 KiB trace lines) read zeros now."""
    offsets = [int(m, 16) for m in re.findall(
        r"memory_dedup_discard id=d0 block=pc\.ram offset=(0x[0-9a-f]+) len=0x1000 ret=0",
        q.output()[log_from:])]
    dump = os.path.join(tmp, f"{name}.ram")
    q.qmp.cmd("pmemsave", val=0, size=256 << 20, filename=dump)
    with open(dump, "rb") as f:
        ram = f.read()
    os.unlink(dump)
    nonzero = [hex(o) for o in offsets if ram[o:o + PAGE].count(0) != PAGE]
    t.check(offsets and not nonzero, f"{name}: all {len(offsets)} pages the balloon "
            "discarded read zeros", nonzero[:10])


broker = subprocess.Popen([BROKER, "--pool-max=256M", "--domain=coexist", f"--socket={bsock}",
                           f"--control={control}"],
                          stdout=open(os.path.join(tmp, "broker.log"), "w"),
                          stderr=subprocess.STDOUT)
vms = {}
try:
    wait_for("the broker", lambda: os.path.exists(control), 30)
    for name, seed in (("a", 1), ("b", 2)):
        vms[name] = QemuProcess(qemu, vm_args(name, seed)).__enter__()
    a, b = vms["a"], vms["b"]
    booted = wait_for("memcheck to fill memory", lambda: all(
        "MEMCHECK-ROUND n=1 " in console(n) for n in vms), 600)
    t.check(booted, "two guests booted; memcheck filled and verified their memory")
    if not booted:
        raise SystemExit
    wait_merged(a, "a")

    # Refused: background snapshots (their own uffd-wp on guest RAM).
    try:
        a.qmp.cmd("migrate-set-capabilities",
                  capabilities=[{"capability": "background-snapshot", "state": True}])
        err = "accepted"
    except QMPError as e:
        err = str(e)
    t.check("memory-dedup 'd0'" in err, "background-snapshot refused, naming memory-dedup",
            err)

    # Balloon: the guest frees memcheck's spare region (merged), then gives
    # memory to the host; free page reporting discards free memory too.
    wait_for("a: spare region freed", lambda: "MEMCHECK-FREED" in console("a"), 120)
    log_from = len(a.output())
    before = info(a)["discarded-pages"]
    a.qmp.cmd("balloon", value=160 << 20)
    inflated = wait_for("balloon inflation", lambda: a.qmp.cmd("query-balloon")["actual"]
                        <= 160 << 20, 120)
    t.check(inflated, f"a: balloon inflated to {a.qmp.cmd('query-balloon')['actual'] >> 20}"
            " MiB")
    a.qmp.cmd("stop")
    discard_check(a, "a", log_from)
    a.qmp.cmd("cont")
    got = info(a)["discarded-pages"] - before
    t.check(got > 0, f"a: {got} merged pages were discarded (discarded-pages)")
    passes_rounds("a", 2, "with the balloon inflated")
    a.qmp.cmd("balloon", value=256 << 20)
    wait_for("balloon deflation", lambda: a.qmp.cmd("query-balloon")["actual"] >= 250 << 20,
             120)
    passes_rounds("a", 2, "after the balloon deflated")

    # snapshot-save / snapshot-load into a qcow2 made over QMP.
    wait_merged(a, "a, before snapshot-save")
    img = os.path.join(tmp, "vmstate.qcow2")
    open(img, "w").close()
    a.qmp.cmd("blockdev-add", driver="file", filename=img, **{"node-name": "snapfile"})
    a.qmp.cmd("blockdev-create", **{"job-id": "mk"},
              options={"driver": "qcow2", "file": "snapfile", "size": 64 << 20})
    wait_job(a, "mk")
    a.qmp.cmd("blockdev-add", driver="qcow2", file="snapfile", **{"node-name": "snap"})
    a.qmp.cmd("snapshot-save", **{"job-id": "save", "tag": "s1", "vmstate": "snap",
                                  "devices": ["snap"]})
    job = wait_job(a, "save")
    t.check("error" not in job, "a: snapshot-save with merged memory", job)
    saved_at = len(console("a"))
    passes_rounds("a", 3, "after snapshot-save")
    cows = info(a)["cow-events"]
    a.qmp.cmd("snapshot-load", **{"job-id": "load", "tag": "s1", "vmstate": "snap",
                                  "devices": ["snap"]})
    job = wait_job(a, "load")
    t.check("error" not in job, "a: snapshot-load over merged memory", job)
    if a.qmp.cmd("query-status")["status"] != "running":
        a.qmp.cmd("cont")
    passes_rounds("a", 3, "after snapshot-load (back to the saved state)")
    # The loaded guest repeats round numbers from the save point.
    nums = [int(n) for n in re.findall(r"MEMCHECK-ROUND n=(\d+)", console("a")[saved_at:])]
    t.check(any(y <= x for x, y in zip(nums, nums[1:])),
            "a: memcheck's round count went back to the snapshot's", nums[:12])
    t.diag(f"a: COWs during snapshot-load and after: {info(a)['cow-events'] - cows}")
    wait_merged(a, "a, after snapshot-load")

    # Reset: the guest boots again from scratch and merges again.
    filled = console("a").count("MEMCHECK-FILLED")
    resets = info(a)["resets"]
    a.qmp.cmd("system_reset")
    again = wait_for("a: boot after reset", lambda: console("a").count("MEMCHECK-FILLED")
                     > filled, 300)
    t.check(again and info(a)["resets"] > resets, "a: system_reset; memcheck ran again "
            f"from boot (resets {resets} -> {info(a)['resets']})")
    passes_rounds("a", 2, "after the reset")
    wait_merged(a, "a, after the reset")

    # Precopy migration to a new QEMU; its memory-dedup waits, then merges.
    msock = os.path.join(tmp, "migrate.sock")
    a2 = vms["a2"] = QemuProcess(qemu, vm_args("a2", 1, ["-incoming", f"unix:{msock}"])) \
        .__enter__()
    t.equal(info(a2)["state"], "incoming", "a2: memory-dedup waits for the incoming migration")
    try:
        a2.qmp.cmd("migrate-set-capabilities",
                   capabilities=[{"capability": "postcopy-ram", "state": True}])
        err = "accepted"
    except QMPError as e:
        err = str(e)
    t.check("memory-dedup 'd0'" in err, "a2: postcopy refused on the destination, naming "
            "memory-dedup", err)
    merges_before = info(a)["merges"]
    a.qmp.cmd("migrate", uri=f"unix:{msock}")
    done = wait_for("migration", lambda: a.qmp.cmd("query-migrate")["status"]
                    in ("completed", "failed"), 300)
    mig = a.qmp.cmd("query-migrate")
    t.check(done and mig["status"] == "completed", "a -> a2: precopy migration completed "
            f"in {mig.get('total-time')} ms, {mig.get('ram', {}).get('transferred', 0) >> 20}"
            " MiB sent", mig)
    t.diag(f"a: merges during the migration: {info(a)['merges'] - merges_before}")
    wait_for("a2 to run", lambda: a2.qmp.cmd("query-status")["status"] == "running", 60)
    passes_rounds("a2", 3, "on the destination")
    wait_for("a2: memory-dedup running", lambda: info(a2)["state"] == "running", 30)
    t.equal(info(a2)["state"], "running", "a2: memory-dedup runs after the migration")
    a_pid = a.proc.pid
    a.__exit__(None, None, None)
    del vms["a"]
    gone = wait_for("the broker to drop a", lambda: not any(
        c["pid"] == a_pid and c["slots"] for c in broker_ctl(CTL, control, "clients")),
        30)
    t.check(gone, "the source QEMU quit: the broker holds nothing for it")
    wait_merged(a2, "a2")

    # unmerge=on with progress, object-del, object-add again.
    unmerge_and_check_refs(a2, "a2")
    a2.qmp.cmd("object-del", id="d0")
    passes_rounds("a2", 2, "after object-del")
    a2.qmp.cmd("object-add", **{"qom-type": "memory-dedup", "id": "d0", "broker": bsock,
                                "domain": "coexist", "pass-interval": 300})
    wait_merged(a2, "a2, memory-dedup added again")

    # object-del on b while merged: unmerged at once.
    wait_merged(b, "b")
    b.qmp.cmd("object-del", id="d0")
    c = client_of(b)
    t.check(c is None or c["slots"] == 0,
            "b: object-del while merged: the broker holds no reference for it", c)
    passes_rounds("b", 2, "after object-del")
    unmerge_and_check_refs(a2, "a2, at the end")
    passes_rounds("a2", 2, "at the end")
    for name, q in vms.items():
        _, bad = rounds(name)
        t.check(not bad, f"{name}: no memcheck round failed", bad[:5])
        t.check("refused UNREF" not in q.output(), f"{name}: no reference released twice")
finally:
    for name, q in vms.items():
        if q.proc.poll() is not None:
            t.check(False, f"{name}: QEMU is still running (exit {q.proc.returncode})",
                    q.output()[-3000:] + "\nconsole:\n" + console(name)[-3000:])
        q.__exit__(None, None, None)
    finish(t, broker, tmp)

t.done()

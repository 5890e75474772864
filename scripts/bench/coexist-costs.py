#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""What QEMU's operations on guest RAM cost with memory-dedup on and off.

Two TCG guests (default 2 x 512 MiB) run memcheck (--shared-mib identical
in both, plus unique and zeroed data) with one broker.  Once with
memory-dedup on both guests (after merging settled), once without, it
measures on the first guest:

  migrate     precopy to a new QEMU on a unix socket: total time, downtime,
              MiB sent
  save/load   snapshot-save and snapshot-load into a qcow2 made over QMP
  remerge     (on) pages merged on the destination 60 s after the migration
  unmerge     (on) unmerge=on until pool-refs is 0, and the object-del that
              follows; then object-add, 60 s of merging, and an object-del
              with everything still merged (the synchronous unmerge)

Writes OUT/summary.json and OUT/summary.md (default build/bench/coexist-costs).

Usage: coexist-costs.py [--mem 512] [--shared-mib 192] [--out DIR]
From the build tree after 'make all guest'."""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.join(here, "..", "..")
sys.path.insert(0, os.path.join(root, "tests", "lib"))
from host import start_broker, tcg_guest_args  # noqa: E402
from qmp import QemuProcess  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--mem", type=int, default=512)
ap.add_argument("--shared-mib", type=int, default=192)
ap.add_argument("--out", default=os.path.join(root, "build", "bench", "coexist-costs"))
args = ap.parse_args()
QEMU = os.path.join(root, "build", "qemu-build", "qemu-system-x86_64")
BROKER = os.path.join(root, "build", "own", "broker", "qemu-dedup-broker")
GUEST = os.path.join(root, "build", "guest")
tmp = tempfile.mkdtemp(prefix="qdedup-coexist-costs-")


def wait_for(cond, timeout, step=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return False


def guest(name, seed, dedup, bsock, extra=()):
    argv = tcg_guest_args(GUEST, name, os.path.join(tmp, name + ".console"), args.mem, {
        "workload": "memcheck", "shared": args.shared_mib, "unique": 32, "zero": 64,
        "seed": seed, "rounds": 0, "interval": 2, "rewrite": 1}) + list(extra)
    if dedup:
        argv += ["-object", f"memory-dedup,id=d0,broker={bsock},domain=costs"]
    return QemuProcess(QEMU, argv).__enter__()


def console(name):
    with open(os.path.join(tmp, name + ".console"), errors="replace") as f:
        return f.read()


def job(q, name, **kw):
    t0 = time.monotonic()
    q.qmp.cmd(name, **kw)
    jid = kw["job-id"]
    wait_for(lambda: any(j["id"] == jid and j["status"] == "concluded"
                         for j in q.qmp.cmd("query-jobs")), 600, 0.05)
    elapsed = time.monotonic() - t0
    err = [j.get("error") for j in q.qmp.cmd("query-jobs") if j["id"] == jid]
    q.qmp.cmd("job-dismiss", id=jid)
    if err and err[0]:
        raise RuntimeError(f"{name}: {err[0]}")
    return elapsed


def run(dedup):
    res = {}
    broker, bsock, _ = start_broker(BROKER, tmp, "--pool-max=1G", "--domain=costs")
    vms = []
    try:
        a = guest("a", 1, dedup, bsock)
        vms.append(a)
        vms.append(guest("b", 2, dedup, bsock))
        wait_for(lambda: all("MEMCHECK-ROUND n=1 " in console(n) for n in ("a", "b")), 900, 1)
        if dedup:
            # Settled: merged-pages stops growing.
            last = [-1]

            def settled():
                m = a.qmp.cmd("query-memory-dedup")[0]["merged-pages"]
                done, last[0] = m == last[0], m
                return done
            wait_for(settled, 300, 5)
            info = a.qmp.cmd("query-memory-dedup")[0]
            res["merged-pages"], res["zero-pages"] = info["merged-pages"], info["zero-pages"]
        else:
            time.sleep(20)
        # snapshot-save / snapshot-load
        img = os.path.join(tmp, f"vmstate-{dedup}.qcow2")
        open(img, "w").close()
        a.qmp.cmd("blockdev-add", driver="file", filename=img, **{"node-name": "f"})
        job(a, "blockdev-create", **{"job-id": "mk"},
            options={"driver": "qcow2", "file": "f", "size": (args.mem + 64) << 20})
        a.qmp.cmd("blockdev-add", driver="qcow2", file="f", **{"node-name": "snap"})
        res["snapshot-save-s"] = job(a, "snapshot-save", **{"job-id": "s", "tag": "t",
                                                            "vmstate": "snap",
                                                            "devices": ["snap"]})
        res["snapshot-load-s"] = job(a, "snapshot-load", **{"job-id": "l", "tag": "t",
                                                            "vmstate": "snap",
                                                            "devices": ["snap"]})
        if a.qmp.cmd("query-status")["status"] != "running":
            a.qmp.cmd("cont")
        if dedup:
            time.sleep(30)      # merge again after the load
        # precopy migration
        msock = os.path.join(tmp, f"m-{dedup}.sock")
        a2 = guest("a2", 1, dedup, bsock, ["-incoming", f"unix:{msock}"])
        vms.append(a2)
        a.qmp.cmd("migrate", uri=f"unix:{msock}")
        wait_for(lambda: a.qmp.cmd("query-migrate")["status"] in ("completed", "failed"),
                 600, 0.1)
        mig = a.qmp.cmd("query-migrate")
        res["migrate-status"] = mig["status"]
        res["migrate-total-ms"] = mig.get("total-time")
        res["migrate-downtime-ms"] = mig.get("downtime")
        res["migrate-sent-mib"] = round(mig["ram"]["transferred"] / 2**20, 1)
        res["migrate-zero-pages"] = mig["ram"].get("duplicate")
        if dedup:
            time.sleep(60)
            info = a2.qmp.cmd("query-memory-dedup")[0]
            res["dest-merged-60s"], res["dest-state-60s"] = info["merged-pages"], info["state"]
            refs = a2.qmp.cmd("query-memory-dedup")[0]["pool-refs"]
            t0 = time.monotonic()
            a2.qmp.cmd("qom-set", path="/objects/d0", property="unmerge", value=True)
            wait_for(lambda: a2.qmp.cmd("query-memory-dedup")[0]["pool-refs"] == 0, 600, 0.05)
            res["unmerge-pages"] = refs
            res["unmerge-s"] = round(time.monotonic() - t0, 2)
            t0 = time.monotonic()
            a2.qmp.cmd("object-del", id="d0")
            res["object-del-after-unmerge-s"] = round(time.monotonic() - t0, 3)
            a2.qmp.cmd("object-add", **{"qom-type": "memory-dedup", "id": "d0",
                                        "broker": bsock, "domain": "costs"})
            time.sleep(60)
            refs = a2.qmp.cmd("query-memory-dedup")[0]["pool-refs"]
            t0 = time.monotonic()
            a2.qmp.cmd("object-del", id="d0")
            res["object-del-merged-pages"] = refs
            res["object-del-merged-s"] = round(time.monotonic() - t0, 3)
        for k in ("snapshot-save-s", "snapshot-load-s"):
            res[k] = round(res[k], 2)
    finally:
        for q in vms:
            q.__exit__(None, None, None)
        broker.terminate()
        broker.wait(timeout=10)
    return res


os.makedirs(args.out, exist_ok=True)
out = {"mem-mib": args.mem, "shared-mib": args.shared_mib,
       "off": run(False), "on": run(True)}
shutil.rmtree(tmp, ignore_errors=True)
with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump(out, f, indent=1)
rows = [("precopy migration, total", "migrate-total-ms", "ms"),
        ("precopy migration, downtime", "migrate-downtime-ms", "ms"),
        ("precopy migration, sent", "migrate-sent-mib", "MiB"),
        ("precopy migration, zero pages", "migrate-zero-pages", "pages"),
        ("snapshot-save", "snapshot-save-s", "s"),
        ("snapshot-load", "snapshot-load-s", "s")]
lines = [f"# Costs of QEMU operations with memory-dedup on and off",
         "", f"2 TCG guests x {args.mem} MiB, memcheck with {args.shared_mib} MiB identical "
         "data; measured on the first guest. Command: `python3 scripts/bench/coexist-costs.py "
         f"--mem {args.mem} --shared-mib {args.shared_mib}`", "",
         "| operation | off | on |", "|---|---|---|"]
for label, key, unit in rows:
    lines.append(f"| {label} ({unit}) | {out['off'].get(key)} | {out['on'].get(key)} |")
on = out["on"]
lines += ["", f"With dedup: {on.get('merged-pages')} pages merged and {on.get('zero-pages')} "
          f"zero pages before the operations; 60 s after the migration the destination "
          f"had {on.get('dest-merged-60s')} pages merged (state "
          f"{on.get('dest-state-60s')}); unmerge=on gave back {on.get('unmerge-pages')} "
          f"references in {on.get('unmerge-s')} s, and the object-del after it took "
          f"{on.get('object-del-after-unmerge-s')} s; object-del with "
          f"{on.get('object-del-merged-pages')} references still held took "
          f"{on.get('object-del-merged-s')} s."]
with open(os.path.join(args.out, "summary.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))

#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""make demo: a broker and four TCG guests from the test image with
memory-dedup, a workload mix, and the live dashboard (qemu-dedup-ctl top)
until Ctrl-C.  On exit everything it started is stopped, and a plot of the
savings over time is left in OUT/savings.png (with the samples in
OUT/samples.csv).

The guests (two trust domains, so that isolation shows):

  vm1-identical  tenant-a  memcheck: data identical in vm1, vm2 and vm3
  vm2-churn      tenant-a  the same data, 5% of it rewritten every second
  vm3-identical  tenant-b  the same data as vm1, but another tenant: it
                           shares only with vm4, which does not have it
  vm4-idle       tenant-b  booted, then idle (free memory is zero pages)

Children die with it (PR_SET_PDEATHSIG), so nothing outlives it even when
it is killed.  --smoke: two small guests, a few samples, no terminal needed;
exits non-zero unless the outputs exist, parse, and show a saving.

Usage: demo.py [--mem MIB] [--out DIR] [--smoke]"""

import argparse
import csv
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.normpath(os.path.join(here, "..", ".."))
QEMU = os.path.join(root, "build", "qemu-build", "qemu-system-x86_64")
BROKER = os.path.join(root, "build", "own", "broker", "qemu-dedup-broker")
CTL = os.path.join(root, "build", "own", "tools", "qemu-dedup-ctl")
GUEST = os.path.join(root, "build", "guest")
sys.path.insert(0, os.path.join(root, "tests", "lib"))
from host import tcg_guest_args  # noqa: E402
from plot import line_plot  # noqa: E402

GUESTS = [  # name, trust domain, workload parameters
    ("vm1-identical", "tenant-a", {"workload": "memcheck", "shared": 128, "unique": 8,
                                   "zero": 32, "seed": 1, "rounds": 0, "interval": 5,
                                   "rewrite": 0}),
    ("vm2-churn", "tenant-a", {"workload": "memcheck", "shared": 128, "unique": 8,
                               "zero": 0, "seed": 2, "rounds": 0, "interval": 1,
                               "rewrite": 5}),
    ("vm3-identical", "tenant-b", {"workload": "memcheck", "shared": 128, "unique": 8,
                                   "zero": 32, "seed": 3, "rounds": 0, "interval": 5,
                                   "rewrite": 0}),
    ("vm4-idle", "tenant-b", {"workload": "idle"}),
]


def die_with_parent():
    """In the child: SIGTERM when the demo goes, however it goes."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG


def plot(samples, png):
    """Saved MiB over time per VM and in total."""
    series = {}
    with open(samples) as f:
        for r in csv.DictReader(f):
            if r["vm"] != "broker":
                series.setdefault(r["vm"], []).append((float(r["t"]),
                                                       int(r["saved_bytes"]) / 2**20))
    totals = {}
    for points in series.values():
        for t, mib in points:
            totals[t] = totals.get(t, 0) + mib
    series["total"] = sorted(totals.items())
    return line_plot(png, "qdedup: guest memory saved", "seconds", "MiB saved", series)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mem", type=int, default=512)
    ap.add_argument("--out", default=os.path.join(root, "build", "demo"))
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    guests = GUESTS
    if args.smoke:
        args.mem = 256
        guests = [(n, "tenant-a", dict(p, shared=32, zero=8, interval=1))
                  for n, _, p in GUESTS[:1]] + [("vm2-identical", "tenant-a",
                                                 dict(GUESTS[0][2], shared=32, zero=8,
                                                      seed=2, interval=1))]
    os.makedirs(args.out, exist_ok=True)
    samples = os.path.join(args.out, "samples.csv")
    png = os.path.join(args.out, "savings.png")
    for f in (samples, png):
        if os.path.exists(f):
            os.unlink(f)
    tmp = tempfile.mkdtemp(prefix="qdedup-demo-")
    procs = []

    def start(argv, log):
        p = subprocess.Popen(argv, stdout=open(os.path.join(tmp, log), "w"),
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             preexec_fn=die_with_parent)
        procs.append(p)
        return p

    bsock, control = os.path.join(tmp, "broker.sock"), os.path.join(tmp, "control.sock")
    try:
        start([BROKER, f"--socket={bsock}", f"--control={control}", "--pool-max=2G",
               *sorted({f"--domain={domain}" for _, domain, _ in guests})],
              "broker.log")
        qmps = []
        for name, domain, params in guests:
            qmp = os.path.join(tmp, name + ".qmp")
            qmps.append(qmp)
            start([QEMU] + tcg_guest_args(GUEST, name, os.path.join(tmp, name + ".console"),
                                          args.mem, params) +
                  ["-qmp", f"unix:{qmp},server=on,wait=off",
                   "-object", f"memory-dedup,id=d0,broker={bsock},domain={domain}"],
                  name + ".log")
        print(f"qdedup demo: {len(guests)} TCG guests of {args.mem} MiB booting "
              f"(logs in {tmp}); the dashboard follows", flush=True)
        top = [CTL, "top", f"--control={control}", f"--csv={samples}"] + \
            [f"--qmp={q}" for q in qmps]
        if args.smoke:
            # Boot, fill, merge: then a few samples, no terminal.
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and not all(
                    "MEMCHECK-ROUND" in open(os.path.join(tmp, n + ".console"),
                                             errors="replace").read()
                    for n, _, _ in guests if os.path.exists(os.path.join(tmp, n + ".console"))):
                time.sleep(1)
            time.sleep(10)
            subprocess.run(top + ["-n", "5", "-i", "1000"], stdout=subprocess.DEVNULL,
                           timeout=120)
        else:
            try:
                subprocess.run(top)
            except KeyboardInterrupt:
                pass
    except KeyboardInterrupt:
        pass
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    plotted = os.path.exists(samples) and plot(samples, png)
    print(f"qdedup demo: stopped everything; samples in {samples}"
          + (f", plot in {png}" if plotted else " (no plot: no samples)"))
    if args.smoke:
        with open(samples) as f:
            rows = [r for r in csv.DictReader(f) if r["vm"] != "broker"]
        saved = max((int(r["saved_bytes"]) for r in rows), default=0)
        ok = plotted and rows and saved > 0
        print(f"smoke: {len(rows)} samples, best saving {saved >> 20} MiB: "
              + ("ok" if ok else "FAILED"))
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""In-guest disk read throughput with memory-dedup off and on.

One TCG guest at a time (256 MiB, init_on_alloc=1, like tests/qemu/
dma-tcg.py) with a read-only virtio-blk disk on cache=none, so the host
reads the image with O_DIRECT straight into guest pages.  The image lives
under /var/tmp (tmpfs has no O_DIRECT) and holds a seeded pseudo-random
pattern.  The guest runs the diskread workload (scripts/guest/workloads/
diskread.sh): drop the page cache, sha256sum all of /dev/vda, print
DISKREAD-ROUND, round after round (qdedup.rounds=N).

For every aio mode (io_uring, native, threads) it boots one guest per
dedup setting:

  off       no memory-dedup object
  eager     -object memory-dedup,...,pass-interval=0,cpu-limit=100
  defaults  -object memory-dedup,... with its defaults

The guest only prints whole seconds, so the host times the rounds itself:
it polls the console file every 20 ms and notes the monotonic time at
which each DISKREAD-ROUND line is complete.  A round's time is the gap to
the previous round's line, so the first round (timed from QDEDUP-READY,
and a warm-up anyway) is dropped.  What is timed is the whole round as the
guest does it: sync, drop_caches, reading and hashing the disk under TCG,
so the figure is a throughput of the guest's read-and-sha256 loop, not of
the host's disk.  Every round's sum (the first one too) is compared with
the image's sha256.

Prints a markdown table (mode, dedup, rounds, median/min/max MiB/s), the
checksum check and the engine's counters (query-memory-dedup).
Not a test: it asserts nothing.

Usage: diskread-bench.py [--rounds 8] [--mib 64] [--modes io_uring,native,threads]
From the build tree after 'make all guest'."""

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.join(here, "..", "..")
sys.path.insert(0, os.path.join(root, "tests", "lib"))
from diskimage import MIB, aio_in_build, drive, make_image, o_direct_works  # noqa: E402
from host import start_broker, tcg_guest_args  # noqa: E402
from qmp import QemuProcess  # noqa: E402

MODES = ["io_uring", "native", "threads"]
POLL = 0.02
TROUBLE = ("Kernel panic", "BUG:", "I/O error", "DISKREAD-ERROR",
           "QDEDUP-ERROR", "QDEDUP-WARNING")

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--rounds", type=int, default=8, help="rounds per guest (the first is dropped)")
ap.add_argument("--mib", type=int, default=64, help="size of the disk image")
ap.add_argument("--modes", default=",".join(MODES), help="aio modes, comma-separated")
ap.add_argument("--boot-timeout", type=int, default=180, help="seconds for a guest to boot")
ap.add_argument("--timeout", type=int, default=300,
                help="seconds for a guest's rounds, once it booted")
args = ap.parse_args()
modes = [m for m in args.modes.split(",") if m]
if any(m not in MODES for m in modes) or args.rounds < 2 or args.mib < 1:
    ap.error(f"--modes from {','.join(MODES)}, --rounds >= 2, --mib >= 1")

QEMU = os.path.join(root, "build", "qemu-build", "qemu-system-x86_64")
BROKER = os.path.join(root, "build", "own", "broker", "qemu-dedup-broker")
GUEST = os.path.join(root, "build", "guest")
# On the real disk: cache=none opens the image with O_DIRECT.
tmp = tempfile.mkdtemp(prefix="qdedup-diskread-bench-", dir="/var/tmp")
image = os.path.join(tmp, "disk.img")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


class Console:
    """Reads a console file as it grows; notes when each line is complete."""

    def __init__(self, path):
        self.path = path
        self.pos = 0
        self.partial = ""
        self.lines = []         # (monotonic time, line)

    def poll(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return
        now = time.monotonic()
        self.pos += len(data)
        text = self.partial + data.decode(errors="replace")
        *done, self.partial = text.split("\n")
        self.lines += [(now, line.rstrip("\r")) for line in done]

    def find(self, what):
        return [(t, line) for t, line in self.lines if what in line]

    def tail(self, n=1500):
        return "\n".join(line for _, line in self.lines)[-n:] + self.partial


def settings(bsock):
    return [("off", None),
            ("eager", f"memory-dedup,id=md0,broker={bsock},pass-interval=0,cpu-limit=100"),
            ("defaults", f"memory-dedup,id=md0,broker={bsock}")]


def run(mode, name, obj):
    """One guest; returns a dict of what it did."""
    path = os.path.join(tmp, f"{mode}-{name}.console")
    argv = tcg_guest_args(GUEST, f"{mode}-{name}", path, 256, {
        "workload": "diskread", "rounds": args.rounds})
    # As in dma-tcg.py: pages come zeroed from the allocator, so a page
    # being read into is a zero page to the engine until the data lands.
    argv[argv.index("-append") + 1] += " init_on_alloc=1"
    argv += ["-no-reboot", *drive(image, mode), "-device", "virtio-blk-pci,drive=d0"]
    if obj:
        argv += ["-object", obj]
    con = Console(path)
    res = {"mode": mode, "dedup": name, "error": None, "times": [], "sums": [],
           "guest_seconds": [], "trouble": [], "stats": None}
    t0 = time.monotonic()
    try:
        q = QemuProcess(QEMU, argv).__enter__()
    except RuntimeError as e:
        res["error"] = f"QEMU did not start: {str(e)[-1500:]}"
        return res
    try:
        def wait(cond, timeout):
            deadline = time.monotonic() + timeout
            while True:
                con.poll()
                if cond() or con.find("Kernel panic") or q.proc.poll() is not None:
                    return cond()
                if time.monotonic() > deadline:
                    return False
                time.sleep(POLL)

        if not wait(lambda: con.find("QDEDUP-READY workload=diskread") or
                    con.find("DISKREAD-ERROR"), args.boot_timeout):
            res["error"] = "did not boot: " + con.tail()
            return res
        ready_t, ready = con.find("QDEDUP-READY workload=diskread")[0] \
            if con.find("QDEDUP-READY workload=diskread") else (None, "")
        size = re.search(r"size=(\d+)", ready)
        if not size or int(size.group(1)) != args.mib * MIB:
            res["error"] = f"no {args.mib} MiB /dev/vda: " + con.tail()
            return res
        res["boot_s"] = ready_t - t0
        wait(lambda: len(con.find("DISKREAD-ROUND")) >= args.rounds or
             con.find("DISKREAD-DONE"), args.timeout)
        last = ready_t
        for t, line in con.find("DISKREAD-ROUND"):
            m = re.search(r"n=(\d+) sum=([0-9a-f]+) seconds=(\d+)", line)
            if not m:
                continue
            res["times"].append(t - last)
            res["sums"].append(m.group(2))
            res["guest_seconds"].append(int(m.group(3)))
            last = t
        res["trouble"] = [line for _, line in con.lines if any(w in line for w in TROUBLE)]
        if len(res["times"]) < args.rounds:
            res["error"] = (f"{len(res['times'])} of {args.rounds} rounds"
                            + (f" (QEMU exited {q.proc.returncode})"
                               if q.proc.poll() is not None else ""))
        if obj and q.proc.poll() is None:
            res["stats"] = q.qmp.cmd("query-memory-dedup")[0]
        return res
    finally:
        if q.proc.poll() is not None and not res["error"]:
            res["error"] = f"QEMU exited ({q.proc.returncode}): {q.output()[-1500:]}"
        q.__exit__(None, None, None)
        res["wall_s"] = time.monotonic() - t0


def main():
    start = time.monotonic()
    want, _ = make_image(image, args.mib)
    log(f"disk image {image}: {args.mib} MiB, sha256 {want}")
    if not o_direct_works(image):
        sys.exit(f"{tmp} cannot be read with O_DIRECT (cache=none)")
    broker, bsock, control = start_broker(BROKER, tmp, "--pool-max=256M")
    results = []
    try:
        if not os.path.exists(control):
            sys.exit("the broker did not start: " + open(os.path.join(tmp, "broker.log")).read())
        for mode in modes:
            if not aio_in_build(QEMU, image, mode):
                log(f"aio={mode}: not in this QEMU build, skipped")
                results.append({"mode": mode, "dedup": "-", "error": "not in this build",
                                "times": [], "sums": [], "trouble": [], "stats": None})
                continue
            for name, obj in settings(bsock):
                r = run(mode, name, obj)
                results.append(r)
                mibs = [args.mib / t for t in r["times"][1:]]
                log(f"aio={mode} dedup={name}: boot {r.get('boot_s', 0):.1f} s, "
                    f"wall {r.get('wall_s', 0):.1f} s, rounds s "
                    f"{' '.join(f'{t:.2f}' for t in r['times'])}"
                    + (f", median {statistics.median(mibs):.2f} MiB/s" if mibs else "")
                    + (f", ERROR {r['error']}" if r["error"] else ""))
    finally:
        broker.terminate()
        broker.wait(timeout=10)
        os.unlink(image)
    report(results, want, time.monotonic() - start)


def report(results, want, wall):
    print(f"## diskread: {args.mib} MiB image, {args.rounds} rounds per guest "
          f"(first dropped), TCG, 256 MiB guest\n")
    print("| aio mode | dedup | rounds | median MiB/s | min MiB/s | max MiB/s |")
    print("|---|---|---:|---:|---:|---:|")
    bad_any = False
    for r in results:
        mibs = [args.mib / t for t in r["times"][1:]]
        if mibs:
            print(f"| {r['mode']} | {r['dedup']} | {len(mibs)} | "
                  f"{statistics.median(mibs):.2f} | {min(mibs):.2f} | {max(mibs):.2f} |")
        else:
            print(f"| {r['mode']} | {r['dedup']} | 0 | - | - | - |")
    print("\n### checksums (every round, the first one too)\n")
    for r in results:
        bad = [i + 1 for i, s in enumerate(r["sums"]) if s != want]
        bad_any |= bool(bad or r["error"] or r["trouble"])
        line = (f"- {r['mode']}/{r['dedup']}: {len(r['sums']) - len(bad)} of "
                f"{len(r['sums'])} rounds match")
        if bad:
            line += f"; MISMATCH in rounds {bad}: " + ", ".join(
                r["sums"][n - 1][:16] for n in bad)
        if r["error"]:
            line += f"; ERROR {r['error'][:300]}"
        if r["trouble"]:
            line += f"; console trouble: {r['trouble'][:5]}"
        print(line)
    print("\n### engine (query-memory-dedup at the end)\n")
    print("| aio mode | dedup | zero-pages | merges | dma-skipped | passes | cpu-ms | state |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for r in results:
        i = r.get("stats")
        if i:
            print(f"| {r['mode']} | {r['dedup']} | {i['zero-pages']} | {i['merges']} | "
                  f"{i['dma-skipped']} | {i['passes']} | {i['cpu-ms']} | {i['state']} |")
    print("\n### per-round host seconds (first round from QDEDUP-READY) "
          "and the guest's whole seconds\n")
    for r in results:
        if r["times"]:
            print(f"- {r['mode']}/{r['dedup']}: host "
                  f"{' '.join(f'{t:.2f}' for t in r['times'])}; guest "
                  f"{' '.join(str(s) for s in r['guest_seconds'])}")
    print(f"\nimage sha256 {want}; total wall time {wall:.0f} s")
    if bad_any:
        print(f"\nlogs kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


main()

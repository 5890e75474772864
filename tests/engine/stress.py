#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Engine stress test: a real qemu-dedup-broker and two engine-stress
processes in one trust domain (so pages merge across processes), each with
vCPU threads checking every read against a shadow copy while the engine
merges, drops zero pages and sees copy-on-write, and a device thread each
reading a file into its RAM with O_DIRECT (DMA into pinned pages, announced
as QEMU announces it).  Then the broker's view:
both clients gone, every reference released.

Usage: stress.py BUILD_DIR TOTAL_OPS [PAGES]
TOTAL_OPS is split between the two processes (10^8 in make check; see
docs/memory-dedup.md for the 10^9 run)."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from tap import Tap  # noqa: E402

build = sys.argv[1]
total_ops = int(float(sys.argv[2]))
pages = sys.argv[3] if len(sys.argv) > 3 else "8192"
BROKER = os.path.join(build, "broker", "qemu-dedup-broker")
CTL = os.path.join(build, "tools", "qemu-dedup-ctl")
STRESS = os.path.join(build, "tests", "engine-stress")

t = Tap()
tmp = tempfile.mkdtemp(prefix="qdedup-engine-stress-")
sock = os.path.join(tmp, "broker.sock")
control = os.path.join(tmp, "control.sock")
log = open(os.path.join(tmp, "broker.log"), "w")
broker = subprocess.Popen([BROKER, "--pool-max=256M", "--domain=stress", f"--socket={sock}",
                           f"--control={control}"], stdout=log, stderr=subprocess.STDOUT)


def ctl(what):
    out = subprocess.run([CTL, f"--control={control}", "--json", what],
                         capture_output=True, text=True, timeout=10)
    return json.loads(out.stdout) if out.returncode == 0 else None


try:
    deadline = time.monotonic() + 10
    while not os.path.exists(control) and time.monotonic() < deadline:
        time.sleep(0.05)
    t.check(os.path.exists(control), "broker started")
    # Each process's device reads its own file by O_DIRECT: on the disk, not tmpfs.
    dma_dir = tempfile.mkdtemp(prefix="qdedup-engine-dma-", dir="/var/tmp")
    procs = [subprocess.Popen([STRESS, sock, str(total_ops // 2), pages, str(seed),
                               os.path.join(dma_dir, f"disk{seed}")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for seed in (1, 2)]
    outputs = [p.communicate(timeout=3000)[0] for p in procs]
    for name, p, out in zip(("vm-a", "vm-b"), procs, outputs):
        results = [line for line in out.splitlines() if line.startswith(("ok ", "not ok "))]
        for line in out.splitlines():
            if line.startswith("#"):
                t.diag(f"{name}: {line[1:].strip()}")
        for line in results:
            good = line.startswith("ok ")
            t.check(good, f"{name}: {line.split(' - ', 1)[-1]}")
        t.check(p.returncode == 0 and len(results) == 11,
                f"{name}: exited 0 after all 11 checks", out[-2000:])
    shutil.rmtree(dma_dir, ignore_errors=True)
    # The processes have exited: the broker must hold nothing for them (I2).
    time.sleep(0.5)
    st = ctl("stats")
    t.check(st is not None and st["clients"] == 0 and st["pages-shared"] == 0,
            "after both exit, the broker holds no reference", st)
    t.check(st is not None and st["stored"] > 0 and st["hits"] > 0,
            "the broker stored pages and both processes found them", st)
finally:
    broker.terminate()
    broker.wait(timeout=10)
    log.close()

t.done()

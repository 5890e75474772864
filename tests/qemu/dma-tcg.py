#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""memory-dedup never loses device DMA (ARCHITECTURE I8).

Three Linux guests on TCG, one per aio mode of the disk backend (io_uring,
native, threads), each with a read-only virtio-blk disk on cache=none, so
the host kernel reads the image file with O_DIRECT straight into pinned
guest pages.  The image lives on the real disk under /var/tmp (tmpfs has no
O_DIRECT) and holds a known pseudo-random pattern.  The guests boot with
init_on_alloc=1 and run the diskread workload (scripts/guest/workloads/
diskread.sh): drop the page cache, read all of /dev/vda through it and
print its sha256, round after round.  So the pages the disk writes are zero
until the data lands, which is just what the engine (pass-interval=0,
cpu-limit=100) looks for to drop.  Every round of every guest must give the
image's sha256, the engine must have been active (zero pages or merges),
and query-memory-dedup reports how many pages it left alone (dma-skipped).

--ignore-dma adds x-ignore-dma=on to the objects, which switches the
check off: then rounds with a wrong sum are expected (the test should
fail), which shows that the test can see lost DMA.  Not used by make check.

Usage: dma-tcg.py [--ignore-dma] [--rounds N] [--mib M] [--timeout S]
                  QEMU_BUILD_DIR OWN_BUILD_DIR GUEST_DIR"""

import argparse
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from diskimage import MIB, aio_in_build, drive, make_image, o_direct_works  # noqa: E402
from host import finish, start_broker, tcg_guest_args  # noqa: E402
from qmp import QemuProcess  # noqa: E402
from tap import Tap  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--ignore-dma", action="store_true",
                help="x-ignore-dma=on: expect lost DMA (for trying the test)")
ap.add_argument("--rounds", type=int, default=6, help="rounds each guest must pass")
ap.add_argument("--mib", type=int, default=48, help="size of the disk image")
ap.add_argument("--timeout", type=int, default=150,
                help="seconds for the rounds, once the guests booted")
ap.add_argument("qemu_build")
ap.add_argument("own_build")
ap.add_argument("guest_dir")
opt = ap.parse_args()

qemu = os.path.join(opt.qemu_build, "qemu-system-x86_64")
BROKER = os.path.join(opt.own_build, "broker", "qemu-dedup-broker")
MODES = ["io_uring", "native", "threads"]
t = Tap()
# On the real disk: cache=none opens the image with O_DIRECT.
tmp = tempfile.mkdtemp(prefix="qdedup-dma-", dir="/var/tmp")
image = os.path.join(tmp, "disk.img")
vms = []
modes = list(MODES)      # those this QEMU was built with


def console(vm):
    try:
        with open(os.path.join(tmp, f"vm{vm}.log"), errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def rounds(vm):
    """[(n, sum)] of the rounds VM printed so far."""
    return [(int(n), s) for n, s in
            re.findall(r"DISKREAD-ROUND n=(\d+) sum=([0-9a-f]+)", console(vm))]


def bad_mibs(vm, n):
    """The MiBs whose sum in VM's page cache after bad round N differs."""
    got = re.findall(rf"DISKREAD-MIB n={n} mib=(\d+) sum=([0-9a-f]+)", console(vm))
    return [int(m) for m, s in got if int(m) >= len(per_mib) or s != per_mib[int(m)]]


def trouble(vm):
    """Console lines that say the guest or its disk went wrong."""
    return [line for line in console(vm).splitlines()
            if any(w in line for w in ("Kernel panic", "BUG:", "I/O error", "DISKREAD-ERROR",
                                       "QDEDUP-ERROR", "QDEDUP-WARNING"))]


def guest_args(vm, mode):
    args = tcg_guest_args(opt.guest_dir, f"vm{vm}", os.path.join(tmp, f"vm{vm}.log"), 256, {
        "workload": "diskread", "rounds": 0, "expect": want})
    # Pages come zeroed from the allocator, so a page being read into is a
    # zero page to the engine until the disk's data lands.
    args[args.index("-append") + 1] += " init_on_alloc=1"
    obj = f"memory-dedup,id=md0,broker={bsock},domain=dma,pass-interval=0,cpu-limit=100"
    if opt.ignore_dma:
        obj += ",x-ignore-dma=on"
    return args + [
        "-no-reboot",
        *drive(image, mode),
        "-device", "virtio-blk-pci,drive=d0",
        "-object", obj]


def boot():
    """Start the guests; True once each sees its whole disk."""
    for mode in MODES:
        if not aio_in_build(qemu, image, mode):
            # configure enables all three (native needs libaio): a failure, not a skip.
            t.check(False, f"aio={mode} is in this QEMU build (configure --enable-linux-aio)")
            modes.remove(mode)
    for vm, mode in enumerate(modes):
        try:
            vms.append(QemuProcess(qemu, guest_args(vm, mode)).__enter__())
        except RuntimeError as e:
            t.check(False, f"vm{vm} (aio={mode}): QEMU started", str(e)[-3000:])
            return False
    t.wait("the guests to see their disks",
           lambda: all("QDEDUP-READY workload=diskread" in console(vm) or trouble(vm) or
                       q.proc.poll() is not None for vm, q in enumerate(vms)), 300, 0.5)
    ok = True
    for vm, mode in enumerate(modes):
        size = re.search(r"QDEDUP-READY workload=diskread size=(\d+)", console(vm))
        ok &= bool(t.check(size and int(size.group(1)) == opt.mib * MIB,
                           f"vm{vm} (aio={mode}): booted and sees a {opt.mib} MiB /dev/vda",
                           console(vm)[-1500:]))
    return ok


def check_rounds():
    def done(vm):
        return len(rounds(vm)) >= opt.rounds or trouble(vm) or vms[vm].proc.poll() is not None
    t.wait(f"{opt.rounds} rounds in every guest",
           lambda: all(done(vm) for vm in range(len(vms))), opt.timeout, 0.5)

    def dumped(vm):
        return all(re.search(rf"DISKREAD-MIB-END n={n}\b", console(vm))
                   for n, s in rounds(vm) if s != want)
    if not all(dumped(vm) for vm in range(len(vms))):
        t.wait("the guests' per-MiB sums of their bad rounds",
               lambda: all(dumped(vm) or vms[vm].proc.poll() is not None
                           for vm in range(len(vms))), 60, 0.5)
    for vm, mode in enumerate(modes):
        got = rounds(vm)
        bad = [f"round {n}: sha256 {s}, MiBs that differ in the page cache: {bad_mibs(vm, n)}"
               for n, s in got if s != want]
        t.check(len(got) >= opt.rounds, f"vm{vm} (aio={mode}): {len(got)} rounds read the disk "
                f"(>= {opt.rounds})", console(vm)[-1500:])
        t.check(got and not bad, f"vm{vm} (aio={mode}): every round's sha256 is the image's "
                f"({len(got) - len(bad)} of {len(got)} right)", "\n".join(bad))
        t.check(not trouble(vm), f"vm{vm} (aio={mode}): no I/O error or kernel trouble",
                trouble(vm)[:10])
        if vms[vm].proc.poll() is None:
            i = vms[vm].qmp.cmd("query-memory-dedup")[0]
            t.diag(f"vm{vm} (aio={mode}): dma-skipped {i['dma-skipped']}, zero-pages "
                   f"{i['zero-pages']}, merges {i['merges']}, merged-pages {i['merged-pages']}, "
                   f"passes {i['passes']}, scanned-pages {i['scanned-pages']}, "
                   f"cpu-ms {i['cpu-ms']}, state {i['state']}")
            t.check(i["state"] == "running" and (i["zero-pages"] > 0 or i["merges"] > 0),
                    f"vm{vm} (aio={mode}): the engine ran and dropped or merged pages", i)


want, per_mib = make_image(image, opt.mib)
t.diag(f"disk image {image}: {opt.mib} MiB, sha256 {want}")
t.check(o_direct_works(image), f"{tmp} can be read with O_DIRECT (cache=none)")
if opt.ignore_dma:
    t.diag("x-ignore-dma=on: the engine does not look for DMA; wrong sums are expected")

broker, bsock, control = start_broker(BROKER, tmp, "--pool-max=256M", "--domain=dma")
try:
    if t.check(os.path.exists(control), "the broker started",
               open(os.path.join(tmp, "broker.log")).read()) and boot():
        check_rounds()
finally:
    for vm, q in enumerate(vms):
        if q.proc.poll() is not None:
            t.check(False, f"vm{vm}: QEMU is still running (exit status {q.proc.returncode})",
                    q.output()[-3000:] + "\nconsole:\n" + console(vm)[-3000:])
        q.__exit__(None, None, None)
    os.unlink(image)        # on failure the logs stay in TMP, not the image
    finish(t, broker, tmp)

t.done()

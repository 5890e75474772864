# SPDX-License-Identifier: GPL-2.0-or-later
"""Host-side figures and the broker's view, for tests and benchmarks."""

import json
import os
import re
import shutil
import subprocess
import time


def pss_kib(pid):
    """Proportional set size of a process, in KiB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kib(pid):
    """Resident set size of a process, in KiB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def broker_ctl(ctl, control, what):
    """qemu-dedup-ctl --json WHAT against a control socket; None on failure."""
    out = subprocess.run([ctl, f"--control={control}", "--json", what],
                         capture_output=True, text=True, timeout=10)
    return json.loads(out.stdout) if out.returncode == 0 else None


def start_broker(broker, tmp, *options):
    """qemu-dedup-broker with sockets in TMP; returns (process, socket, control)."""
    sock = os.path.join(tmp, "broker.sock")
    control = os.path.join(tmp, "control.sock")
    log = open(os.path.join(tmp, "broker.log"), "a")
    proc = subprocess.Popen([broker, f"--socket={sock}", f"--control={control}", *options],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not os.path.exists(control) and time.monotonic() < deadline and \
            proc.poll() is None:
        time.sleep(0.05)
    return proc, sock, control


def tcg_guest_args(guest_dir, name, console, mem, params):
    """A TCG guest from the test image (scripts/guest): q35, one vCPU, its
    console in the file CONSOLE, qdedup.K=V kernel parameters from PARAMS."""
    append = " ".join(["console=ttyS0 panic=-1"] +
                      [f"qdedup.{k}={v}" for k, v in params.items()])
    return ["-accel", "tcg", "-machine", "q35", "-m", str(mem), "-smp", "1",
            "-nodefaults", "-display", "none", "-name", f"{name},debug-threads=on",
            "-serial", f"file:{console}",
            "-kernel", os.path.join(guest_dir, "vmlinuz"),
            "-initrd", os.path.join(guest_dir, "initramfs.cpio.gz"), "-append", append]


def finish(t, broker, tmp):
    """Stop the broker; remove TMP unless a check failed (then it has the logs)."""
    broker.terminate()
    broker.wait(timeout=10)
    if t.failures:
        t.diag(f"logs kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


def memcheck_rounds(text):
    """Numbers of the memcheck rounds that passed in console TEXT, and the
    lines that say something failed (memcheck or the guest kernel)."""
    ok = [int(n) for n in re.findall(r"MEMCHECK-ROUND n=(\d+) .* errors=0", text)]
    bad = [line for line in text.splitlines()
           if "MEMCHECK-FAIL" in line or "Kernel panic" in line or "BUG:" in line]
    return ok, bad

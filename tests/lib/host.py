# SPDX-License-Identifier: GPL-2.0-or-later
"""Host-side figures and the broker's view, for tests and benchmarks."""

import json
import subprocess


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


def broker_ctl(ctl, control, what):
    """qemu-dedup-ctl --json WHAT against a control socket; None on failure."""
    out = subprocess.run([ctl, f"--control={control}", "--json", what],
                         capture_output=True, text=True, timeout=10)
    return json.loads(out.stdout) if out.returncode == 0 else None


def start_broker(broker, tmp, *options):
    """qemu-dedup-broker with sockets in TMP; returns (process, socket, control)."""
    import os
    import time
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

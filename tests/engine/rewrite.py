#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""engine-rewrite (tests/engine/rewrite.c) against a real broker, which must
hold no reference once the process is gone.

Usage: rewrite.py BUILD_DIR"""

import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from host import broker_ctl, start_broker  # noqa: E402
from tap import Tap  # noqa: E402

build = sys.argv[1]
t = Tap()
tmp = tempfile.mkdtemp(prefix="qdedup-engine-rewrite-")
broker, sock, control = start_broker(os.path.join(build, "broker", "qemu-dedup-broker"),
                                     tmp, "--pool-max=64M", "--domain=rewrite")
ctl = os.path.join(build, "tools", "qemu-dedup-ctl")
try:
    t.check(broker.poll() is None and os.path.exists(control), "broker started")
    p = subprocess.run([os.path.join(build, "tests", "engine-rewrite"), sock],
                       capture_output=True, text=True, timeout=600)
    results = [line for line in p.stdout.splitlines() if line.startswith(("ok ", "not ok "))]
    for line in results:
        t.check(line.startswith("ok "), line.split(" - ", 1)[-1])
    t.check(p.returncode == 0 and len(results) == 7, "engine-rewrite exited 0 after 7 checks",
            p.stdout[-2000:] + p.stderr[-2000:])
    time.sleep(0.5)
    st = broker_ctl(ctl, control, "stats")
    t.check(st is not None and st["pages-shared"] == 0 and st["clients"] == 0,
            "the broker holds no reference afterwards", st)
finally:
    broker.terminate()
    broker.wait(timeout=10)
    shutil.rmtree(tmp, ignore_errors=True)
t.done()

# SPDX-License-Identifier: GPL-2.0-or-later
"""Minimal TAP producer for Python tests: every check counts, the plan is
printed at the end, and the exit status is non-zero when any check failed."""

import sys
import time


class Tap:
    def __init__(self):
        self.count = 0
        self.failures = 0

    def check(self, cond, desc, detail=None):
        self.count += 1
        if cond:
            print(f"ok {self.count} - {desc}", flush=True)
        else:
            self.failures += 1
            print(f"not ok {self.count} - {desc}", flush=True)
            if detail is not None:
                self.diag(detail)
        return cond

    def equal(self, got, want, desc, detail=None):
        extra = f"\n{detail}" if detail is not None else ""
        return self.check(got == want, desc, f"got {got!r}, want {want!r}{extra}")

    def wait(self, what, cond, timeout, step=0.3):
        """Poll COND until it holds or TIMEOUT seconds pass (then say so)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return True
            time.sleep(step)
        self.diag(f"timed out after {timeout} s waiting for {what}")
        return False

    def diag(self, text):
        for line in str(text).splitlines():
            print(f"# {line}", flush=True)

    def done(self):
        print(f"1..{self.count}", flush=True)
        sys.exit(1 if self.failures else 0)

# SPDX-License-Identifier: GPL-2.0-or-later
"""Minimal TAP producer for Python tests: every check counts, the plan is
printed at the end, and the exit status is non-zero when any check failed."""

import sys


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

    def diag(self, text):
        for line in str(text).splitlines():
            print(f"# {line}", flush=True)

    def done(self):
        print(f"1..{self.count}", flush=True)
        sys.exit(1 if self.failures else 0)

#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Print the 'N passed, N failed' line of a meson test run from its
testlog.json.  Only OK and EXPECTEDFAIL count as passed; a skipped test
counts as failed, because a test that did not run proved nothing."""

import json
import sys

PASSED = {"OK", "EXPECTEDFAIL"}

path = sys.argv[1]
try:
    with open(path) as f:
        results = [json.loads(line) for line in f if line.strip()]
except OSError as e:
    print(f"test-summary: {e}")
    print("0 passed, 1 failed")
    sys.exit(1)

failed = [r for r in results if r["result"] not in PASSED]
for r in failed:
    print(f"FAILED: {r['name']} ({r['result']})")
print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
sys.exit(1 if failed or not results else 0)

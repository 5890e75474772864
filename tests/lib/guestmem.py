#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Guest RAM for qtest tests, in bulk: page patterns, writes and reads of
many pages at once (qtest's b64write/b64read), a page-by-page comparison,
and the host side of guest RAM (HMP `info ramblock`, /proc/PID/smaps)."""

import base64
import re

PAGE = 4096
# Pages per qtest command: QEMU scans its whole input line again for each
# piece it receives, so long lines are slow (8 pages: ~50 MiB/s written,
# ~100 MiB/s read back; 256 pages: a third of that).
CHUNK = 8


def pattern(seed, i):
    """A non-zero page that depends on SEED and page number I (distinct for
    every (SEED, I) with I below 10^6)."""
    return (seed * 1000003 + i * 7919 + 1).to_bytes(8, "little") * (PAGE // 8)


def write_pages(qt, addr, n, page):
    """Write N pages from guest address ADDR, page I being PAGE(I)."""
    for i in range(0, n, CHUNK):
        data = b"".join(page(k) for k in range(i, min(i + CHUNK, n)))
        reply = qt.cmd(f"b64write {addr + i * PAGE:#x} {len(data):#x} "
                       f"{base64.b64encode(data).decode()}")
        if reply != "OK":
            raise RuntimeError(f"qtest b64write at {addr + i * PAGE:#x}: {reply}")


def read(qt, addr, size):
    """SIZE bytes of guest memory from ADDR (qtest b64read)."""
    reply = qt.cmd(f"b64read {addr:#x} {size:#x}")
    if not reply.startswith("OK "):
        raise RuntimeError(f"qtest b64read at {addr:#x}: {reply[:200]}")
    return base64.b64decode(reply[3:])


def bad_pages(qt, addr, n, page):
    """Numbers of the N pages from ADDR that do not read back as PAGE(I)
    (None: not checked)."""
    bad = []
    for i in range(0, n, CHUNK):
        k_end = min(i + CHUNK, n)
        got = read(qt, addr + i * PAGE, (k_end - i) * PAGE)
        for k in range(i, k_end):
            want = page(k)
            if want is not None and got[(k - i) * PAGE:(k - i + 1) * PAGE] != want:
                bad.append(k)
    return bad


def ramblocks(qmp):
    """{name: (host address, used length)} of QEMU's RAM blocks (HMP info
    ramblock)."""
    blocks = {}
    for line in qmp.hmp("info ramblock").splitlines():
        # name, page size ("4 KiB"), offset, used, total, HVA, ro/rw
        f = line.split()
        if len(f) >= 7 and all(x.startswith("0x") for x in f[-5:-1]):
            blocks[f[0]] = (int(f[-2], 16), int(f[-4], 16))
    return blocks


def smaps(pid):
    """The VMAs of process PID: dicts with start, end, path and flags (the
    set of VmFlags)."""
    vmas = []
    head = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \d+\s*(.*)$")
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            m = head.match(line)
            if m:
                vmas.append({"start": int(m.group(1), 16), "end": int(m.group(2), 16),
                             "path": m.group(3), "flags": set()})
            elif line.startswith("VmFlags:"):
                vmas[-1]["flags"] = set(line.split()[1:])
    return vmas


def vmas_without(pid, flag, ranges, path_prefix):
    """VMAs of PID that lie in (overlap) one of RANGES [(start, end)] or whose
    path starts with PATH_PREFIX, but lack VmFlag FLAG; and how many VMAs
    were looked at."""
    bad, seen = [], 0
    for v in smaps(pid):
        inside = any(v["start"] < hi and v["end"] > lo for lo, hi in ranges)
        if inside or v["path"].startswith(path_prefix):
            seen += 1
            if flag not in v["flags"]:
                bad.append(f"{v['start']:x}-{v['end']:x} {v['path']} "
                           f"{' '.join(sorted(v['flags']))}")
    return bad, seen

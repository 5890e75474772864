# SPDX-License-Identifier: GPL-2.0-or-later
"""The ideal saving, counted from the guests' RAM itself.

For every guest it reads the RAM block's host mapping (QEMU's HMP gpa2hva
gives its address) through /proc/PID/pagemap and /proc/PID/mem, with the
guests stopped.  Only pages present on the host count: a page the guest never
touched costs nothing to begin with, nor does one that maps the kernel's
shared zero page (a read of untouched memory; /proc/kpageflags tells).  Of
the present pages, a zero page needs no memory and each distinct non-zero
content needs one page, across all the guests (one trust domain), so

    ideal saving = present pages - distinct non-zero contents

which is what perfect, free deduplication would give back.  Needs root."""

import hashlib
import re
import struct

PAGE = 4096
CHUNK = 512                     # pages read at once
ZERO = bytes(PAGE)
PFN_MASK = (1 << 55) - 1
KPF_ZERO_PAGE = 1 << 24


class KPageFlags:
    """Whether a PFN is the zero page (or the huge zero page's), cached."""

    def __init__(self):
        self.f = open("/proc/kpageflags", "rb")
        self.cache = {}

    def zero_page(self, pfn):
        if pfn not in self.cache:
            self.f.seek(pfn * 8)
            self.cache[pfn] = bool(struct.unpack("<Q", self.f.read(8))[0] & KPF_ZERO_PAGE)
        return self.cache[pfn]


def ram_mapping(qmp):
    """(host address, bytes) of the guest's main RAM block."""
    out = qmp.cmd("human-monitor-command", **{"command-line": "gpa2hva 0"})
    m = re.search(r"is (0x[0-9a-f]+)", out)
    if not m:
        raise RuntimeError(f"gpa2hva: {out.strip()}")
    size = qmp.cmd("query-memory-size-summary")["base-memory"]
    return int(m.group(1), 16), size


def census(pid, addr, size, contents, kpf):
    """Present and present-zero pages of [ADDR, ADDR+SIZE) in PID; adds the
    digest of every present non-zero page to the set CONTENTS."""
    present = zero = 0
    with open(f"/proc/{pid}/pagemap", "rb") as pm, open(f"/proc/{pid}/mem", "rb") as mem:
        for first in range(0, size // PAGE, CHUNK):
            n = min(CHUNK, size // PAGE - first)
            pm.seek((addr // PAGE + first) * 8)
            entries = struct.unpack(f"<{n}Q", pm.read(n * 8))
            if not any(e >> 63 for e in entries):
                continue
            mem.seek(addr + first * PAGE)
            data = mem.read(n * PAGE)
            for i, e in enumerate(entries):
                if not e >> 63:                 # bit 63: present in RAM
                    continue
                page = data[i * PAGE:(i + 1) * PAGE]
                if page == ZERO:
                    if kpf.zero_page(e & PFN_MASK):
                        continue
                    zero += 1
                else:
                    contents.add(hashlib.blake2b(page, digest_size=16).digest())
                present += 1
    return present, zero


def ideal_saving(guests):
    """GUESTS: (pid, QMP) pairs.  Stops the guests (they are not resumed) and
    returns the page counts and the ideal saving in MiB."""
    maps = [(pid, ram_mapping(qmp)) for pid, qmp in guests]
    for _, qmp in guests:
        qmp.cmd("stop")
    contents = set()
    present = zero = 0
    kpf = KPageFlags()
    for pid, (addr, size) in maps:
        p, z = census(pid, addr, size, contents, kpf)
        present += p
        zero += z
    return {"present_pages": present, "zero_pages": zero,
            "distinct_pages": len(contents),
            "ideal_saving_mib": (present - len(contents)) * PAGE / 1048576}

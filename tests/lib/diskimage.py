# SPDX-License-Identifier: GPL-2.0-or-later
"""A disk image for cache=none guests (tests/qemu/dma-tcg.py,
scripts/bench/diskread-bench.py): a seeded pseudo-random pattern with no
page of zeros, on a file system that can do O_DIRECT, and the -drive
arguments that read it with aio=MODE."""

import hashlib
import mmap
import os
import random

from qmp import QemuProcess

MIB = 1 << 20


def make_image(path, mib):
    """MIB MiB of the pattern at PATH; returns the sha256 of all of it and
    the list of each MiB's sha256."""
    rng = random.Random(0x1D8)
    whole, per_mib = hashlib.sha256(), []
    with open(path, "wb") as f:
        for _ in range(mib):
            data = rng.randbytes(MIB)
            assert all(any(data[p:p + 4096]) for p in range(0, MIB, 4096))
            f.write(data)
            whole.update(data)
            per_mib.append(hashlib.sha256(data).hexdigest())
    return whole.hexdigest(), per_mib


def o_direct_works(path):
    """Can PATH be read with O_DIRECT (what cache=none needs)?"""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    try:
        return os.readv(fd, [mmap.mmap(-1, 4096)]) == 4096     # page-aligned
    except OSError:
        return False
    finally:
        os.close(fd)


def drive(image, mode):
    """-drive arguments: IMAGE read-only, cache=none, aio=MODE, id d0."""
    return ["-drive", f"file={image},if=none,id=d0,format=raw,cache=none,aio={mode},readonly=on"]


def aio_in_build(qemu, image, mode):
    """Was this QEMU built with aio=MODE (native needs libaio)?"""
    try:
        with QemuProcess(qemu, ["-machine", "none", "-nodefaults", "-display", "none"] +
                         drive(image, mode)):
            return True
    except RuntimeError as e:
        if "not supported in this build" in str(e):
            return False
        raise

# SPDX-License-Identifier: GPL-2.0-or-later
"""The guest workloads of ksm-compare.py.

Each one is a set of kernel parameters for the test guest's /init
(scripts/guest/workloads/*.sh), the console line that says the guest has
loaded its data (the bench measures from the moment every guest printed it),
and whether the guest times its writes (memcheck's MEMCHECK-LATENCY lines).
{s} in a doc is --shared-mib ({h}: half, {q}: a quarter); guest I gets
seed I + 1, so 'unique' data differs."""


class Workload:
    def __init__(self, name, doc, loaded, latency, params, kernel=""):
        self.name, self.doc, self.loaded = name, doc, loaded
        self.latency, self.params, self.kernel = latency, params, kernel

    def append(self, i, shared):
        """The guest's kernel command line after console= and panic=."""
        words = [f"qdedup.{k}={v}" for k, v in self.params(i, shared).items()]
        return " ".join(words + ([self.kernel] if self.kernel else []))


WORKLOADS = {w.name: w for w in (
    Workload("idle", "boot, then nothing", "QDEDUP-READY", False,
             lambda i, s: {"workload": "idle"}),
    Workload("identical", "{s} MiB of data identical in every guest; writes "
             "to 32 of those pages timed every 10 s",
             "MEMCHECK-FILLED", True,
             lambda i, s: {"workload": "latency", "shared": s, "interval": 10,
                           "sample": 32}),
    Workload("half-unique", "{h} MiB identical in every guest, {h} MiB "
             "that differs per guest; writes timed as in identical",
             "MEMCHECK-FILLED", True,
             lambda i, s: {"workload": "latency", "shared": s // 2, "unique": s // 2,
                           "seed": i + 1, "interval": 10, "sample": 32}),
    # init_on_free=1: the guest kernel zeroes what it frees, as a guest with
    # that hardening (or a balloon-less guest after a big job) holds zeros.
    Workload("zero-heavy", "{s} MiB of data freed again by the guest, which "
             "zeroes freed memory (init_on_free=1), plus {q} MiB an "
             "application keeps zeroed and {q} MiB unique",
             "MEMCHECK-FREED", False,
             lambda i, s: {"workload": "memcheck", "shared": 0, "unique": s // 4,
                           "zero": s // 4, "spare": s, "free": 1, "seed": i + 1,
                           "rewrite": 0, "rounds": 0, "interval": 30},
             kernel="init_on_free=1"),
    Workload("churn", "{s} MiB identical at first; every 5 s each guest "
             "rewrites 5% of it, its own choice of pages; every rewrite's first "
             "write timed", "MEMCHECK-FILLED", True,
             lambda i, s: {"workload": "memcheck", "shared": s, "unique": 0, "zero": 0,
                           "seed": i + 1, "rewrite": 5, "rounds": 0, "interval": 5,
                           "time": 1}),
)}

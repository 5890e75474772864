#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""The overlay inside our QEMU: the memory-dedup type exists and is
QAPI-typed, query-memory-dedup and 'info memory-dedup' answer, objects come
and go at run time, and bad properties are refused by name.  Runs on the
qtest accelerator (no guest code).

Usage: monitor.py QEMU_BUILD_DIR QDEDUP_VERSION"""

import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from qmp import QemuProcess, QMPError  # noqa: E402
from tap import Tap  # noqa: E402

qemu = os.path.join(sys.argv[1], "qemu-system-x86_64")
version = sys.argv[2]
t = Tap()
base = ["-accel", "qtest", "-machine", "pc", "-nodefaults", "-display", "none"]

with QemuProcess(qemu, base + ["-object", "memory-dedup,id=d0"]) as q:
    m = q.qmp
    v = m.cmd("query-version")
    t.equal(v["package"], f"qdedup-{version}", "query-version names the qdedup overlay")
    t.equal((v["qemu"]["major"], v["qemu"]["minor"], v["qemu"]["micro"]), (10, 0, 13),
            "QEMU is 10.0.13")
    types = [x["name"] for x in m.cmd("qom-list-types", implements="user-creatable")]
    t.check("memory-dedup" in types, "memory-dedup is a user-creatable QOM type")
    info = m.cmd("query-memory-dedup")
    t.equal([(x["id"], x["version"]) for x in info], [("d0", version)],
            "query-memory-dedup lists the -object one")
    members = {"id", "state", "broker-connected", "domain", "covered-bytes",
               "scanned-pages", "passes", "last-pass-ms", "zero-pages", "merged-pages",
               "pool-refs", "cow-events", "vmas-used", "vma-budget", "saved-bytes",
               "cpu-ms"}
    t.check(members <= set(info[0]), "query-memory-dedup has every member issue 4 names",
            sorted(members - set(info[0])))
    t.equal(m.cmd("qom-get", path="/objects/d0", property="version"), version,
            "qom-get version")
    t.check(f"d0: qdedup {version}" in m.hmp("info memory-dedup"),
            "HMP info memory-dedup shows it")

    m.cmd("object-add", **{"qom-type": "memory-dedup", "id": "d1"})
    ids = [x["id"] for x in m.cmd("query-memory-dedup")]
    t.equal(sorted(ids), ["d0", "d1"], "object-add adds one at run time")
    m.cmd("object-del", id="d1")
    ids = [x["id"] for x in m.cmd("query-memory-dedup")]
    t.equal(ids, ["d0"], "object-del removes it")

    try:
        m.cmd("object-add", **{"qom-type": "memory-dedup", "id": "d2", "bogus": 1})
        t.check(False, "object-add with an unknown property is refused")
    except QMPError as e:
        t.check("bogus" in str(e), "object-add with an unknown property is refused by name",
                str(e))
    t.equal([x["id"] for x in m.cmd("query-memory-dedup")], ["d0"],
            "a refused object-add leaves nothing behind")

with QemuProcess(qemu, base) as q:
    t.equal(q.qmp.cmd("query-memory-dedup"), [], "no object, empty list")
    t.check("no memory-dedup objects" in q.qmp.hmp("info memory-dedup"),
            "HMP says when there is none")

r = subprocess.run([qemu] + base + ["-object", "memory-dedup,id=d0,bogus=1"],
                   capture_output=True, text=True, timeout=60)
t.check(r.returncode != 0, "-object with an unknown property: QEMU refuses to start")
t.check("bogus" in r.stderr, "... and names the property", r.stderr)

# Bad values: each refused with a message naming the property and what it takes.
for prop, words in (("cpu-limit=0", ["cpu-limit", "1-100"]),
                    ("cpu-limit=101", ["cpu-limit", "1-100"]),
                    ("cpu-limit=x", ["cpu-limit"]),
                    ("zero-pages=maybe", ["zero-pages"]),
                    ("max-vmas=-1", ["max-vmas"]),
                    ("secret=nosuch", ["nosuch"]),
                    ("broker=/nonexistent/b.sock,broker-required=on",
                     ["/nonexistent/b.sock", "broker-required"])):
    r = subprocess.run([qemu] + base + ["-object", f"memory-dedup,id=d0,{prop}"],
                       capture_output=True, text=True, timeout=60)
    t.check(r.returncode != 0 and all(w in r.stderr for w in words),
            f"-object memory-dedup,{prop}: refused, naming {', '.join(words)}", r.stderr)

with QemuProcess(qemu, base + ["-object", "memory-dedup,id=d0,broker=/nonexistent/b.sock"]) as q:
    i = q.qmp.cmd("query-memory-dedup")[0]
    t.check(not i["broker-connected"], "a missing broker: started anyway, not connected", i)
    for prop, value in (("domain", "other"), ("broker", "/x"), ("memdev", "m")):
        try:
            q.qmp.cmd("qom-set", path="/objects/d0", property=prop, value=value)
            t.check(False, f"qom-set {prop} at run time is refused")
        except QMPError as e:
            t.check(prop in str(e) and "run time" in str(e),
                    f"qom-set {prop} at run time is refused by name", str(e))
    q.qmp.cmd("qom-set", path="/objects/d0", property="cpu-limit", value=50)
    t.equal(q.qmp.cmd("qom-get", path="/objects/d0", property="cpu-limit"), 50,
            "qom-set cpu-limit at run time")
    q.qmp.cmd("qom-set", path="/objects/d0", property="enabled", value=False)
    t.equal(q.qmp.cmd("query-memory-dedup")[0]["state"], "paused", "qom-set enabled=false pauses")

t.done()

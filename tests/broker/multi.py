#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Multi-process broker test: a real qemu-dedup-broker and several client
processes (tests/broker/test-client.c) that merge pages into their own
memory, write to them, attack the pool, misbehave, die, and survive a
broker restart.  Checks the broker's view through qemu-dedup-ctl --json.

Usage: multi.py BUILD_DIR   (the build of qdedup's own meson project)
Needs root: one client runs as another uid (65534)."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from tap import Tap  # noqa: E402

build = sys.argv[1]
BROKER = os.path.join(build, "broker", "qemu-dedup-broker")
CTL = os.path.join(build, "tools", "qemu-dedup-ctl")
CLIENT = os.path.join(build, "tests", "broker-test-client")
OTHER_UID = 65534
PAGES = 2048            # 8 MiB per client
t = Tap()
tmp = tempfile.mkdtemp(prefix="qdedup-broker-test-")
os.chmod(tmp, 0o755)    # the other-uid client must reach the socket
sock = os.path.join(tmp, "broker.sock")
control = os.path.join(tmp, "control.sock")
secret_file = os.path.join(tmp, "gold.secret")
with open(secret_file, "w") as f:
    f.write("s3cret\n")
config = os.path.join(tmp, "broker.conf")
with open(config, "w") as f:
    f.write(f"""[broker]
pool-max = 64M
client-quota = 32M
allow-uids = {OTHER_UID}
socket-mode = 0666
restart-grace = 3

[domain blue]
[domain green]
[domain big]

[domain small]
quota = 40K

[domain gold]
secret-file = {secret_file}
""")


class Broker:
    def __init__(self):
        self.log = open(os.path.join(tmp, "broker.log"), "a")
        self.proc = subprocess.Popen([BROKER, f"--config={config}", f"--socket={sock}",
                                      f"--control={control}", "--verbose"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not os.path.exists(control):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("broker did not start")
            time.sleep(0.05)

    def stop(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=10)
        self.log.close()
        return rc


def ctl(what):
    out = subprocess.run([CTL, f"--control={control}", "--json", what],
                         capture_output=True, text=True, timeout=10)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout)


class Client:
    def __init__(self, name, uid=None):
        self.name = name
        self.proc = subprocess.Popen([CLIENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        if uid is not None:
            self.do(f"setuid {uid}")

    def do(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        out = self.proc.stdout.readline()
        if not out:
            raise RuntimeError(f"client {self.name} died on '{line}'")
        return json.loads(out)

    def connect(self, domain="-", secret=""):
        return self.do(f"connect {sock} {domain} {self.name} {secret}".strip())

    def exit(self):
        try:
            self.proc.stdin.write("exit\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        self.proc.wait(timeout=10)


def shmem_kb():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1])
    return 0


def client_by_name(name):
    return [c for c in ctl("clients") if c["name"] == name]


broker = Broker()
try:
    # --- Three clients of one domain share one set of pages -------------------
    a, b, c = Client("vm-a"), Client("vm-b"), Client("vm-c")
    for cl in (a, b, c):
        t.check(cl.connect("blue")["ok"], f"{cl.name} joins domain blue")
        cl.do(f"fill {PAGES} 7")
    shmem_before = shmem_kb()
    r = a.do("merge")
    t.equal((r["miss"], r["merged"]), (PAGES, 0), "first client: all candidates, nothing stored")
    t.equal(ctl("stats")["slots-used"], 0, "unique pages cost no pool page")
    r = b.do("merge")
    t.equal((r["publish"], r["stored"], r["merged"]), (PAGES, PAGES, PAGES),
            "second client: asked to publish, stored and mapped every page")
    r = c.do("merge")
    t.equal((r["hit"], r["merged"]), (PAGES, PAGES), "third client: every page a hit")
    r = a.do("merge")
    t.equal((r["hit"], r["merged"]), (PAGES, PAGES), "first client merges on its next pass")
    st = ctl("stats")
    t.equal(st["slots-used"], PAGES, "one pool slot per distinct page")
    t.equal(st["pages-shared"], 3 * PAGES, "three references per slot, one per client")
    t.equal(st["saved-bytes"], 2 * PAGES * 4096, "saved = pages mapped - slots")
    per_client = [cl["saved-bytes"] for cl in ctl("clients")]
    t.check(abs(sum(per_client) - st["saved-bytes"]) < 4096,
            f"per-client saved-bytes add up to the total (to rounding): {per_client}")
    t.check(st["metadata-bytes"] > 0, "the broker reports its metadata bytes")
    t.check(st["pool-resident-bytes"] >= PAGES * 4096, "the pool holds the pages")
    for cl in (a, b, c):
        t.check(cl.do("check")["ok"], f"{cl.name}: every page reads right after merging")

    # --- Copy-on-write; the pool never changes (I1) ---------------------------
    for i in (0, 5, PAGES - 1):
        b.do(f"write {i}")
    t.check(b.do("check")["ok"], "vm-b reads its own writes (COW)")
    t.check(a.do("check")["ok"] and c.do("check")["ok"], "the others do not see them")
    r = b.do("pool-check")
    t.check(r["ok"] and r["checked"] == PAGES, "the pool still holds the original pages (I1)")

    # --- Another uid cannot write the pool by any route -----------------------
    x = Client("vm-other", uid=OTHER_UID)
    t.check(x.connect("blue")["ok"], f"a client running as uid {OTHER_UID} connects")
    x.do(f"fill {PAGES} 7")
    r = x.do("merge")
    t.equal(r["merged"], PAGES, "... and merges the same pages")
    r = x.do("attack")
    t.equal(r["succeeded"], 0, "... but no route writes the pool", json.dumps(r["routes"]))
    t.check(x.do("pool-check")["ok"], "the pool is unchanged after the attack")

    # --- Domains never share ---------------------------------------------------
    g = Client("vm-green")
    g.connect("green")
    g.do(f"fill {PAGES} 7")
    r = g.do("lookup-only")
    t.equal((r["hit"], r["publish"]), (0, 0), "another domain's pages are invisible")
    p = Client("vm-private")
    p.connect("-")
    p.do(f"fill {PAGES} 7")
    r = p.do("lookup-only")
    t.equal((r["hit"], r["publish"]), (0, 0), "a client with no domain shares with nobody")
    p.do("fill 64 9 uniform")
    r = p.do("merge")
    t.equal((r["stored"], r["merged"]), (1, 63),
            "... but its own identical pages merge, into one slot")
    p.do("merge")
    r = p.do("check")
    t.check(r["ok"] and r["merged"] == 64, "... all of them, correctly", r)

    # --- Domain access: secret -------------------------------------------------
    s1 = Client("vm-gold-bad")
    r = s1.connect("gold", "wrong")
    t.check(not r["ok"] and r["error"] == "denied" and "secret" in r["message"],
            "a wrong domain secret is refused with a clear error", r)
    s2 = Client("vm-gold")
    t.check(s2.connect("gold", "s3cret")["ok"], "the right secret is accepted")

    # --- Quotas ----------------------------------------------------------------
    q1, q2 = Client("vm-q1"), Client("vm-q2")
    for cl in (q1, q2):
        cl.connect("small")
        cl.do("fill 32 11")
        r = cl.do("merge")
    t.equal(r["stored"], 10, "domain quota (40K = 10 slots) caps what is stored")
    t.check(r["publish_quota"] == 22, "the rest is refused with QUOTA", r)
    big1, big2 = Client("vm-big1"), Client("vm-big2")
    for cl in (big1, big2):
        cl.connect("big")
        cl.do("fill 8500 12")
        r = cl.do("merge")
    t.equal(r["stored"], 8192, "client quota (32M = 8192 slots) caps one client's references")
    t.check(r["publish_quota"] == 8500 - 8192, "the rest is refused with QUOTA", r)
    t.check(big2.do("check")["ok"], "pages over the quota stay private and correct")
    big2.do("unref-all")
    t.equal(ctl("stats")["slots-used"], PAGES + 1 + 10, "releasing them frees the slots")

    # --- Garbage: dropped, the others keep working -----------------------------
    r = g.do("garbage")
    t.check(r["ok"] and r["error"] == "protocol" and r["closed"],
            "a client sending garbage gets a protocol error and is dropped")
    t.check(ctl("stats")["protocol-errors"] >= 1, "the broker counts it")
    r = c.do("merge")
    t.equal(r["hit"], PAGES, "the other clients keep working")

    # --- A killed client's references are released -----------------------------
    refs_before = ctl("stats")["pages-shared"]
    c.proc.kill()
    c.proc.wait()
    deadline = time.monotonic() + 10
    while client_by_name("vm-c") and time.monotonic() < deadline:
        time.sleep(0.05)
    t.check(not client_by_name("vm-c"), "a killed client disappears")
    t.equal(ctl("stats")["pages-shared"], refs_before - PAGES,
            "its references are released")

    # --- Freed slots give memory back ------------------------------------------
    for cl in (a, b, x):
        r = cl.do("unref-all")
        t.check(r["ok"], f"{cl.name} unmaps and releases its pages")
        t.check(cl.do("check")["ok"], f"{cl.name} still reads right after unmerging")
    st = ctl("stats")
    t.equal(st["slots-used"], 11, "only the quota domain's and vm-private's slots remain")
    t.check(st["pool-resident-bytes"] <= 11 * 4096,
            f"the pool's memory is given back ({st['pool-resident-bytes']} bytes resident)")
    t.check(shmem_kb() - shmem_before < PAGES * 4 // 4,
            "and Shmem in /proc/meminfo drops back")

    # --- Broker restart loses nothing ------------------------------------------
    a.do(f"fill {PAGES} 21")
    b.do(f"fill {PAGES} 21")
    for cl in (a, b, a):
        cl.do("merge")
    r = [cl.do("check") for cl in (a, b)]
    t.check(all(x["ok"] and x["merged"] == PAGES for x in r),
            "two clients share a fresh set of pages", r)
    b.do("write 3")
    used = ctl("stats")["slots-used"]
    t.equal(broker.stop(), 0, "SIGTERM stops the broker cleanly (exit 0)")
    t.check(a.do("check")["ok"] and b.do("check")["ok"],
            "with no broker, merged pages still read right")
    broker = Broker()
    r = Client("vm-new").connect("blue")
    t.check(not r["ok"] and r["error"] == "retry", "a new client is asked to retry meanwhile", r)
    ra = a.do(f"reconnect {sock}")
    rb = b.do(f"reconnect {sock}")
    t.check(ra["ok"] and ra["adopted"] and ra["restored"] == PAGES,
            "the first client hands the pool back and restores its references", ra)
    t.check(rb["ok"] and rb["restored"] == PAGES, "the second restores its own", rb)
    for other in (q1, q2, p):
        t.check(other.do(f"reconnect {sock}")["ok"], f"{other.name} reconnects too")
    t.check(all(cl.do("check")["ok"] for cl in (a, b, q2, p)), "no guest data lost")
    t.check(b.do("pool-check")["ok"], "the pool is intact")
    st = ctl("stats")
    t.equal(st["pages-shared"], 2 * PAGES + 10 + 1,
            "reference counts rebuilt (vm-private's 64 pages: one slot, one reference)")
    time.sleep(4)       # restart-grace: unclaimed slots are freed
    st = ctl("stats")
    t.equal(st["slots-used"], used, "no slot lost, none leaked")
    t.equal((st["slots-held"], st["domains-recovering"]), (0, 0),
            "the recovery sweep settled every held slot (the kernel's maps)")
    r = Client("vm-late").connect("blue")
    t.check(r["ok"], "new clients are welcome after the restart")
    d = Client("vm-d")
    d.connect("blue")
    d.do(f"fill {PAGES} 21")
    r = d.do("merge")
    t.equal(r["hit"], PAGES, "restored pages are found again by lookups")

    # --- A dropped connection keeps the references of a live process ------------
    r = a.do(f"reconnect {sock}")
    t.check(r["ok"] and r["refs_kept"], "reconnecting to the same broker keeps the references", r)
    t.check(a.do("check")["ok"], "and the pages")
finally:
    try:
        broker.stop()
    except Exception:
        pass

t.done()

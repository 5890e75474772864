#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""memory-dedup through libvirt, end to end (issue 6).

Installs Debian's libvirt packages if missing, then runs its own libvirtd in
a private mount namespace, so that /etc/libvirt, /run/libvirt,
/var/lib/libvirt, /var/log/libvirt and /var/cache/libvirt are directories of
this test and the host's libvirt is not touched.  No systemd, no polkit
(unix socket auth none), no virtlogd (stdio_handler file).  With our
qemu-system-x86_64 as <emulator> and the test image, it:

  - shows that a typo in the qemu XML namespace is caught by
    'define --validate' (plain 'define' silently drops the block);
  - defines and boots a TCG domain with dedup enabled the documented way
    (docs/libvirt.md), reads query-memory-dedup through
    'virsh qemu-monitor-command --return-value', and checks that the broker
    sees the domain and that scanned-pages grows;
  - lists it with 'qemu-dedup-ctl vms' (libvirt's API beside the broker);
  - disables and enables dedup at run time (object-del, object-add);
  - checks that libvirt runs QEMU under its seccomp sandbox (spawn=deny,
    resourcecontrol=deny), with which everything above works;
  - with <memoryBacking> memfd: private RAM is covered, shared is refused
    (listed in 'refused' with the reason);
  - does it again with QEMU running as libvirt-qemu:kvm, with the
    /dev/userfaultfd rule of deploy/qemu-dedup.tmpfiles.conf applied (and
    the device's mode restored afterwards).

Usage: e2e.py QEMU_BUILD_DIR OWN_BUILD_DIR GUEST_DIR SOURCE_DIR"""

import grp
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from host import broker_ctl, start_broker  # noqa: E402
from tap import Tap  # noqa: E402

qemu = os.path.abspath(os.path.join(sys.argv[1], "qemu-system-x86_64"))
own, guest, src = (os.path.abspath(p) for p in sys.argv[2:5])
CTL = os.path.join(own, "tools", "qemu-dedup-ctl")
PACKAGES = ["libvirt-daemon-system", "libvirt-daemon-driver-qemu", "libvirt-clients"]
PRIVATE_DIRS = {"etc": "/etc/libvirt", "run": "/run/libvirt", "lib": "/var/lib/libvirt",
                "log": "/var/log/libvirt", "cache": "/var/cache/libvirt"}
NS = "http://libvirt.org/schemas/domain/qemu/1.0"
t = Tap()
tmp = tempfile.mkdtemp(prefix="qdedup-libvirt-")
os.chmod(tmp, 0o755)        # QEMU as libvirt-qemu reads the kernel and the sockets here
uri = f"qemu:///system?socket={tmp}/run/libvirt-sock"


def run(*argv, timeout=120):
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def virsh(*args, timeout=120):
    return run("virsh", "-c", uri, *args, timeout=timeout)


def qmp(dom, cmd, **arguments):
    msg = {"execute": cmd}
    if arguments:
        msg["arguments"] = arguments
    r = virsh("qemu-monitor-command", dom, "--return-value", json.dumps(msg))
    if r.returncode:
        raise RuntimeError(r.stderr.strip())
    return json.loads(r.stdout)


def wait_for(what, cond, timeout):
    return t.wait(what, cond, timeout, 0.5)


def have_packages():
    try:
        pwd.getpwnam("libvirt-qemu")
    except KeyError:
        return False
    return all(shutil.which(b) for b in ("libvirtd", "virsh"))


def domain_xml(name, ns=NS, memory_backing=""):
    append = ("console=ttyS0 panic=-1 qdedup.workload=memcheck qdedup.shared=16 "
              "qdedup.unique=4 qdedup.zero=8 qdedup.rounds=0 qdedup.interval=1")
    return f"""<domain type='qemu' xmlns:qemu='{ns}'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>{memory_backing}
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{tmp}/vmlinuz</kernel>
    <initrd>{tmp}/initramfs.cpio.gz</initrd>
    <cmdline>{append}</cmdline>
  </os>
  <features>
    <acpi/>
  </features>
  <on_reboot>destroy</on_reboot>
  <devices>
    <emulator>{qemu}</emulator>
    <serial type='file'>
      <source path='{tmp}/{name}.console'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-object'/>
    <qemu:arg value='secret,id=dedup-secret0,file={tmp}/libvirt.secret'/>
    <qemu:arg value='-object'/>
    <qemu:arg value='memory-dedup,id=d0,broker={tmp}/broker.sock,domain=libvirt,secret=dedup-secret0'/>
  </qemu:commandline>
</domain>
"""


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


def start_libvirtd(user, group):
    """libvirtd in its own mount namespace, over this test's directories."""
    write(f"{tmp}/etc/libvirtd.conf",
          'unix_sock_group = "root"\nunix_sock_rw_perms = "0770"\n'
          'auth_unix_ro = "none"\nauth_unix_rw = "none"\n'
          f'log_outputs = "3:file:{tmp}/log/libvirtd.log"\n')
    write(f"{tmp}/etc/qemu.conf",
          f'user = "{user}"\ngroup = "{group}"\nsecurity_driver = "none"\n'
          'stdio_handler = "file"\ncgroup_controllers = [ ]\nnamespaces = [ ]\n'
          'remember_owner = 0\n')
    binds = " && ".join(f"mkdir -p {real} && mount --bind {tmp}/{mine} {real}"
                        for mine, real in PRIVATE_DIRS.items())
    log = open(f"{tmp}/libvirtd.stderr", "a")
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                             f"{binds} && exec libvirtd"], stdout=log, stderr=log)
    up = wait_for("libvirtd", lambda: proc.poll() is not None or
                  virsh("list").returncode == 0, 60)
    return proc if up and proc.poll() is None else proc


def stop_libvirtd(proc):
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def client_named(name):
    for c in broker_ctl(CTL, control, "clients") or []:
        if c["name"] == name and c["state"] != "orphan":
            return c
    return None


def exercise(name, user):
    """Define, boot, query, disable and enable dedup in one domain."""
    path = write(f"{tmp}/{name}.xml", domain_xml(name))
    r = virsh("define", "--validate", path)
    t.check(r.returncode == 0, f"{name}: define --validate accepts the documented XML",
            r.stderr)
    r = virsh("start", name, timeout=300)
    t.check(r.returncode == 0, f"{name}: the domain starts", r.stderr + log_tail(name))
    if r.returncode:
        return
    booted = wait_for(f"{name}: memcheck", lambda: "MEMCHECK-ROUND n=1 " in
                      read(f"{tmp}/{name}.console"), 300)
    t.check(booted, f"{name}: the guest booted and memcheck runs")
    pid = int(read(f"{tmp}/run/qemu/{name}.pid").strip() or 0)
    owner = pwd.getpwuid(os.stat(f"/proc/{pid}").st_uid).pw_name if pid else None
    t.equal(owner, user, f"{name}: QEMU runs as {user}")
    cmdline = read(f"/proc/{pid}/cmdline").split("\0")
    sandbox = [a for a in cmdline if a.startswith("on,") and "spawn=deny" in a]
    t.check(sandbox and "resourcecontrol=deny" in sandbox[0],
            f"{name}: under libvirt's seccomp sandbox ({sandbox[0] if sandbox else 'none'})",
            cmdline)
    info = qmp(name, "query-memory-dedup")
    t.check(len(info) == 1 and info[0]["id"] == "d0" and info[0]["covered-bytes"] >= 256 << 20,
            f"{name}: query-memory-dedup through virsh qemu-monitor-command", info)
    first = info[0]["scanned-pages"] if info else 0
    grew = wait_for(f"{name}: scanning", lambda: qmp(name, "query-memory-dedup")[0]
                    ["scanned-pages"] > first and qmp(name, "query-memory-dedup")[0]
                    ["zero-pages"] > 0, 120)
    now = qmp(name, "query-memory-dedup")[0]
    t.check(grew and now["broker-connected"], f"{name}: scanned-pages grows ({first} -> "
            f"{now['scanned-pages']}), zero-pages {now['zero-pages']}, broker connected", now)
    c = client_named(name)
    t.check(c is not None and c["domain"] == "libvirt" and
            c["uid"] == pwd.getpwnam(user).pw_uid,
            f"{name}: the broker sees the domain's QEMU as a client of uid {user}", c)
    # qemu-dedup-ctl vms: libvirt's view beside the broker's.
    r = run(CTL, f"--connect={uri}", f"--control={control}", "--json", "vms")
    vms = json.loads(r.stdout) if r.returncode == 0 else []
    mine = [v for v in vms if v["domain"] == name]
    t.check(mine and mine[0]["memory-dedup"][0]["id"] == "d0" and mine[0]["broker"] and
            mine[0]["broker"]["uid"] == pwd.getpwnam(user).pw_uid,
            f"{name}: qemu-dedup-ctl vms lists it with its QMP figures and the broker's "
            "client", r.stdout[-1500:] + r.stderr)
    table = run(CTL, f"--connect={uri}", f"--control={control}", "vms").stdout
    t.check(any(line.startswith(name + " ") for line in table.splitlines()),
            f"{name}: and as a table row", table)
    t.diag(table)
    # Disable and enable at run time.
    qmp(name, "object-del", id="d0")
    t.equal(qmp(name, "query-memory-dedup"), [], f"{name}: object-del turns dedup off")
    gone = wait_for(f"{name}: broker client gone", lambda: client_named(name) is None, 30)
    t.check(gone, f"{name}: the broker no longer lists it")
    qmp(name, "object-add", **{"qom-type": "memory-dedup", "id": "d0",
                               "broker": f"{tmp}/broker.sock", "domain": "libvirt",
                               "secret": "dedup-secret0"})
    again = wait_for(f"{name}: scanning again", lambda: (qmp(name, "query-memory-dedup")
                                                         or [{}])[0].get("scanned-pages", 0)
                     > 0, 120)
    t.check(again and client_named(name) is not None,
            f"{name}: object-add turns it on again; the broker sees it again")
    r = virsh("destroy", name)
    t.check(r.returncode == 0, f"{name}: destroyed", r.stderr)
    virsh("undefine", name)


def backing_case(name, backing, covered):
    """memfd guest RAM: private is covered, shared (share=on) is refused."""
    path = write(f"{tmp}/{name}.xml", domain_xml(name, memory_backing=backing))
    r = virsh("define", "--validate", path)
    r = r if r.returncode else virsh("start", name, timeout=300)
    t.check(r.returncode == 0, f"{name}: defined and started", r.stderr + log_tail(name))
    if r.returncode:
        return
    info = qmp(name, "query-memory-dedup")[0]
    refused = [x for x in info["refused"] if x.startswith("pc.ram:")]
    if covered:
        t.check(info["covered-bytes"] >= 256 << 20 and not refused,
                f"{name}: private memfd RAM is covered", info)
    else:
        t.check(info["covered-bytes"] < 256 << 20 and refused and "shared" in refused[0],
                f"{name}: shared memfd RAM is refused, with the reason: {refused}", info)
    virsh("destroy", name)
    virsh("undefine", name)


def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def log_tail(name):
    return "\n" + read(f"{tmp}/log/qemu/{name}.log")[-2000:]


libvirtd = broker = None
uffd_mode = os.stat("/dev/userfaultfd") if os.path.exists("/dev/userfaultfd") else None
try:
    if not have_packages():
        r = run("apt-get", "install", "-y", "--no-install-recommends", *PACKAGES, timeout=900)
        t.diag(r.stdout[-1500:] + r.stderr[-1500:])
    t.check(have_packages(), "Debian's libvirt is installed (libvirtd, virsh, libvirt-qemu)")
    for mine in PRIVATE_DIRS:
        os.makedirs(f"{tmp}/{mine}", exist_ok=True)
    for f in ("vmlinuz", "initramfs.cpio.gz"):
        shutil.copy(os.path.join(guest, f), tmp)
        os.chmod(os.path.join(tmp, f), 0o644)
    # The domain's secret, as docs/libvirt.md sets it up: QEMU (group kvm)
    # reads it through a secret object, the broker through secret-file.
    write(f"{tmp}/libvirt.secret", "qdedup-e2e-" + os.urandom(12).hex() + "\n")
    os.chown(f"{tmp}/libvirt.secret", 0, grp.getgrnam("kvm").gr_gid)
    os.chmod(f"{tmp}/libvirt.secret", 0o640)
    write(f"{tmp}/broker.conf", "[broker]\nsocket-mode=0666\nallow-gids=kvm\n\n"
          f"[domain libvirt]\nsecret-file={tmp}/libvirt.secret\n")
    broker, bsock, control = start_broker(os.path.join(own, "broker", "qemu-dedup-broker"),
                                          tmp, f"--config={tmp}/broker.conf", "--pool-max=256M")
    t.check(broker.poll() is None, "broker started (clients of group kvm allowed)")

    libvirtd = start_libvirtd("root", "root")
    t.check(libvirtd.poll() is None and virsh("list").returncode == 0,
            "a private libvirtd runs", read(f"{tmp}/libvirtd.stderr")[-2000:])

    # A typo in the namespace: libvirt drops the block without --validate.
    typo = write(f"{tmp}/typo.xml", domain_xml("qdedup-typo", ns=NS.replace("1.0", "1.1")))
    r = virsh("define", "--validate", typo)
    t.check(r.returncode != 0, "define --validate refuses a mistyped qemu namespace",
            r.stdout + r.stderr)
    r = virsh("define", typo)
    dumped = virsh("dumpxml", "qdedup-typo").stdout
    t.check(r.returncode == 0 and "memory-dedup" not in dumped,
            "plain define takes it and silently drops the memory-dedup object "
            "(why the docs say --validate)", dumped[-800:])
    virsh("undefine", "qdedup-typo")

    exercise("qdedup-root", "root")
    memfd = "\n  <memoryBacking>\n    <source type='memfd'/>\n    <access mode='{}'/>\n" \
            "  </memoryBacking>"
    backing_case("qdedup-memfd-private", memfd.format("private"), True)
    backing_case("qdedup-memfd-shared", memfd.format("shared"), False)

    # QEMU as libvirt-qemu:kvm, with the deployment rule for /dev/userfaultfd.
    stop_libvirtd(libvirtd)
    rule = os.path.join(src, "deploy", "qemu-dedup.tmpfiles.conf")
    r = run("systemd-tmpfiles", "--create", rule) if shutil.which("systemd-tmpfiles") \
        else None
    if r is None or r.returncode:
        # No systemd-tmpfiles: apply the rule's one line by hand.
        os.chown("/dev/userfaultfd", 0, __import__("grp").getgrnam("kvm").gr_gid)
        os.chmod("/dev/userfaultfd", 0o660)
    st = os.stat("/dev/userfaultfd")
    t.check(stat.S_IMODE(st.st_mode) == 0o660,
            "deploy/qemu-dedup.tmpfiles.conf: /dev/userfaultfd is 0660 root:kvm")
    libvirtd = start_libvirtd("libvirt-qemu", "kvm")
    t.check(libvirtd.poll() is None, "the private libvirtd runs QEMU as libvirt-qemu:kvm")
    exercise("qdedup-user", "libvirt-qemu")
finally:
    for name in ("qdedup-typo", "qdedup-root", "qdedup-user", "qdedup-memfd-private",
                 "qdedup-memfd-shared"):
        if libvirtd and libvirtd.poll() is None:
            virsh("destroy", name)
            virsh("undefine", name)
    stop_libvirtd(libvirtd)
    if uffd_mode:
        os.chown("/dev/userfaultfd", uffd_mode.st_uid, uffd_mode.st_gid)
        os.chmod("/dev/userfaultfd", stat.S_IMODE(uffd_mode.st_mode))
    if broker:
        broker.terminate()
        broker.wait(timeout=10)
    left = run("pgrep", "-f", f"{tmp}/").stdout.split()
    t.check(not left, "nothing it started is left running", left)
    if t.failures:
        t.diag(f"logs kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
t.done()

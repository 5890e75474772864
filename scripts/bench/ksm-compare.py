#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""qdedup against KSM on the same TCG guests.

Boots N guests from the test image (default 4 x 512 MiB) with one workload
and runs the same scenario once per mode:

  none            no dedup (-machine mem-merge=off, KSM off): the baseline
  ksm             QEMU's default mem-merge, /sys/kernel/mm/ksm/run=1,
                  default pages_to_scan (100 per 20 ms)
  ksm-aggressive  as ksm, pages_to_scan=--ksm-aggressive-pages
  qdedup          -object memory-dedup with its defaults, one broker

KSM's settings are restored afterwards.  Every second it samples the
guests' PSS and RSS, host MemAvailable, KSM's counters, our QMP and
broker figures, ksmd's CPU and ours (the dedup-* threads of every QEMU plus
the broker).  Per mode it reports:

  saving      PSS of the N QEMUs (and the broker, which maps the pool) in
              'none' minus the same in this mode, at the end
  freed       host MemAvailable in this mode minus in 'none', at the end: what
              was really given back (noisier: it is host-wide)
  t90         seconds from the moment every guest has its data loaded until
              the saving first reaches 90% of its final value
  cpu         CPU seconds of ksmd, or of our threads and the broker, from
              the first guest's start to the end of the run
  % of ideal  saving / the ideal saving, counted from the guests' RAM at the
              end of 'none' (ideal.py: present pages minus distinct non-zero
              contents)
  t50         the same as t90 for 50% of the final saving
  MiB/CPU s   MiB saved per CPU second
  write p50/p99  guest-visible latency of a first write, timed by memcheck
              in the guest once the saving reached 90%: to pages of the
              identical data (identical, half-unique), to every page a round
              rewrites (churn)
  overhead    (qdedup) metadata-bytes + vmas-used x VMA size, % of guest RAM

Workloads (workloads.py): idle, identical, half-unique, zero-heavy, churn.

Writes OUT/samples.csv, OUT/summary.json, OUT/summary.md and the plots
OUT/saving.png (saving over time) and OUT/cpu.png (CPU over time), one line
per mode, drawn with gnuplot.  --smoke: 2 x 256 MiB guests, 32 MiB of
identical data, 20 s, modes none, ksm-aggressive, qdedup; exits non-zero
unless the outputs exist, parse, the ideal was counted and qdedup saved
memory (make check).

Usage: ksm-compare.py [--guests 4] [--mem 512] [--workload identical]
                      [--modes none,ksm,ksm-aggressive,qdedup] [--duration 240]
                      [--out DIR]
Run as root (KSM's sysfs); from the build tree after 'make all guest'."""

import argparse
import csv
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.abspath(os.path.join(here, "..", ".."))
sys.path.insert(0, os.path.join(root, "tests", "lib"))
from host import broker_ctl, pss_kib, rss_kib  # noqa: E402
from plot import line_plot  # noqa: E402
from qmp import QMP  # noqa: E402
from ideal import ideal_saving  # noqa: E402
from workloads import WORKLOADS  # noqa: E402

KSM = "/sys/kernel/mm/ksm"
PAGE_KIB = 4
CLK_TCK = os.sysconf("SC_CLK_TCK")


def read(path):
    with open(path) as f:
        return f.read().strip()


def write(path, value):
    with open(path, "w") as f:
        f.write(str(value))


def task_cpu_s(path):
    """utime + stime of /proc/.../stat, in seconds."""
    try:
        fields = read(path).rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError):
        return 0.0


def dedup_threads_cpu_s(pid):
    total = 0.0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                if read(f"/proc/{pid}/task/{tid}/comm").startswith("dedup-"):
                    total += task_cpu_s(f"/proc/{pid}/task/{tid}/stat")
            except OSError:
                pass
    except OSError:
        pass
    return total


def ksmd_pid():
    out = subprocess.run(["pgrep", "-x", "ksmd"], capture_output=True, text=True)
    return int(out.stdout.split()[0]) if out.stdout.strip() else None


def vma_bytes():
    try:
        return int(read("/sys/kernel/slab/vm_area_struct/object_size"))
    except OSError:
        return 200


def percentile(values, pct):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, len(values) * pct // 100)]


class Run:
    """One mode: N guests, maybe a broker, sampled every second."""

    def __init__(self, args, mode, tmp):
        self.args, self.mode, self.tmp = args, mode, tmp
        self.qemu = os.path.join(args.qemu_build, "qemu-system-x86_64")
        self.procs, self.qmps, self.broker = [], [], None
        self.ctl = os.path.join(args.own_build, "tools", "qemu-dedup-ctl")
        self.ideal = None
        self.samples = []

    def console(self, i):
        try:
            with open(os.path.join(self.tmp, f"{self.mode}-vm{i}.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def start(self):
        a = self.args
        if self.mode == "qdedup":
            self.bsock = os.path.join(self.tmp, "broker.sock")
            self.broker = subprocess.Popen(
                [os.path.join(a.own_build, "broker", "qemu-dedup-broker"),
                 f"--socket={self.bsock}", f"--control={self.tmp}/control.sock",
                 f"--pool-max={a.guests * a.mem}M", "--domain=bench"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while not os.path.exists(f"{self.tmp}/control.sock"):
                time.sleep(0.05)
        workload = WORKLOADS[a.workload]
        for i in range(a.guests):
            append = workload.append(i, a.shared_mib)
            qmp = os.path.join(self.tmp, f"{self.mode}-qmp{i}.sock")
            argv = [self.qemu, "-accel", "tcg", "-m", str(a.mem), "-smp", "1",
                    "-machine", "q35" + (",mem-merge=off" if self.mode == "none" else ""),
                    "-nodefaults", "-display", "none", "-no-reboot",
                    "-name", f"bench{i},debug-threads=on",
                    "-qmp", f"unix:{qmp},server=on,wait=off",
                    "-serial", f"file:{os.path.join(self.tmp, f'{self.mode}-vm{i}.log')}",
                    "-kernel", os.path.join(a.guest, "vmlinuz"),
                    "-initrd", os.path.join(a.guest, "initramfs.cpio.gz"),
                    "-append", f"console=ttyS0 panic=-1 {append}"]
            if self.mode == "qdedup":
                argv += ["-object", f"memory-dedup,id=d0,broker={self.bsock},domain=bench"
                         + (f",{a.qdedup_opts}" if a.qdedup_opts else "")]
            self.procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                               stderr=open(f"{self.tmp}/{self.mode}-qemu{i}.err", "w")))
            while not os.path.exists(qmp):
                time.sleep(0.05)
            self.qmps.append(QMP(qmp))

    def loaded(self):
        marker = WORKLOADS[self.args.workload].loaded
        return all(marker in self.console(i) for i in range(self.args.guests))

    def sample(self, t):
        # The broker maps the whole pool: its share of the pool's PSS counts.
        broker_pss = pss_kib(self.broker.pid) if self.broker else 0
        s = {"t": round(t, 2), "mode": self.mode,
             "pss_kib": sum(pss_kib(p.pid) for p in self.procs) + broker_pss,
             "rss_kib": sum(rss_kib(p.pid) for p in self.procs),
             "mem_available_kib": int(re.search(r"MemAvailable:\s+(\d+)",
                                                read("/proc/meminfo")).group(1))}
        if self.mode.startswith("ksm"):
            s["ksm_pages_sharing"] = int(read(f"{KSM}/pages_sharing"))
            s["ksm_pages_shared"] = int(read(f"{KSM}/pages_shared"))
            s["cpu_s"] = task_cpu_s(f"/proc/{self.ksmd}/stat") - self.ksmd_cpu0
        elif self.mode == "qdedup":
            infos = [q.cmd("query-memory-dedup")[0] for q in self.qmps]
            s["merged_pages"] = sum(i["merged-pages"] for i in infos)
            s["zero_pages"] = sum(i["zero-pages"] for i in infos)
            s["metadata_bytes"] = sum(i["metadata-bytes"] for i in infos)
            s["vmas_used"] = sum(i["vmas-used"] for i in infos)
            s["cpu_s"] = (sum(dedup_threads_cpu_s(p.pid) for p in self.procs) +
                          task_cpu_s(f"/proc/{self.broker.pid}/stat"))
            s["broker_pss_kib"] = broker_pss
            stats = broker_ctl(self.ctl, f"{self.tmp}/control.sock", "stats") or {}
            for key in ("pool-resident-bytes", "slots-used", "saved-bytes", "metadata-bytes"):
                if key in stats:
                    s["broker_" + key.replace("-", "_")] = stats[key]
        else:
            s["cpu_s"] = 0.0
        self.samples.append(s)
        return s

    def latencies(self):
        """(host time of the line, p50, p99) per latency sample, per guest."""
        out = []
        for i in range(self.args.guests):
            for m in re.finditer(r"MEMCHECK-LATENCY n=(\d+) pages=\d+ p50-ns=(\d+) "
                                 r"p99-ns=(\d+) max-ns=\d+ errors=(\d+)", self.console(i)):
                out.append((i, int(m.group(1)), int(m.group(2)), int(m.group(3)),
                            int(m.group(4))))
        return out

    def stop(self):
        for q in self.qmps:
            try:
                q.cmd("quit")
            except Exception:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.broker:
            self.broker.terminate()
            self.broker.wait(timeout=10)


def run_mode(args, mode, tmp, ksm_saved):
    if mode.startswith("ksm"):
        write(f"{KSM}/run", 2)              # unmerge what an earlier run left
        write(f"{KSM}/pages_to_scan",
              ksm_saved["pages_to_scan"] if mode == "ksm" else args.ksm_aggressive_pages)
        write(f"{KSM}/sleep_millisecs", ksm_saved["sleep_millisecs"])
        write(f"{KSM}/run", 1)
    else:
        write(f"{KSM}/run", 0)
    r = Run(args, mode, tmp)
    r.ksmd = ksmd_pid()
    r.ksmd_cpu0 = task_cpu_s(f"/proc/{r.ksmd}/stat") if r.ksmd else 0.0
    t_start = time.monotonic()
    r.start()
    t_loaded = None
    line_times = {}
    try:
        while True:
            now = time.monotonic()
            r.sample(now - t_start)
            if t_loaded is None and r.loaded():
                t_loaded = now - t_start
            # Host time of each latency line, to match it with the saving then.
            for lat in r.latencies():
                line_times.setdefault(lat[:2], now - t_start)
            if t_loaded is not None and now - t_start - t_loaded >= args.duration:
                if mode == "none":
                    print("   counting the ideal saving in the guests' RAM", flush=True)
                    r.ideal = ideal_saving([(p.pid, q) for p, q in zip(r.procs, r.qmps)])
                break
            if now - t_start > args.duration + 900:
                raise RuntimeError(f"{mode}: guests did not load their data in 900 s")
            time.sleep(max(0.0, 1.0 - (time.monotonic() - now)))
    finally:
        r.stop()
        if mode.startswith("ksm"):
            write(f"{KSM}/run", 2)
    r.t_loaded = t_loaded
    r.latency_lines = [(line_times[lat[:2]],) + lat for lat in r.latencies()
                       if lat[:2] in line_times]
    return r


def summarize(args, runs):
    base = runs.get("none")
    ideal = base.ideal if base else None
    guest_kib = args.guests * args.mem * 1024
    out = {}
    for mode, r in runs.items():
        tail = r.samples[-5:]
        pss_end = sum(s["pss_kib"] for s in tail) / len(tail)
        m = {"pss_end_mib": pss_end / 1024, "t_loaded_s": r.t_loaded,
             "cpu_s": r.samples[-1].get("cpu_s", 0.0)}
        if base and mode != "none":
            base_end = sum(s["pss_kib"] for s in base.samples[-5:]) / 5
            saving = base_end - pss_end
            m["saving_mib"] = saving / 1024
            # Memory really freed (PSS alone over-counts, e.g. split THPs).
            avail = sum(s["mem_available_kib"] for s in tail) / len(tail)
            base_avail = sum(s["mem_available_kib"] for s in base.samples[-5:]) / 5
            m["freed_mib"] = (avail - base_avail) / 1024
            m["saving_pct_of_guest_ram"] = 100 * saving / guest_kib
            for frac in (50, 90):
                reached = next((s["t"] for s in r.samples if s["t"] >= r.t_loaded and
                                base_end - s["pss_kib"] >= frac / 100 * saving), None)
                m[f"t{frac}_s"] = None if reached is None else round(reached - r.t_loaded, 1)
                m[f"t{frac}_abs_s"] = reached
            if ideal and ideal["ideal_saving_mib"] > 0:
                m["pct_of_ideal"] = 100 * m["saving_mib"] / ideal["ideal_saving_mib"]
            m["cpu_s_per_gib_saved"] = (m["cpu_s"] / (saving / 1048576)
                                        if saving > 0 else None)
            m["mib_saved_per_cpu_s"] = (saving / 1024 / m["cpu_s"]
                                        if m["cpu_s"] > 0 and saving > 0 else None)
        if mode == "qdedup":
            last = r.samples[-1]
            over = last["metadata_bytes"] + last["vmas_used"] * vma_bytes()
            m["metadata_mib"] = last["metadata_bytes"] / 1048576
            m["vmas_used"] = last["vmas_used"]
            m["overhead_pct_of_guest_ram"] = 100 * over / (guest_kib * 1024)
        if mode == "none" and ideal:
            m.update(ideal)
        if WORKLOADS[args.workload].latency:
            after = m.get("t90_abs_s") or r.t_loaded
            p50 = [lat[3] for lat in r.latency_lines if lat[0] >= after]
            p99 = [lat[4] for lat in r.latency_lines if lat[0] >= after]
            m["write_p50_us"] = (percentile(p50, 50) or 0) / 1000
            m["write_p99_us"] = (percentile(p99, 50) or 0) / 1000
            m["latency_samples"] = len(p50)
            m["memcheck_errors"] = sum(lat[5] for lat in r.latency_lines)
        out[mode] = m
    return out


def markdown(args, summary):
    cols = [("saving_mib", "saved MiB (PSS)", "{:.0f}"),
            ("freed_mib", "freed MiB (MemAvailable)", "{:.0f}"),
            ("saving_pct_of_guest_ram", "% of guest RAM", "{:.1f}"),
            ("pct_of_ideal", "% of ideal", "{:.1f}"),
            ("t50_s", "t50 s", "{:.0f}"), ("t90_s", "t90 s", "{:.0f}"),
            ("cpu_s", "CPU s", "{:.1f}"),
            ("cpu_s_per_gib_saved", "CPU s / GiB saved", "{:.1f}"),
            ("mib_saved_per_cpu_s", "MiB saved / CPU s", "{:.0f}"),
            ("write_p50_us", "write p50 us", "{:.1f}"),
            ("write_p99_us", "write p99 us", "{:.1f}")]
    s = args.shared_mib
    doc = WORKLOADS[args.workload].doc.format(s=s, h=s // 2, q=s // 4)
    lines = [f"{args.guests} x {args.mem} MiB TCG guests, workload {args.workload} "
             f"({doc}), {args.duration} s after load", ""]
    ideal = summary.get("none", {})
    if "ideal_saving_mib" in ideal:
        lines += [f"Ideal saving {ideal['ideal_saving_mib']:.0f} MiB: of "
                  f"{ideal['present_pages']} guest pages present in 'none', "
                  f"{ideal['zero_pages']} are zero and {ideal['distinct_pages']} "
                  "distinct non-zero contents need a page each.", ""]
    lines += [
             "| mode | " + " | ".join(c[1] for c in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for mode, m in summary.items():
        cells = []
        for key, _, fmt in cols:
            v = m.get(key)
            cells.append("-" if v is None else fmt.format(v))
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    q = summary.get("qdedup")
    if q and "overhead_pct_of_guest_ram" in q:
        lines += ["", f"qdedup metadata {q['metadata_mib']:.2f} MiB, {q['vmas_used']} extra VMAs: "
                  f"{q['overhead_pct_of_guest_ram']:.3f}% of guest RAM"]
    return "\n".join(lines) + "\n"


def plots(runs, out):
    """saving.png (MiB saved against 'none' over time) and cpu.png, per mode."""
    base = runs["none"].samples
    base_end = sum(s["pss_kib"] for s in base[-5:]) / len(base[-5:])
    made = []
    for name, title, ylabel, value in (
            ("saving", "memory saved beside no dedup", "MiB saved (PSS)",
             lambda s: (base_end - s["pss_kib"]) / 1024),
            ("cpu", "CPU used by ksmd / qdedup's threads and broker", "CPU seconds",
             lambda s: s.get("cpu_s", 0.0))):
        # Before every guest has loaded its data the baseline is not comparable.
        series = {mode: [(s["t"] - (r.t_loaded or 0), value(s)) for s in r.samples
                         if s["t"] >= (r.t_loaded or 0)]
                  for mode, r in runs.items() if mode != "none"}
        png = os.path.join(out, f"{name}.png")
        if line_plot(png, title, "seconds after the data was loaded", ylabel, series):
            made.append(png)
    return made


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--qemu-build", default=os.path.join(root, "build", "qemu-build"))
    ap.add_argument("--own-build", default=os.path.join(root, "build", "own"))
    ap.add_argument("--guest", default=os.path.join(root, "build", "guest"))
    ap.add_argument("--guests", type=int, default=4)
    ap.add_argument("--mem", type=int, default=512, help="MiB per guest")
    ap.add_argument("--workload", choices=list(WORKLOADS), default="identical")
    ap.add_argument("--shared-mib", type=int, default=192)
    ap.add_argument("--modes", default="none,ksm,ksm-aggressive,qdedup")
    ap.add_argument("--duration", type=int, default=240,
                    help="seconds to run after every guest loaded its data")
    ap.add_argument("--ksm-aggressive-pages", type=int, default=5000)
    ap.add_argument("--qdedup-opts", default="", help="extra memory-dedup properties")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="short run for make check")
    args = ap.parse_args()
    if args.smoke:
        args.guests, args.mem, args.shared_mib, args.duration = 2, 256, 32, 20
        args.workload = "identical"
        args.modes = "none,ksm-aggressive,qdedup"
    modes = args.modes.split(",")
    for m in modes:
        if m not in ("none", "ksm", "ksm-aggressive", "qdedup"):
            ap.error(f"--modes: unknown mode '{m}' (none, ksm, ksm-aggressive, qdedup)")
    if "none" not in modes:
        ap.error("--modes: 'none' is the baseline every saving is measured against")
    out = args.out or os.path.join(root, "build", "bench", f"ksm-compare-{args.workload}")
    os.makedirs(out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="qdedup-bench-")
    ksm_saved = {k: read(f"{KSM}/{k}") for k in ("run", "pages_to_scan", "sleep_millisecs")}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    runs = {}
    try:
        for mode in modes:
            print(f"== {mode}", flush=True)
            runs[mode] = run_mode(args, mode, tmp, ksm_saved)
    finally:
        for k in ("pages_to_scan", "sleep_millisecs", "run"):
            write(f"{KSM}/{k}", ksm_saved[k])
    with open(os.path.join(out, "samples.csv"), "w", newline="") as f:
        keys = sorted({k for r in runs.values() for s in r.samples for k in s})
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in runs.values():
            w.writerows(r.samples)
    summary = summarize(args, runs)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"args": vars(args), "modes": summary}, f, indent=2)
    md = markdown(args, summary)
    made = plots(runs, out)
    md += "".join(f"\n![{os.path.basename(p)}]({os.path.basename(p)})\n" for p in made)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(md)
    print(md)
    print(f"(raw samples and logs: {out}, {tmp})")
    if args.smoke:
        with open(os.path.join(out, "summary.json")) as f:
            saved = json.load(f)["modes"]["qdedup"].get("saving_mib") or 0
        with open(os.path.join(out, "samples.csv")) as f:
            rows = list(csv.DictReader(f))
        ideal = summary["none"].get("ideal_saving_mib") or 0
        ok = rows and len(made) == 2 and saved > 0 and ideal > 0
        print(f"smoke: {len(rows)} samples, {len(made)} plots, ideal {ideal:.0f} MiB, "
              f"qdedup saved {saved:.0f} MiB: " + ("ok" if ok else "FAILED"))
        sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

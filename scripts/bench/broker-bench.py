#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Broker benchmark: lookups per second with 1, 4 and 16 clients sending
batches of 1024 hashes, and the broker's memory per pool slot.

  scripts/bench/broker-bench.py [--build build/own] [--seconds 5] [--slots 262144]

Lookup rates are counted against the broker's own CPU time (from
/proc/PID/stat), so "per broker core" does not depend on how many cores
the clients had.  Writes a markdown table to stdout; docs/broker.md keeps
the latest results.  Not a test: it asserts nothing."""

import argparse
import json
import os
import subprocess
import tempfile
import time

ap = argparse.ArgumentParser()
ap.add_argument("--build", default="build/own")
ap.add_argument("--seconds", type=float, default=5)
ap.add_argument("--slots", type=int, default=262144, help="slots for the memory measurement")
ap.add_argument("--clients", default="1,4,16")
args = ap.parse_args()

BROKER = os.path.join(args.build, "broker", "qemu-dedup-broker")
CTL = os.path.join(args.build, "tools", "qemu-dedup-ctl")
LOAD = os.path.join(args.build, "scripts", "bench", "broker-load")
CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def status_kb(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


class Broker:
    def __init__(self, tmp, pool_max):
        self.sock = os.path.join(tmp, "b.sock")
        self.control = os.path.join(tmp, "c.sock")
        config = os.path.join(tmp, "broker.conf")
        with open(config, "w") as f:
            f.write("[domain bench]\n")     # trust domains are declared by the host
        self.proc = subprocess.Popen([BROKER, f"--config={config}", f"--socket={self.sock}",
                                      f"--control={self.control}", f"--state={tmp}/state",
                                      f"--pool-max={pool_max}"],
                                     stderr=subprocess.DEVNULL)
        while not os.path.exists(self.control):
            time.sleep(0.05)

    def stats(self):
        out = subprocess.run([CTL, f"--control={self.control}", "--json", "stats"],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout)

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def rate(broker, mode, nclients):
    # One reference per (client, slot): a holder keeps the pages stored while
    # the bench clients' hits take references and their UNREFs give them back.
    holder = None
    if mode == "hit":
        holder = subprocess.Popen([LOAD, broker.sock, "bench", "hold", "0", "65536"],
                                  stdout=subprocess.PIPE, text=True)
        holder.stdout.readline()
    procs = [subprocess.Popen([LOAD, broker.sock, "bench", mode, str(args.seconds), "65536"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(nclients)]
    for p in procs:
        p.stdout.readline()     # populated ("ready")
    cpu0, t0 = cpu_seconds(broker.proc.pid), time.monotonic()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    total = 0
    for p in procs:
        out = p.stdout.read()
        p.wait()
        total += int(out.split()[1])
    cpu, wall = cpu_seconds(broker.proc.pid) - cpu0, time.monotonic() - t0
    if holder:
        holder.terminate()
        holder.wait()
    return total, wall, cpu


with tempfile.TemporaryDirectory() as tmp:
    print("## Lookups\n")
    print(f"Batches of 1024 hashes, {args.seconds:g} s per run; rate per broker CPU second "
          "= lookups / broker CPU time.\n")
    print("| mode | clients | lookups | wall s | broker CPU s | lookups/s (wall) "
          "| lookups per broker CPU s |")
    print("|---|---|---|---|---|---|---|")
    for mode in ("miss", "hit"):
        for n in [int(x) for x in args.clients.split(",")]:
            b = Broker(tmp, "1G")
            total, wall, cpu = rate(b, mode, n)
            b.stop()
            print(f"| {mode} | {n} | {total} | {wall:.1f} | {cpu:.2f} | {total / wall:,.0f} "
                  f"| {total / max(cpu, 1e-9):,.0f} |")

    print("\n## Memory per slot\n")
    pool_max = max(args.slots * 4096 * 2, 1 << 30)
    b = Broker(tmp, str(pool_max))
    anon0 = status_kb(b.proc.pid, "RssAnon")
    holders = [subprocess.Popen([LOAD, b.sock, "bench", "hold", "0", str(args.slots)],
                                stdout=subprocess.PIPE, text=True) for _ in range(2)]
    for h in holders:
        h.stdout.readline()
    st = b.stats()
    anon = status_kb(b.proc.pid, "RssAnon")
    print(f"{st['slots-used']} slots (pool {st['pool-bytes'] >> 20} MiB, "
          f"maximum {pool_max >> 30} GiB), 2 clients referencing every slot.\n")
    print("| measure | bytes | per slot | % of the pool |")
    print("|---|---|---|---|")
    print(f"| broker's own accounting (metadata-bytes) | {st['metadata-bytes']:,} "
          f"| {st['metadata-bytes-per-slot']:.1f} | {st['metadata-bytes-per-slot'] / 40.96:.2f} |")
    for part, nbytes in st["metadata"].items():
        print(f"| ... {part} | {nbytes:,} | {nbytes / st['slots-used']:.1f} "
              f"| {nbytes / st['slots-used'] / 40.96:.2f} |")
    grown = (anon - anon0) * 1024
    print(f"| broker RssAnon growth (measured) | {grown:,} | {grown / st['slots-used']:.1f} "
          f"| {grown / st['slots-used'] / 40.96:.2f} |")
    for h in holders:
        h.terminate()
        h.wait()
    b.stop()

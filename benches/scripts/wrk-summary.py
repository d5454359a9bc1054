#!/usr/bin/env python3
"""Summarises wrk outputs named CASE.REP.txt in a folder: median req/s, spread, p50/p99, errors,
and each case's ratio to nginx. Usage: wrk-summary.py DIR CASE [CASE...]"""
import glob
import os
import re
import statistics
import sys


def ms(s):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", s)
    if not m:
        raise SystemExit(f"cannot read latency {s!r}")
    v, u = float(m.group(1)), m.group(2)
    return {"us": v / 1000, "ms": v, "s": v * 1000, "m": v * 60000}[u]


def main():
    d, cases = sys.argv[1], sys.argv[2:]
    res = {}
    for case in cases:
        rps, p50, p99, errs = [], [], [], 0
        for f in sorted(glob.glob(os.path.join(d, f"{case}.*.txt"))):
            t = open(f).read()
            rps.append(float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1)))
            p50.append(ms(re.search(r"^\s+50%\s+(\S+)", t, re.M).group(1)))
            p99.append(ms(re.search(r"^\s+99%\s+(\S+)", t, re.M).group(1)))
            m = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
            errs += int(m.group(1)) if m else 0
            m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", t)
            errs += sum(map(int, m.groups())) if m else 0
        if not rps:
            continue
        med = statistics.median(rps)
        res[case] = dict(rps=med, spread=(max(rps) - min(rps)) / med, p50=statistics.median(p50),
                         p99=statistics.median(p99), errors=errs, runs=rps)
    reps = max(len(v["runs"]) for v in res.values())
    print(f"| case | req/s (median of {reps}) | spread | p50 ms | p99 ms | errors |")
    print("|---|---:|---:|---:|---:|---:|")
    for k, v in res.items():
        print(f"| {k} | {v['rps']:,.0f} | {v['spread'] * 100:.0f} % | {v['p50']:.2f} | "
              f"{v['p99']:.2f} | {v['errors']} |")
    if "nginx" in res:
        n = res["nginx"]
        for k, t in res.items():
            if k.startswith("tollgate"):
                print(f"\n{k}/nginx: req/s {t['rps'] / n['rps']:.2f}, p99 {t['p99'] / n['p99']:.2f}")
    print("\nruns:", {k: [round(x) for x in v["runs"]] for k, v in res.items()})


main()

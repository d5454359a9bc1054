#!/usr/bin/env python3
"""Summarises wrk outputs named CASE.REP.txt in a folder: median req/s, spread, p50/p99, errors,
and each case's ratio to nginx. Where CASE.REP.cpu holds the proxy's CPU ticks over the run
(CLK_TCK in the environment), also its CPU microseconds per request. Usage:
wrk-summary.py DIR CASE [CASE...]"""
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
        rps, p50, p99, errs, cpu = [], [], [], 0, []
        tck = float(os.environ.get("CLK_TCK", "100"))
        for f in sorted(glob.glob(os.path.join(d, f"{case}.*.txt"))):
            t = open(f).read()
            n = int(re.search(r"(\d+) requests in", t).group(1))
            c = f[:-4] + ".cpu"
            if os.path.exists(c) and n:
                cpu.append(float(open(c).read()) / tck * 1e6 / n)
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
                         p99=statistics.median(p99), errors=errs, runs=rps,
                         cpu=statistics.median(cpu) if cpu else None, cpus=cpu)
    reps = max(len(v["runs"]) for v in res.values())
    print(f"| case | req/s (median of {reps}) | spread | p50 ms | p99 ms | errors | CPU µs/req |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k, v in res.items():
        c = f"{v['cpu']:.1f}" if v["cpu"] is not None else "-"
        print(f"| {k} | {v['rps']:,.0f} | {v['spread'] * 100:.0f} % | {v['p50']:.2f} | "
              f"{v['p99']:.2f} | {v['errors']} | {c} |")
    if "nginx" in res:
        n = res["nginx"]
        for k, t in res.items():
            if k.startswith("tollgate"):
                eff = ""
                if t["cpu"] and n["cpu"]:
                    eff = f", efficiency (nginx CPU/req ÷ this) {n['cpu'] / t['cpu']:.2f}"
                print(f"\n{k}/nginx: req/s {t['rps'] / n['rps']:.2f}, p99 {t['p99'] / n['p99']:.2f}{eff}")
    if "tollgate_metered" in res and "tollgate_logged" in res:
        m, lg = res["tollgate_metered"], res["tollgate_logged"]
        pairs = [round(b / a, 3) for a, b in zip(m["runs"], lg["runs"])]
        print(f"\naccess log: req/s logged/metered {lg['rps'] / m['rps']:.3f} (per rep {pairs})")
        if m["cpu"] and lg["cpu"]:
            cp = [round(b / a, 3) for a, b in zip(m["cpus"], lg["cpus"])]
            print(f"access log: CPU/req logged/metered {lg['cpu'] / m['cpu']:.3f} (per rep {cp})")
    print("\nruns:", {k: [round(x) for x in v["runs"]] for k, v in res.items()})


main()

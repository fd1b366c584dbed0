#!/usr/bin/env python3
"""Renders the results of tests/store-engines/run (powercut.jsonl, bench.txt, size.txt in the
folder given) as markdown: one summary table per engine, then the detail tables."""

import json
import os
import sys


def load(out):
    pc, bench, size = [], {}, {}
    p = os.path.join(out, "powercut.jsonl")
    if os.path.exists(p):
        pc = [json.loads(line) for line in open(p) if line.strip()]
    p = os.path.join(out, "bench.txt")
    if os.path.exists(p):
        for line in open(p):
            if line.startswith("engine="):
                f = dict(kv.split("=", 1) for kv in line.split())
                bench[(f["engine"], int(f["batch"]))] = f
    p = os.path.join(out, "size.txt")
    if os.path.exists(p):
        for line in open(p):
            engine, arch, n = line.split()
            size[(engine, arch)] = int(n)
    return pc, bench, size


def mb(n):
    return f"{n / 1e6:.2f}" if n is not None else "n/a"


def main():
    out = sys.argv[1]
    pc, bench, size = load(out)
    engines = []
    for r in pc:
        if r["engine"] not in engines:
            engines.append(r["engine"])
    for e, _ in bench:
        if e not in engines:
            engines.append(e)
    batches = sorted({b for _, b in bench})

    print("| engine | power cut: cuts passed / cuts (lost acked, worst cut) | store opened | "
          + " | ".join(f"batch {b}: commits/s, events/s, p50/p99 ms" for b in batches)
          + " | peak RSS MB | size x86_64 / aarch64 MB |")
    print("|---|---|---|" + "---|" * len(batches) + "---|---|")
    for e in engines:
        rows = [r for r in pc if r["engine"] == e and "error" not in r]
        cuts = sum(r["cuts"] for r in rows)
        passed = cuts - sum(r["failed_cuts"] for r in rows)
        lost = max((r["lost_max"] for r in rows), default=0)
        opened = sum(r["opened_ok"] for r in rows)
        errors = sum(1 for r in pc if r["engine"] == e and "error" in r)
        pcell = f"{passed}/{cuts} ({lost})" if rows else "not run"
        if errors:
            pcell += f", {errors} trial(s) failed to run"
        cells = []
        for b in batches:
            f = bench.get((e, b))
            cells.append(f"{float(f['commits_s']):.0f}, {float(f['events_s']):.0f}, "
                         f"{f['p50_ms']}/{f['p99_ms']}" if f else "n/a")
        rss = max((float(f["peak_rss_mb"]) for (be, _), f in bench.items() if be == e),
                  default=None)
        print(f"| {e} | {pcell} | {opened}/{cuts} | " + " | ".join(cells)
              + f" | {rss if rss is not None else 'n/a'} | "
              f"{mb(size.get((e, 'x86_64')))} / {mb(size.get((e, 'aarch64')))} |")

    if pc:
        print("\nPower-cut trials (each a fresh cutfs; cuts accumulate within a trial):\n")
        print("| engine | metadata | cut | cuts | acked | lost (worst cut) | failed cuts "
              "| opened ok | torn pages kept | dropped pages | notes |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in pc:
            if "error" in r:
                print(f"| {r['engine']} | {r['metadata']} | {'torn' if r['torn'] else 'plain'} "
                      f"| - | - | - | - | - | - | - | {r['error']} |")
                continue
            notes = "; ".join(r["notes"])[:200].replace("|", "/")
            print(f"| {r['engine']} | {r['metadata']} | {'torn' if r['torn'] else 'plain'} "
                  f"| {r['cuts']} | {r['acked']} | {r['lost_max']} | {r['failed_cuts']} "
                  f"| {r['opened_ok']} | {r['torn_pages']} | {r.get('dropped_pages', '')} "
                  f"| {notes} |")

    if bench:
        print("\nIngest benches (one process per row; a commit = N records of 300 B + a device "
              "state + the counter, durable before the next):\n")
        print("| engine | batch | commits | commits/s | events/s | p50 ms | p99 ms | peak RSS MB |")
        print("|---|---|---|---|---|---|---|---|")
        for (e, b), f in sorted(bench.items(), key=lambda kv: (engines.index(kv[0][0]),
                                                                kv[0][1])):
            print(f"| {e} | {b} | {f['commits']} | {f['commits_s']} | {f['events_s']} "
                  f"| {f['p50_ms']} | {f['p99_ms']} | {f['peak_rss_mb']} |")

    if size:
        print("\nRelease binary (stripped, LTO, one engine each), bytes:\n")
        print("| engine | x86_64 | aarch64 |")
        print("|---|---|---|")
        for e in [e for e in engines if any(k[0] == e for k in size)]:
            print(f"| {e} | {size.get((e, 'x86_64'), 'n/a')} | {size.get((e, 'aarch64'), 'n/a')} |")


if __name__ == "__main__":
    main()

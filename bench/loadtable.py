#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
"""The table of bench/run-space's compact-load section.

  loadtable.py CONFIG=RESULT.json... [--names CONFIG=NAME...]

Each RESULT.json is one run of tests/compact-load.py with --json; runs of
the same CONFIG are pooled.  The CONFIG "none" (compact-after-unmaps=0) is
the baseline: all of its requests count.  For the others, the requests
that overlapped a background compaction count ("during compaction").
Prints a Markdown table: p50, p99 and max latency in ms of reads, writes
and flushes, the p99 of writes against the baseline's, then the file
size when the load stopped (every run), the compaction's duration, and
the longest time compaction held something a client request could wait
for (the plugin's own figures: io_lock held or wanted exclusively, the
image lock, writes held by a move, compaction's flush).
"""

import json
import re
import statistics
import sys


def percentile(values, p):
    v = sorted(values)
    return v[min(len(v) - 1, int(len(v) * p / 100))] if v else None


def plural(kind):
    return kind + ("es" if kind == "flush" else "s")


def fmt(x, nd=2):
    if x is None:
        return "-"
    return f"{x:.{nd}f}" if x < 100 else f"{x:,.0f}"


def main():
    args = sys.argv[1:]
    names = {}
    if "--names" in args:
        i = args.index("--names")
        for a in args[i + 1:]:
            k, _, v = a.partition("=")
            names[k] = v
        args = args[:i]
    runs = {}
    for a in args:
        cfg, _, path = a.partition("=")
        with open(path) as f:
            runs.setdefault(cfg, []).append(json.load(f))
    cfgs = list(runs)
    if "none" in cfgs:
        cfgs.remove("none")
        cfgs.insert(0, "none")

    # Requests: the latency file has only summaries per run, so pool the
    # raw lists where present, else use the per-run summaries.
    def pooled(cfg, kind):
        part = "all" if cfg == "none" else "during"
        vals = []
        for r in runs[cfg]:
            vals += r.get("raw", {}).get(kind, {}).get(part, [])
        return vals

    head = ["", *(names.get(c, c) for c in cfgs)]
    rows = []
    for kind in ("read", "write", "flush"):
        for stat in ("p50", "p99", "max"):
            row = [f"{plural(kind)}: {stat} (ms)"]
            for c in cfgs:
                v = pooled(c, kind)
                x = (max(v) if v else None) if stat == "max" else \
                    percentile(v, 50 if stat == "p50" else 99)
                row.append(fmt(x, 3 if x is not None and x < 1 else 2))
            rows.append(row)
        row = [f"{plural(kind)} counted"]
        for c in cfgs:
            row.append(f"{len(pooled(c, kind)):,}")
        rows.append(row)
    base = percentile(pooled("none", "write"), 99) if "none" in runs else None
    row = ["writes: p99 / p99 without compaction"]
    for c in cfgs:
        v = percentile(pooled(c, "write"), 99)
        row.append("-" if c == "none" or not base or v is None else f"{v / base:.2f}")
    rows.append(row)
    row = ["file size when the load stopped (MiB), each run"]
    for c in cfgs:
        row.append(" ".join(str(r["size_end"] >> 20) for r in runs[c]))
    rows.append(row)
    row = ["compaction's duration (s), median [min–max]"]
    for c in cfgs:
        d = [e - s for r in runs[c] for s, e in r["compactions"]]
        row.append("-" if not d else
                   f"{statistics.median(d):.2f} [{min(d):.2f}–{max(d):.2f}]")
    rows.append(row)
    for key, label in (("io_lock exclusive", "longest io_lock held or wanted exclusively (ms)"),
                       ("image lock", "longest image lock hold in a batch (ms)"),
                       ("writes held", "longest wait of writes held by a move (ms)"),
                       ("flush", "longest flush of compaction's own (ms)")):
        row = [label]
        for c in cfgs:
            vals = []
            for r in runs[c]:
                for rep in r["reports"]:
                    m = re.search(re.escape(key) + r" ([\d.]+) ms", rep)
                    if m:
                        vals.append(float(m.group(1)))
            row.append(fmt(max(vals), 1) if vals else "-")
        rows.append(row)
    print("| " + " | ".join(head) + " |")
    print("|---|" + "---:|" * len(cfgs))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()

#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
"""Helpers for bench/run.

  report.py metric FIO.json
      Print "VALUE<TAB>UNIT<TAB>LABEL" for one fio run (JSON output, one
      group-reported job): IOPS for blocks under 1 MiB, MiB/s otherwise;
      LABEL is the section's description.

  report.py table RESULTS.tsv
      Print the Markdown table of the median of each workload and server,
      with the servers' peak RSS, then a table of the spread of the runs.

  report.py versus RESULTS.tsv
      Print a Markdown table of the plugin against qemu-nbd: the median
      [min-max] of each, the speed-up (for unit "s", lower is better:
      qemu-nbd's time / the plugin's; otherwise the plugin's value /
      qemu-nbd's), the target speed-up and whether it was met, and each
      server's peak RSS.

  report.py figures RESULTS.tsv
      Print a Markdown table of the median [min-max] of each row (one
      server).

RESULTS.tsv has one line per run: row, server, run, value (or FAIL), unit,
label, peak RSS in KiB (or -), and optionally the target speed-up (or -).
"""

import json
import statistics
import sys

SERVERS = [("plugin", "plugin"), ("filter", "filter (over file)"),
           ("qemu", "qemu-nbd"), ("raw", "raw (file plugin)")]


def parse_size(text):
    suffixes = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower()
    if text and text[-1] in suffixes:
        return int(text[:-1]) * suffixes[text[-1]]
    return int(text)


def metric(path):
    with open(path) as f:
        job = json.load(f)["jobs"][0]
    if job["error"]:
        sys.exit(f"{path}: fio reported error {job['error']}")
    opts = job["job options"]
    done = [job[d] for d in ("read", "write") if job[d]["io_bytes"]]
    if not done:
        sys.exit(f"{path}: no I/O was done")
    if parse_size(opts["bs"]) < 1 << 20:       # mixed: reads + writes
        value, unit = sum(d["iops"] for d in done), "IOPS"
    else:
        value, unit = sum(d["bw_bytes"] for d in done) / (1 << 20), "MiB/s"
    print(f"{value:.1f}\t{unit}\t{opts['description']}")


def fmt(value):
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def fmt_fine(value):
    """Three significant digits below 100 (times can be small)."""
    if value >= 100 or value == int(value):
        return f"{value:,.0f}"
    return f"{value:.3g}" if value >= 0.001 else f"{value:.2g}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.2f}"


def read_results(path):
    """Return (rows, fails, rss): rows maps workload -> {"label", "unit",
    server -> [values]}, in file order; fails maps (workload, server) -> the
    number of failed runs; rss maps (server, unit) -> peak RSS in KiB."""
    rows, fails, rss = {}, {}, {}
    with open(path) as f:
        for line in f:
            w, server, _run, value, unit, label, rss_kib = \
                line.rstrip("\n").split("\t")[:7]
            row = rows.setdefault(w, {"label": w, "unit": "-"})
            if value == "FAIL":
                fails[w, server] = fails.get((w, server), 0) + 1
            else:
                row.setdefault(server, []).append(float(value))
                row["label"], row["unit"] = label, unit
            if rss_kib != "-":
                key = server, row["unit"]
                rss[key] = max(rss.get(key, 0), int(rss_kib))
    return rows, fails, rss


def markdown(head, lines):
    return ["| " + " | ".join(head) + " |",
            "|" + "---|" + "---:|" * (len(head) - 1)] + \
           ["| " + " | ".join(cells) + " |" for cells in lines]


def table(path):
    rows, fails, rss = read_results(path)
    # Only the servers that ran (BENCH_SERVERS may choose some).
    present = {server for row in rows.values() for server in row} | \
              {server for _, server in fails} | {server for server, _ in rss}
    servers = [(s, name) for s, name in SERVERS if s in present]
    names = [name for _, name in servers]
    main, spread = [], []
    pairs = [(a, b, f"{an}/{bn}") for a, b, an, bn in
             [("plugin", "qemu", "plugin", "qemu-nbd"),
              ("plugin", "raw", "plugin", "raw"),
              ("filter", "plugin", "filter", "plugin")]
             if a in present and b in present]

    def ratios(med):
        return [ratio(med.get(a), med.get(b)) for a, b, _ in pairs]

    for row_id, row in rows.items():
        label = row["label"] if row["unit"] == "-" else \
            f"{row['label']} ({row['unit']})"
        med, cells, ranges = {}, [], []
        for server, _ in servers:
            values = row.get(server, [])
            failed = fails.get((row_id, server), 0)
            med[server] = statistics.median(values) \
                if values and not failed else None
            if failed:
                cells.append(f"FAIL ({failed}/{failed + len(values)})")
            else:
                cells.append(fmt(med[server]) if values else "–")
            ranges.append(f"{fmt(min(values))}–{fmt(max(values))}"
                          if values else "–")
        main.append([label] + cells + ratios(med))
        spread.append([label] + ranges)

    def rss_row(label, units):
        med = {}
        for server, _ in servers:
            kib = [rss[server, u] for u in units if (server, u) in rss]
            med[server] = max(kib) / 1024 if kib else None
        main.append([label] +
                    [f"{med[s]:.1f}" if med[s] is not None else "–"
                     for s, _ in servers] + ratios(med))

    units = sorted({u for _, u in rss})
    rss_row("peak RSS, MiB (lower is better)", units)
    if "IOPS" in units and len(units) > 1:
        rss_row("peak RSS in the 4k workloads, MiB", ["IOPS"])

    out = markdown(["workload"] + names + [name for _, _, name in pairs],
                   main)
    out += ["", "Spread over the runs (min–max):", ""]
    out += markdown(["workload"] + names, spread)
    print("\n".join(out))


def read_rows(path):
    """Return rows: row -> {"label", "unit", "target", "runs",
    server -> [values], (server, "fail") -> count, (server, "rss") -> KiB}
    in file order."""
    rows = {}
    with open(path) as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            fields += ["-"] * (8 - len(fields))
            r, server, run, value, unit, label, rss_kib, target = fields[:8]
            row = rows.setdefault(r, {"label": label, "unit": unit,
                                      "target": target, "runs": 0})
            row["runs"] = max(row["runs"], int(run))
            if value == "FAIL":
                row[server, "fail"] = row.get((server, "fail"), 0) + 1
            else:
                row.setdefault(server, []).append(float(value))
                row["unit"] = unit
            if rss_kib != "-":
                row[server, "rss"] = max(row.get((server, "rss"), 0), int(rss_kib))
    return rows


def cell(row, server):
    """(median or None, "median [min-max]" or FAIL/- text)."""
    values = row.get(server, [])
    failed = row.get((server, "fail"), 0)
    if failed:
        return None, f"FAIL ({failed}/{failed + len(values)})"
    if not values:
        return None, "–"
    med = statistics.median(values)
    text = fmt_fine(med)
    if len(values) > 1:
        text += f" [{fmt_fine(min(values))}–{fmt_fine(max(values))}]"
    return med, text


def rss_cell(row, server):
    kib = row.get((server, "rss"))
    return "–" if kib is None else f"{kib / 1024:.1f}"


def unit_label(row):
    return row["label"] if row["unit"] == "-" else \
        f"{row['label']} ({row['unit']})"


def versus(path):
    rows = read_rows(path).values()
    # qemu-unmap: qemu-nbd --discard=unmap, a reference in some rows.
    unmap = any("qemu-unmap" in row or ("qemu-unmap", "fail") in row
                for row in rows)
    # floor: bench/floor.c, an nbdkit plugin that does no work: the best
    # any nbdkit plugin can do, and its speed-up the best one possible.
    floor = any("floor" in row or ("floor", "fail") in row for row in rows)
    # raw: nbdkit's file plugin on the same data in a raw file.
    raw = any("raw" in row or ("raw", "fail") in row for row in rows)

    def speedup(row, p, q):
        return ratio(q, p) if row["unit"] == "s" else ratio(p, q)

    lines = []
    for row in rows:
        p, p_text = cell(row, "plugin")
        q, q_text = cell(row, "qemu")
        s = speedup(row, p, q)
        if row["target"] == "-":
            target = met = "–"
        else:
            target = f"≥ {row['target']}"
            met = "–" if s == "–" else \
                "yes" if float(s) >= float(row["target"]) else "**no**"
        line = [unit_label(row), p_text, q_text, s, target, met]
        if unmap:
            u, u_text = cell(row, "qemu-unmap")
            line += [u_text, speedup(row, p, u)]
        if raw:
            w, w_text = cell(row, "raw")
            line += [w_text, speedup(row, p, w)]
        if floor:
            f, f_text = cell(row, "floor")
            line += [f_text, speedup(row, f, q)]
        lines.append(line + [rss_cell(row, "plugin"), rss_cell(row, "qemu")])
    head = ["", "plugin", "qemu-nbd", "speed-up", "target", "met"]
    if unmap:
        head += ["qemu-nbd --discard=unmap", "speed-up vs it"]
    if raw:
        head += ["raw (file plugin)", "vs raw"]
    if floor:
        head += ["nbdkit floor", "floor's speed-up"]
    print("\n".join(markdown(
        head + ["plugin peak RSS, MiB", "qemu-nbd peak RSS, MiB"], lines)))


def figures(path):
    lines = []
    for row in read_rows(path).values():
        servers = [k for k in row if isinstance(k, str) and
                   k not in ("label", "unit", "target", "runs")] + \
                  [k[0] for k in row if isinstance(k, tuple) and k[1] == "fail"]
        for server in dict.fromkeys(servers):
            lines.append([unit_label(row), cell(row, server)[1]])
    print("\n".join(markdown(["", "median [min–max]"], lines)))


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "metric":
        metric(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "table":
        table(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "versus":
        versus(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "figures":
        figures(sys.argv[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()

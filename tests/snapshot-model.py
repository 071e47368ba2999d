#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
"""snapshot-model.py - qcow-tool snapshot against QEMU, on a model.

For each image format (cluster sizes 512 B to 2 MiB, refcount widths,
version 2, zstd compression, extended L2 entries, a qcow2 and a raw
backing file), a seeded random sequence of steps, each done by qcow-tool
or by QEMU (qemu-img snapshot, qemu-io) in turn:

  write     data, zeros, trims and compressed clusters, through QEMU or
            through the plugin (nbdkit, so the core's copy on write of
            clusters and tables shared with snapshots is exercised)
  create    a snapshot; the model keeps the disk as it was
  apply     a snapshot: the active disk must become it (and its size)
  delete    a snapshot
  grow      the virtual size (qcow-tool resize)

After every step:
  - qemu-img check: no errors and no leaks;
  - qcow-tool snapshot -l prints exactly what qemu-img snapshot -l prints;
  - the active disk reads as the model says (qemu-img compare);
  - every snapshot reads as it was when created, both as QEMU reads it
    (qemu-img convert -l snapshot.name=...) and as qcow-tool does (sha -l),
    and qcow-tool snapshot -l --json agrees with qemu-img info.
At the end: qcow-tool compact, and all of the above again.

Environment: QCOW_TOOL, QCOW_SO, TMPD (from tests/functions.sh), SEED.
"""

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys

TOOL = os.environ["QCOW_TOOL"]
SO = os.environ["QCOW_SO"]
TMPD = os.environ["TMPD"]
SEED = int(os.environ.get("SEED", "1"))
STEPS = int(os.environ.get("SNAPSHOT_STEPS", "7"))
ENV = dict(os.environ)
ENV.pop("LD_PRELOAD", None)


def run(*cmd, ok=(0,), capture=True):
    p = subprocess.run(cmd, stdout=subprocess.PIPE if capture else None,
                       stderr=subprocess.STDOUT, env=ENV, cwd=TMPD)
    if p.returncode not in ok:
        out = p.stdout.decode(errors="replace") if capture else ""
        sys.exit(f"FAIL (seed {SEED}): {' '.join(cmd)} exited {p.returncode}\n{out}")
    return p.stdout.decode(errors="replace") if capture else ""


def sha_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha_padded(path, size):
    """SHA-256 of PATH's contents cut or padded with zeros to SIZE."""
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while n < size:
            block = f.read(min(1 << 20, size - n))
            if not block:
                break
            h.update(block)
            n += len(block)
    zero = bytes(1 << 20)
    while n < size:
        k = min(len(zero), size - n)
        h.update(zero[:k])
        n += k
    return h.hexdigest()


class Image:
    def __init__(self, name, opts, backing, rng):
        self.name, self.rng = name, rng
        # With 2-bit refcounts compressed clusters sharing a host cluster
        # leave no room for a snapshot's reference (QEMU refuses too).
        self.compress = "refcount_bits=2" not in opts
        self.path = os.path.join(TMPD, name + ".qcow2")
        self.cs = 65536
        for o in opts.split(","):
            if o.startswith("cluster_size="):
                v = o.split("=")[1]
                self.cs = int(v[:-1]) << {"k": 10, "M": 20}[v[-1]] if v[-1] in "kM" else int(v)
        self.size = 8 << 20
        args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts]
        if backing:
            base = os.path.join(TMPD, name + "-base." + backing)
            if backing == "raw":
                with open(base, "wb") as f:
                    f.write(bytes(rng.randrange(1, 255) for _ in range(4096)) * 1024)
            else:
                run("qemu-img", "create", "-q", "-f", "qcow2", base, str(self.size))
                run("qemu-io", "-f", "qcow2", "-c", "write -P 0x99 0 6M", base)
            args += ["-b", os.path.basename(base), "-F", backing]
        run(*args, self.path, str(self.size))
        self.snaps = {}            # name -> (raw file, size)
        self.counter = 0
        self.write("qemu")

    # ---- the model's view of the active disk
    def active_raw(self):
        path = os.path.join(TMPD, self.name + "-active.raw")
        run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", self.path, path)
        return path

    # ---- steps
    def write(self, who):
        cmds = []
        for _ in range(self.rng.randint(2, 5)):
            kind = self.rng.random()
            cluster = self.rng.randrange(self.size // self.cs)
            off = cluster * self.cs
            if kind < 0.45:
                n = min(self.rng.choice([512, 4096, 3 * self.cs + 1024]), self.size - off)
                cmds.append(f"write -P {self.rng.randrange(1, 255)} {off} {n}")
            elif kind < 0.6:
                cmds.append(f"write -z {off} {min(self.cs, self.size - off)}")
            elif kind < 0.75:
                cmds.append(f"discard {off} {min(2 * self.cs, self.size - off)}")
            elif who == "qemu" and off + self.cs <= self.size and self.compress:
                # A compressed cluster (QEMU writes those only where
                # nothing is allocated yet, else it fails: not ours).
                cmds.append(f"write -c -P {self.rng.randrange(1, 255)} {off} {self.cs}")
        args = []
        for c in cmds:
            args += ["-c", c]
        if who == "qemu":
            # qemu-io stops at a failed command (a compressed write over
            # an allocated cluster): run them one by one, ignoring those.
            for c in cmds:
                run("qemu-io", "-f", "qcow2", "-c", c, self.path, ok=(0, 1))
        else:
            inner = " ".join(f"-c '{c}'" for c in cmds)
            run("nbdkit", "-U", "-", SO, f"file={self.path}", "--run",
                f"qemu-io -f raw {inner} \"$uri\" >/dev/null")
        return f"write ({who}): {'; '.join(cmds)}"

    def create(self, who):
        self.counter += 1
        name = f"s{self.counter}-{who}"
        raw = os.path.join(TMPD, f"{self.name}-{name}.raw")
        shutil.copy(self.active_raw(), raw)
        if who == "tool":
            run(TOOL, "snapshot", "-c", name, self.path)
        else:
            run("qemu-img", "snapshot", "-c", name, self.path)
        self.snaps[name] = (raw, self.size)
        return f"create {name} ({who})"

    def apply(self, who):
        name = self.rng.choice(sorted(self.snaps))
        if who == "tool":
            run(TOOL, "snapshot", "-a", name, self.path)
        else:
            run("qemu-img", "snapshot", "-a", name, self.path)
        raw, size = self.snaps[name]
        self.size = size
        active = self.active_raw()
        if sha_file(active) != sha_padded(raw, size):
            sys.exit(f"FAIL (seed {SEED}): {self.name}: after applying {name} "
                     f"({who}) the disk is not the snapshot")
        return f"apply {name} ({who})"

    def delete(self, who):
        name = self.rng.choice(sorted(self.snaps))
        if who == "tool":
            run(TOOL, "snapshot", "-d", name, self.path)
        else:
            run("qemu-img", "snapshot", "-d", name, self.path)
        os.unlink(self.snaps.pop(name)[0])
        return f"delete {name} ({who})"

    def grow(self, who):
        self.size += 1 << 20
        run(TOOL, "resize", self.path, str(self.size))
        return f"grow to {self.size} (tool)"

    # ---- the checks
    def verify(self, what):
        out = subprocess.run(["qemu-img", "check", "-f", "qcow2", self.path],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)
        if out.returncode != 0:
            sys.exit(f"FAIL (seed {SEED}): {self.name}: qemu-img check exits "
                     f"{out.returncode} after: {what}\n{out.stdout.decode()[-3000:]}")
        ours = run(TOOL, "snapshot", "-l", self.path)
        theirs = run("qemu-img", "snapshot", "-l", self.path)
        if ours != theirs:
            sys.exit(f"FAIL (seed {SEED}): {self.name}: after {what}\n"
                     f"qemu-img snapshot -l:\n{theirs}qcow-tool snapshot -l:\n{ours}")
        info = json.loads(run("qemu-img", "info", "--output=json", self.path))
        listed = json.loads(run(TOOL, "snapshot", "-l", "--json", self.path))
        want = [(s["id"], s["name"], s["date-sec"], s["date-nsec"], s["vm-state-size"],
                 s.get("icount")) for s in info.get("snapshots", [])]
        got = [(s["id"], s["name"], s["date-sec"], s["date-nsec"], s["vm-state-size"],
                s.get("icount")) for s in listed]
        if want != got:
            sys.exit(f"FAIL (seed {SEED}): {self.name}: snapshot -l --json {got} != qemu-img info {want}")
        if info["virtual-size"] != self.size:
            sys.exit(f"FAIL (seed {SEED}): {self.name}: size {info['virtual-size']} != {self.size}")
        for name, (raw, size) in sorted(self.snaps.items()):
            # QEMU reads a snapshot with the image's current size.
            qraw = os.path.join(TMPD, self.name + "-qemu-view.raw")
            run("qemu-img", "convert", "-f", "qcow2", "-l", f"snapshot.name={name}",
                "-O", "raw", self.path, qraw)
            want = sha_padded(raw, self.size)
            if sha_file(qraw) != want:
                sys.exit(f"FAIL (seed {SEED}): {self.name}: QEMU reads snapshot {name} "
                         f"differently after: {what}")
            got = run(TOOL, "sha", "-l", name, self.path).split()[0]
            if got != want:
                sys.exit(f"FAIL (seed {SEED}): {self.name}: qcow-tool reads snapshot "
                         f"{name} differently after: {what}")
            os.unlink(qraw)


FORMATS = [
    ("c512", "cluster_size=512", None),
    ("c4k-rc2", "cluster_size=4096,refcount_bits=2", None),
    ("c64k-lazy", "cluster_size=65536,lazy_refcounts=on", None),
    ("c64k-rc64-zstd", "cluster_size=65536,refcount_bits=64,compression_type=zstd", None),
    ("c64k-v2", "cluster_size=65536,compat=0.10", "qcow2"),
    ("c64k-extl2", "cluster_size=65536,extended_l2=on", "raw"),
    ("c2M", "cluster_size=2M,refcount_bits=8", None),
]


def main():
    rng = random.Random(SEED)
    only = sys.argv[1:]
    for name, opts, backing in FORMATS:
        if only and name not in only:
            continue
        img = Image(name, opts, backing, rng)
        print(f"== {name} ({opts}{', backing ' + backing if backing else ''})", flush=True)
        img.verify("creation")
        who = rng.choice(["tool", "qemu"])
        for step in range(STEPS):
            choices = ["write", "create", "create"]
            if img.snaps:
                choices += ["apply", "delete", "write"]
            if step == STEPS // 2 and not (img.snaps and "compat=0.10" in opts):
                choices = ["grow"]      # (QEMU cannot resize v2 with snapshots)
            if step == 0:
                choices = ["create"]
            action = rng.choice(choices)
            who = "qemu" if who == "tool" else "tool"
            if name == "c4k-rc2" and action == "create" and len(img.snaps) >= 1:
                action = "write"          # 2-bit refcounts: one snapshot at most
            what = getattr(img, action)(who)
            print("  " + what, flush=True)
            img.verify(what)
        run(TOOL, "compact", img.path)
        img.verify("compact")
        for f in os.listdir(TMPD):
            if f.startswith(name + "-") or f.startswith(name + "."):
                os.unlink(os.path.join(TMPD, f))
    print("PASS")


main()

# SPDX-License-Identifier: BSD-3-Clause
# aiopool.py - asynchronous NBD workloads over several connections, shared
# by random-model.py and crash-client.py (not a test by itself).
#
# A Pool holds N libnbd handles connected to one server and keeps up to
# DEPTH commands in flight on each, driven by one select() loop.  Commands
# that touch the same bytes are never in flight together: a write (or
# zero, trim, ...) waits for every overlapping command, a read waits for
# overlapping writes.  So for every byte the commands that touch it run
# one after another, in the order they were submitted, and a client can
# keep an exact model of the disk.
#
# Every command gets two ticks of one global clock: when it was issued and
# when its completion was seen.  A flush covers the writes whose
# completion was seen before the flush was issued.

import random
import select

import nbd

# Kinds of command; the exclusive ones may not overlap anything in flight.
READ, WRITE, ZERO, TRIM, FLUSH = "read", "write", "zero", "trim", "flush"
SETTLE = "settle"   # a read that must not overlap anything (see random-model)
EXCLUSIVE = {WRITE, ZERO, TRIM, SETTLE}


class Op:
    """One NBD command."""

    def __init__(self, kind, off=0, count=0, flags=0, data=None, tag=None):
        self.kind = kind
        self.off = off
        self.count = count
        self.flags = flags
        self.data = data        # the bytes of a write
        self.tag = tag          # for the caller
        self.conn = None        # index of the connection it went to
        self.buf = None
        self.issued = None      # clock ticks
        self.done = None
        self.error = None       # nbd.Error if it failed
        self.result = None      # the bytes a read returned

    def __repr__(self):
        f = []
        if self.flags & nbd.CMD_FLAG_FUA:
            f.append("fua")
        if self.flags & nbd.CMD_FLAG_NO_HOLE:
            f.append("no_hole")
        return "%s(off=%d count=%d%s conn=%s)" % (
            self.kind, self.off, self.count,
            "".join(" " + x for x in f), self.conn)

    def overlaps(self, other):
        return (self.kind != FLUSH and other.kind != FLUSH and
                self.off < other.off + other.count and
                other.off < self.off + self.count)


class Pool:
    def __init__(self, sock, nconn, depth, on_done):
        """Connect NCONN handles to the Unix socket SOCK.  ON_DONE(op) is
        called for every command when its completion is seen (op.error set
        if it failed)."""
        self.handles = []
        for i in range(nconn):
            h = nbd.NBD()
            h.set_handle_name("conn%d" % i)
            h.connect_unix(sock)
            self.handles.append(h)
        h = self.handles[0]
        self.size = h.get_size()
        self.can_fua = h.can_fua()
        self.can_flush = h.can_flush()
        self.can_zero = h.can_zero()
        self.can_trim = h.can_trim()
        self.can_multi_conn = h.can_multi_conn()
        self.depth = depth
        self.on_done = on_done
        self.inflight = [{} for _ in self.handles]   # cookie -> Op
        self.dead = [False] * nconn
        self.clock = 0
        self.count = {}                               # kind -> number issued

    def _tick(self):
        self.clock += 1
        return self.clock

    def in_flight(self):
        return sum(len(d) for d in self.inflight)

    def busy(self, op):
        """Would OP conflict with a command in flight?"""
        if op.kind == FLUSH:
            return False
        excl = op.kind in EXCLUSIVE
        for d in self.inflight:
            for o in d.values():
                if (excl or o.kind in EXCLUSIVE) and op.overlaps(o):
                    return True
        return False

    def submit(self, op, conn):
        """Issue OP on connection CONN once it has room and nothing in
        flight conflicts with it."""
        while len(self.inflight[conn]) >= self.depth or self.busy(op):
            self.pump()
        self.issue(op, conn)

    def issue(self, op, conn):
        """Issue OP now (the caller has checked for conflicts)."""
        if self.dead[conn]:
            raise RuntimeError("connection %d is dead" % conn)
        h = self.handles[conn]
        if op.kind in (READ, SETTLE):
            op.buf = nbd.Buffer(op.count)
            cookie = h.aio_pread(op.buf, op.off, flags=op.flags)
        elif op.kind == WRITE:
            op.buf = nbd.Buffer.from_bytearray(op.data)
            cookie = h.aio_pwrite(op.buf, op.off, flags=op.flags)
        elif op.kind == ZERO:
            cookie = h.aio_zero(op.count, op.off, flags=op.flags)
        elif op.kind == TRIM:
            cookie = h.aio_trim(op.count, op.off, flags=op.flags)
        elif op.kind == FLUSH:
            cookie = h.aio_flush()
        else:
            raise ValueError(op.kind)
        op.conn = conn
        op.issued = self._tick()
        self.count[op.kind] = self.count.get(op.kind, 0) + 1
        self.inflight[conn][cookie] = op

    def pump(self, timeout=None):
        """Wait (up to TIMEOUT seconds) for progress, then retire what
        completed.  Returns False if nothing was in flight."""
        rl, wl, conn_of = [], [], {}
        for i, h in enumerate(self.handles):
            if not self.inflight[i]:
                continue
            try:
                fd = h.aio_get_fd()
                d = h.aio_get_direction()
            except nbd.Error as e:      # the connection is already gone
                self._fail_all(i, e)
                continue
            if d & nbd.AIO_DIRECTION_READ:
                rl.append(fd)
            if d & nbd.AIO_DIRECTION_WRITE:
                wl.append(fd)
            conn_of[fd] = i
            if not d:
                self._fail_all(i, nbd.Error("connection is not usable", 0))
        if not rl and not wl:
            return bool(conn_of)
        r, w, _ = select.select(rl, wl, [], timeout)
        for fd in set(r) | set(w):
            i = conn_of[fd]
            h = self.handles[i]
            try:
                if fd in r:
                    h.aio_notify_read()
                if fd in w:
                    h.aio_notify_write()
            except nbd.Error as e:
                self._fail_all(i, e)
                continue
            self._reap(i)
            if h.aio_is_dead():
                self._fail_all(i, nbd.Error("connection died", 0))
        return True

    def _reap(self, i):
        h = self.handles[i]
        for cookie, op in list(self.inflight[i].items()):
            try:
                if not h.aio_command_completed(cookie):
                    continue
            except nbd.Error as e:
                op.error = e
            self._retire(i, cookie, op)

    def _retire(self, i, cookie, op):
        del self.inflight[i][cookie]
        op.done = self._tick()
        if op.kind in (READ, SETTLE) and op.error is None:
            op.result = op.buf.to_bytearray()
        op.buf = None
        self.on_done(op)

    def _fail_all(self, i, err):
        self.dead[i] = True
        for cookie, op in list(self.inflight[i].items()):
            op.error = err
            self._retire(i, cookie, op)

    def drain(self):
        while self.in_flight():
            self.pump()

    def close(self):
        for h in self.handles:
            if not h.aio_is_dead():
                h.shutdown()
        self.handles = []   # the handles close when they are freed


class ExtentPicker:
    """Random (offset, count) pairs inside a disk: tiny to 1 MiB, aligned
    and unaligned, straddling cluster boundaries, at the end of the disk,
    and often in a small "hot" window so that requests meet in the same
    clusters and L2 tables."""

    def __init__(self, rng, size, cluster, maxlen=1 << 20):
        self.rng = rng
        self.size = size
        self.cluster = cluster
        self.maxlen = min(maxlen, size)
        self.hot_len = min(size, max(1 << 20, 8 * cluster))
        self.move_hot()

    def move_hot(self):
        self.hot = self.rng.randrange(self.size - self.hot_len + 1)

    def count(self):
        rng, c = self.rng, self.cluster
        r = rng.random()
        if r < 0.1:
            n = rng.randint(1, 16)
        elif r < 0.35:
            n = rng.randint(1, 4096)
        elif r < 0.55:
            n = 512 * rng.randint(1, 128)
        elif r < 0.75:
            n = c * rng.randint(1, 4)
        else:
            n = rng.randint(1, self.maxlen)
        return max(1, min(n, self.maxlen))

    def extent(self, n=None):
        rng, c = self.rng, self.cluster
        if n is None:
            n = self.count()
        if rng.random() < 0.02:
            self.move_hot()
        if rng.random() < 0.4:
            lo, span = self.hot, self.hot_len
        else:
            lo, span = 0, self.size
        p = lo + rng.randrange(span)
        r = rng.random()
        if r < 0.3:
            off = p
        elif r < 0.5:
            off = p // 512 * 512
        elif r < 0.7:
            off = p // c * c
        elif r < 0.9:
            # Straddle the cluster boundary at or above p.
            b = -(-p // c) * c
            off = b - rng.randint(1, n - 1) if n > 1 else b - 1
        else:
            off = self.size - n - rng.randint(0, 64)
        return max(0, min(off, self.size - n)), n

    def pieces(self):
        """Disjoint extents inside one small aligned region (with gaps),
        to be written concurrently: requests racing for the same new
        cluster."""
        rng = self.rng
        region = min(self.size, max(self.cluster, 4096), self.maxlen)
        start = rng.randrange(self.size // region) * region
        cuts = sorted(rng.sample(range(1, region), min(region - 1, rng.randint(1, 7))))
        bounds = [0] + cuts + [region]
        out = []
        for a, b in zip(bounds, bounds[1:]):
            if rng.random() < 0.8:
                out.append((start + a, b - a))
        rng.shuffle(out)
        return out


def write_data(seed, index, n):
    """Reproducible contents of write number INDEX of a run."""
    return random.Random("%s:%d" % (seed, index)).randbytes(n)

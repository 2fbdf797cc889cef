#!/usr/bin/env python3
"""The soak driver of scripts/soak.sh (#11): mixed hostile load on a running
exporter, and the figures that say whether honest clients were still served.

Phases: first a quiet phase (only the probe), then the storm (every case at
once, the probe still running). The probe is one honest client on its own
address that asks for a 1 MiB range on a fresh TLS connection every
PROBE_EVERY seconds, in a process of its own (the storm's threads would
otherwise hold up its interpreter lock); its times in each phase give
p50/p99 and their ratio, and its slow or failed requests are listed with
the time each step took.

Cases are plain functions in CASES, each run in its own thread(s) until the
storm ends; each counts what happened in `stats` under "<case>:<class>".
Honest cases (the probe, honest downloads, churn) must have no error class;
the others' classes describe how the server pushed back (refused, cut, 408,
429). To add a case: write `def case_x(ctx, stop)` and add it to CASES.

Standard library only (ssl, socket, threading): runs on any host with
Python 3.8+.
"""

import argparse
import json
import multiprocessing
import os
import re
import socket
import ssl
import struct
import sys
import threading
import time
from collections import Counter

PROBE_EVERY = 0.2
# fork: the probe's process inherits the context (token, URL) as it is.
mp = multiprocessing.get_context("fork")
HONEST_PREFIX = ("probe", "honest", "churn")


class Ctx:
    def __init__(self, a):
        self.port = a.port
        self.ca = a.ca
        self.user = a.user
        self.password = a.password
        self.vm = a.vm
        self.disk_size = a.disk_size
        self.stats = Counter()
        self.lock = threading.Lock()
        self.token = None
        self.url = None
        self.probe_times = {"quiet": [], "storm": []}
        # Probes that took 0.5 s or more or failed: (start, phase, outcome,
        # time at the end of each step), printed at the end.
        self.slow = []
        self.knobs = a

    def count(self, key, n=1):
        with self.lock:
            self.stats[key] += n

    def tls(self, alpn=("http/1.1",)):
        c = ssl.create_default_context(cafile=self.ca)
        c.set_alpn_protocols(list(alpn))
        return c


def connect(ctx, src, rcvbuf=None, alpn=("http/1.1",), timeout=30):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.bind((src, 0))
    s.settimeout(timeout)
    s.connect(("127.0.0.1", ctx.port))
    return ctx.tls(alpn).wrap_socket(s, server_hostname="localhost")


def request(method, path, token=None, headers=(), body=b"", close=True):
    h = [f"{method} {path} HTTP/1.1", "Host: localhost"]
    if close:
        h.append("Connection: close")
    if token:
        h.append(f"Authorization: Bearer {token}")
    h += [f"{k}: {v}" for k, v in headers]
    if body or method == "POST":
        h += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(h) + "\r\n\r\n").encode() + body


def read_answer(s):
    """(status, headers dict, body) of one Connection: close answer."""
    raw = b""
    while True:
        try:
            b = s.recv(1 << 20)
        except ssl.SSLEOFError:
            break
        if not b:
            break
        raw += b
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for l in lines[1:]:
        k, _, v = l.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


def call(ctx, src, method, path, token=None, headers=(), body=b""):
    s = connect(ctx, src)
    try:
        s.sendall(request(method, path, token, headers, body))
        return read_answer(s)
    finally:
        s.close()


def classify(e):
    if isinstance(e, socket.timeout):
        return "timeout"
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, (ConnectionResetError, BrokenPipeError, ssl.SSLError, ssl.SSLEOFError)):
        return "reset"
    return type(e).__name__


# ---- honest cases ------------------------------------------------------------


def one_mib(ctx, src, start, steps=None):
    """One 1 MiB range on a fresh connection; `steps` gets the time at which
    each step ended (tcp, tls, sent, first byte, body), to tell where a
    slow one waited."""
    t = time.monotonic()
    steps = steps if steps is not None else {}
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((src, 0))
        s.settimeout(30)
        s.connect(("127.0.0.1", ctx.port))
        steps["tcp"] = time.monotonic() - t
        s = ctx.tls().wrap_socket(s, server_hostname="localhost")
        steps["tls"] = time.monotonic() - t
        s.sendall(request("GET", ctx.url, ctx.token, [("Range", f"bytes={start}-{start + (1 << 20) - 1}")]))
        steps["sent"] = time.monotonic() - t
        first = s.recv(1 << 20)
        steps["first_byte"] = time.monotonic() - t
        class Pre:
            def __init__(self, first, s):
                self.first, self.s = first, s
            def recv(self, n):
                if self.first:
                    b, self.first = self.first, b""
                    return b
                return self.s.recv(n)
        st, h, body = read_answer(Pre(first, s))
        steps["body"] = time.monotonic() - t
    finally:
        s.close()
    took = time.monotonic() - t
    if st != 206 or len(body) != 1 << 20:
        raise RuntimeError(f"http_{st}_len_{len(body)}")
    return took


def case_probe(ctx, stop, out):
    """The measured honest client: a 1 MiB range on a fresh connection.
    Runs in a process of its own (see `Probe`); each result goes to `out`
    as (start time, seconds or None, outcome, step times)."""
    i = 0
    while not stop.is_set():
        start = (i * (1 << 20)) % max(ctx.disk_size - (1 << 20), 1 << 20)
        steps = {}
        at = time.time()
        try:
            took = one_mib(ctx, "127.0.0.2", start, steps)
            out.put((at, took, "ok", steps))
        except Exception as e:  # noqa: BLE001 - every failure is a figure
            out.put((at, None, classify(e) if not isinstance(e, RuntimeError) else str(e), steps))
        i += 1
        stop.wait(PROBE_EVERY)


class Probe:
    """The probe in a process of its own: the storm's clients are threads
    of this one, and a probe sharing their interpreter lock would measure
    how long it waited for it (seconds, with some 90 threads) as much as
    the server. A thread here files its results by phase."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.stop = mp.Event()
        self.out = mp.Queue()
        self.proc = mp.Process(target=case_probe, args=(ctx, self.stop, self.out), daemon=True)
        self.storm_at = None
        self.collector = threading.Thread(target=self.collect, daemon=True)

    def start(self):
        self.proc.start()
        self.collector.start()

    def storm(self):
        self.storm_at = time.time()

    def collect(self):
        ctx = self.ctx
        while True:
            item = self.out.get()
            if item is None:
                return
            at, took, outcome, steps = item
            phase = "storm" if self.storm_at is not None and at >= self.storm_at else "quiet"
            with ctx.lock:
                if took is not None:
                    ctx.probe_times[phase].append(took)
                ctx.stats[f"probe:{outcome}"] += 1
                if took is None or took >= 0.5:
                    ctx.slow.append((at, phase, outcome, steps))

    def finish(self):
        self.stop.set()
        self.proc.join()
        self.out.put(None)
        self.collector.join()


def case_honest(ctx, stop, n):
    """Honest download `n`: the disk in 4 MiB ranges over one kept-alive
    connection, again and again (the Coriolis pattern)."""
    src = f"127.0.1.{n + 1}"
    chunk = 4 << 20
    while not stop.is_set():
        try:
            s = connect(ctx, src)
            f = s.makefile("rb")
            at = 0
            while at < ctx.disk_size and not stop.is_set():
                end = min(at + chunk, ctx.disk_size) - 1
                s.sendall(request("GET", ctx.url, ctx.token, [("Range", f"bytes={at}-{end}")], close=False))
                status = int(f.readline().split()[1])
                length = None
                while True:
                    line = f.readline().strip()
                    if not line:
                        break
                    k, _, v = line.decode("latin-1").partition(":")
                    if k.lower() == "content-length":
                        length = int(v)
                got = len(f.read(length)) if length else 0
                if status != 206 or got != end - at + 1:
                    raise RuntimeError(f"http_{status}_len_{got}")
                ctx.count("honest:bytes", got)
                at = end + 1
            ctx.count("honest:pass")
            s.close()
        except Exception as e:  # noqa: BLE001
            ctx.count(f"honest:{classify(e) if not isinstance(e, RuntimeError) else e}")
            stop.wait(1)


def case_churn(ctx, stop):
    """Snapshot create, diff against the previous one, delete the oldest."""
    kept = []
    base = f"/api/v1/vms/{ctx.vm}/snapshots"
    while not stop.is_set():
        try:
            st, _, body = call(ctx, "127.0.0.4", "POST", base, ctx.token)
            if st != 200:
                raise RuntimeError(f"create_http_{st}")
            sid = json.loads(body)["id"]
            if kept:
                st, _, _ = call(ctx, "127.0.0.4", "GET", f"{base}/{sid}?compareTo={kept[-1]}", ctx.token)
                if st != 200:
                    raise RuntimeError(f"diff_http_{st}")
            kept.append(sid)
            if len(kept) > 3:
                old = kept.pop(0)
                st, _, _ = call(ctx, "127.0.0.4", "DELETE", f"{base}/{old}", ctx.token)
                if st != 200:
                    raise RuntimeError(f"delete_http_{st}")
            ctx.count("churn:ok")
        except Exception as e:  # noqa: BLE001
            ctx.count(f"churn:{classify(e) if not isinstance(e, RuntimeError) else e}")
        stop.wait(1)
    for sid in kept:
        try:
            call(ctx, "127.0.0.4", "DELETE", f"{base}/{sid}", ctx.token)
        except Exception:  # noqa: BLE001
            pass


# ---- hostile cases -------------------------------------------------------------


def case_stalled(ctx, stop):
    """Stalled readers from one address: full-disk GETs that read nothing
    after the head (tiny receive window). Each is replaced by a new one
    after --stall-hold seconds (past the server's send_timeout): the
    server's cut cannot be seen from here (its FIN waits behind the data
    the closed window holds back), and this keeps the count stalled all
    through the storm, not only until the first cuts."""
    held = []  # (socket, opened at)
    while not stop.is_set():
        now = time.monotonic()
        keep = []
        for s, at in held:
            if now - at >= ctx.knobs.stall_hold:
                ctx.count("stalled:replaced")
                s.close()
            else:
                keep.append((s, at))
        held = keep
        while len(held) < ctx.knobs.stalled and not stop.is_set():
            try:
                s = connect(ctx, "127.0.0.10", rcvbuf=4096)
                s.sendall(request("GET", ctx.url, ctx.token))
                s.recv(256)
                held.append((s, time.monotonic()))
                ctx.count("stalled:opened")
            except Exception as e:  # noqa: BLE001
                ctx.count(f"stalled:{classify(e)}")
                break
        stop.wait(5)
    for s, _ in held:
        s.close()


def case_half_sent(ctx, stop):
    """Half-sent logins from one address: headers announcing 1000 bytes of
    body, one byte sent; reopened as the server answers 408 or refuses."""
    held = []
    head = request("POST", "/api/v1/auth/login", close=False)
    head = head.replace(b"Content-Length: 0", b"Content-Length: 1000") + b"{"
    while not stop.is_set():
        opened = 0
        while len(held) < ctx.knobs.half_sent and not stop.is_set() and opened < 256:
            opened += 1
            try:
                s = connect(ctx, "127.0.0.1", timeout=5)
                s.sendall(head)
                held.append(s)
                ctx.count("half_sent:held")
            except Exception as e:  # noqa: BLE001
                ctx.count(f"half_sent:{classify(e)}")
        stop.wait(2)
        alive = []
        for s in held:
            try:
                s.setblocking(False)
                b = s.recv(64)
                ctx.count("half_sent:answered_408" if b.startswith(b"HTTP/1.1 408") else "half_sent:closed")
                s.close()
            except (BlockingIOError, ssl.SSLWantReadError):
                alive.append(s)
            except Exception:  # noqa: BLE001
                ctx.count("half_sent:closed")
                s.close()
        held = alive
    for s in held:
        s.close()


def case_login_burst(ctx, stop):
    """Bursts of 30 wrong-password logins at once from one address."""
    body = json.dumps({"username": ctx.user, "password": "wrong"}).encode()

    def one():
        try:
            st, _, _ = call(ctx, "127.0.0.3", "POST", "/api/v1/auth/login", body=body)
            ctx.count(f"login_burst:http_{st}")
        except Exception as e:  # noqa: BLE001
            ctx.count(f"login_burst:{classify(e)}")

    while not stop.is_set():
        ts = [threading.Thread(target=one) for _ in range(30)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        stop.wait(5)


def h2_frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def hpack_literal(index, value):
    """Literal header field without indexing, name by static index."""
    v = value.encode()
    return bytes([index]) + bytes([len(v)]) + v


def case_h2_reset(ctx, stop):
    """HTTP/2 rapid reset (CVE-2023-44487): HEADERS then RST_STREAM, many
    streams per connection; counts how connections end (GOAWAY)."""
    block = (
        bytes([0x82, 0x87])  # :method GET, :scheme https
        + hpack_literal(0x04, "/api/v1/health")  # :path
        + hpack_literal(0x01, "localhost")  # :authority
    )
    while not stop.is_set():
        try:
            s = connect(ctx, "127.0.0.5", alpn=("h2",), timeout=5)
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + h2_frame(0x4, 0, 0))
            sid = 1
            for _ in range(500):
                s.sendall(h2_frame(0x1, 0x5, sid, block) + h2_frame(0x3, 0, sid, struct.pack(">I", 8)))
                sid += 2
            ctx.count("h2_reset:streams", 500)
            s.settimeout(5)
            data = b""
            while True:
                b = s.recv(65536)
                if not b:
                    break
                data += b
                if len(data) > 1 << 20:
                    break
            ctx.count("h2_reset:goaway" if b"\x07" in data else "h2_reset:closed")
            s.close()
        except Exception as e:  # noqa: BLE001
            ctx.count(f"h2_reset:{classify(e)}")
        stop.wait(1)


def honest_cases(ctx):
    return [(f"honest-{n}", lambda stop, n=n: case_honest(ctx, stop, n)) for n in range(ctx.knobs.honest)] + [
        ("churn", lambda stop: case_churn(ctx, stop)),
    ]


# The storm: name -> function(ctx, stop). Other issues add theirs here.
CASES = {
    "stalled": case_stalled,
    "half_sent": case_half_sent,
    "login_burst": case_login_burst,
    "h2_reset": case_h2_reset,
}


# ---- figures -------------------------------------------------------------------


def proc(pid):
    """(RSS, descriptors, RSS by kind: anon, file, threads) of the server."""
    rss, kinds = 0, {}
    with open(f"/proc/{pid}/status") as f:
        for l in f:
            k = l.split(":")[0]
            if k == "VmRSS":
                rss = int(l.split()[1]) * 1024
            elif k in ("RssAnon", "RssFile", "RssShmem"):
                kinds[k] = int(l.split()[1]) * 1024
            elif k == "Threads":
                kinds[k] = int(l.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return rss, fds, kinds


# glibc makes each non-main arena's heap a mapping aligned to HEAP_MAX_SIZE
# (64 MiB on 64-bit): an anonymous mapping that starts there is an arena.
ARENA_ALIGN = 64 << 20


def anon_by_mapping(pid):
    """The server's anonymous resident memory by the kind of mapping that
    holds it: {kind: (bytes, mappings)}. Kinds: `heap` (the main arena,
    [heap]), `arenas` (glibc's other arenas, one per thread that needed
    one, up to 8 per core), `stacks` (thread stacks: an anonymous mapping
    right above a guard page), `mmap` (other anonymous mappings: large
    blocks such as the io core's read buffers, the runtime's own), `file`
    (private pages of mapped files: relocations, .data, .bss), `stack`
    (the main thread's)."""
    out = {}
    prev_end, prev_guard = None, False
    with open(f"/proc/{pid}/smaps") as f:
        head = None
        for line in f:
            m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ (\d+)\s*(.*)$", line)
            if m:
                start, end = int(m.group(1), 16), int(m.group(2), 16)
                perms, inode, path = m.group(3), int(m.group(4)), m.group(5).strip()
                if path == "[heap]":
                    kind = "heap"
                elif path == "[stack]":
                    kind = "stack"
                elif inode or path.startswith("/"):
                    kind = "file"
                elif path:
                    kind = path  # [vdso], [vvar] and the like
                elif start % ARENA_ALIGN == 0 and "rw" in perms:
                    kind = "arenas"
                elif prev_guard and prev_end == start and "rw" in perms:
                    kind = "stacks"
                else:
                    kind = "mmap"
                head = kind
                prev_guard = perms.startswith("---") and not inode and not path
                prev_end = end
            elif head and line.startswith("Anonymous:"):
                kb = int(line.split()[1])
                b, n = out.get(head, (0, 0))
                out[head] = (b + kb * 1024, n + (1 if kb else 0))
    return out


def fmt_anon(by):
    order = ["heap", "arenas", "stacks", "mmap", "file", "stack"]
    keys = [k for k in order if k in by] + sorted(k for k in by if k not in order)
    return ", ".join(f"{k} {by[k][0] / 2**20:.2f} MiB ({by[k][1]})" for k in keys if by[k][0])


def save_smaps(pid, folder, name):
    if folder:
        os.makedirs(folder, exist_ok=True)
        with open(f"/proc/{pid}/smaps") as f, open(os.path.join(folder, f"{name}.smaps"), "w") as g:
            g.write(f.read())


def cpu_seconds(pid):
    """User + system CPU seconds of the server so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(v, p):
    if not v:
        return float("nan")
    v = sorted(v)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--user", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--vm", required=True)
    ap.add_argument("--disk-size", type=int, required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--quiet-seconds", type=float, required=True)
    ap.add_argument("--honest", type=int, default=16)
    ap.add_argument("--stalled", type=int, default=64)
    ap.add_argument("--half-sent", type=int, default=1024)
    # 15 s: tokio keeps an idle blocking-pool thread 10 s after its last
    # task (thread_keep_alive); settling less counts the storm's idle
    # threads (their stacks) as growth.
    ap.add_argument("--settle", type=float, default=15)
    ap.add_argument("--warmup", type=float, default=10)
    ap.add_argument("--warmup-storm", type=float, default=20)
    ap.add_argument("--stall-hold", type=float, default=130)
    # A folder to save the server's /proc/PID/smaps in at the start, mid-storm
    # and end (start.smaps, mid.smaps, end.smaps), to diff mapping by mapping.
    ap.add_argument("--smaps", default=None)
    a = ap.parse_args()
    ctx = Ctx(a)

    body = json.dumps({"username": a.user, "password": a.password}).encode()
    st, _, b = call(ctx, "127.0.0.2", "POST", "/api/v1/auth/login", body=body)
    assert st == 200, (st, b)
    ctx.token = json.loads(b)["token"]
    st, _, b = call(ctx, "127.0.0.2", "POST", f"/api/v1/vms/{a.vm}/snapshots", ctx.token)
    assert st == 200, (st, b)
    snap = json.loads(b)
    ctx.url = f"/api/v1/vms/{a.vm}/snapshots/{snap['id']}/disks/{snap['disks'][0]['name']}"

    # Warm-up: the honest downloads alone for a while, then a short storm
    # (every case), then a settle, so that the buffer pool, the allocator
    # and the runtime's tables have seen the storm's peak before the start
    # figures: the end must be within 10% of them, and growth there is then
    # a leak, not a first use.
    def run_for(fns, seconds):
        ev = threading.Event()
        ts = [threading.Thread(target=fn, args=(ev,)) for fn in fns]
        for t in ts:
            t.start()
        time.sleep(seconds)
        ev.set()
        for t in ts:
            t.join(timeout=60)

    run_for([fn for _, fn in honest_cases(ctx)], a.warmup)
    if a.warmup_storm > 0:
        run_for(
            [lambda ev, fn=fn: fn(ctx, ev) for fn in CASES.values()] + [fn for _, fn in honest_cases(ctx)],
            a.warmup_storm,
        )
        time.sleep(a.settle)
    ctx.stats.clear()
    time.sleep(2)
    rss0, fds0, kinds0 = proc(a.pid)
    anon0 = anon_by_mapping(a.pid)
    save_smaps(a.pid, a.smaps, "start")
    load0 = os.getloadavg()
    probe = Probe(ctx)
    probe.start()
    time.sleep(a.quiet_seconds)

    probe.storm()
    cpu0 = cpu_seconds(a.pid)
    stop = threading.Event()
    threads = []
    for name, fn in CASES.items():
        threads.append(threading.Thread(target=fn, args=(ctx, stop), name=name))
    for name, fn in honest_cases(ctx):
        threads.append(threading.Thread(target=fn, args=(stop,), name=name))
    for t in threads:
        t.start()
    storm = a.seconds - a.quiet_seconds
    t0 = time.monotonic()
    mid = None
    anon_mid = None
    while time.monotonic() - t0 < storm:
        time.sleep(1)
        if mid is None and time.monotonic() - t0 > storm / 2:
            mid = proc(a.pid)
            anon_mid = anon_by_mapping(a.pid)
            save_smaps(a.pid, a.smaps, "mid")
    stop.set()
    cpu1 = cpu_seconds(a.pid)
    load1 = os.getloadavg()
    for t in threads:
        t.join(timeout=60)
    # The end figures, like the start ones, are taken with no client at all:
    # the probe stops first (its request every 0.2 s would keep every idle
    # blocking-pool thread of the storm alive, each reused within tokio's
    # 10 s keep-alive), then the server lets go of the storm's connections.
    probe.finish()
    time.sleep(a.settle)
    rss1, fds1, kinds1 = proc(a.pid)
    anon1 = anon_by_mapping(a.pid)
    save_smaps(a.pid, a.smaps, "end")

    q, s = ctx.probe_times["quiet"], ctx.probe_times["storm"]
    print("== soak figures ==")
    print(f"duration: {a.seconds:.0f} s ({a.quiet_seconds:.0f} s quiet, {storm:.0f} s storm)")
    print(f"honest 1 MiB range, quiet: n={len(q)} p50={pct(q, 50) * 1000:.1f} ms p99={pct(q, 99) * 1000:.1f} ms max={max(q or [0]) * 1000:.1f} ms")
    print(f"honest 1 MiB range, storm: n={len(s)} p50={pct(s, 50) * 1000:.1f} ms p99={pct(s, 99) * 1000:.1f} ms max={max(s or [0]) * 1000:.1f} ms")
    if q and s:
        print(f"storm/quiet ratio: p50 x{pct(s, 50) / pct(q, 50):.2f}, p99 x{pct(s, 99) / pct(q, 99):.2f}")
    print(f"storm ranges over 1 s: {sum(1 for t in s if t >= 1.0)}")
    print(f"(start figures after a warm-up: {a.warmup:.0f} s of the honest downloads alone, {a.warmup_storm:.0f} s of the storm, {a.settle:.0f} s of settling)")
    print(f"server RSS: start {rss0 / 2**20:.1f} MiB, mid-storm {mid[0] / 2**20 if mid else float('nan'):.1f} MiB, end {rss1 / 2**20:.1f} MiB")
    print(f"server fds: start {fds0}, mid-storm {mid[1] if mid else 'n/a'}, end {fds1}")
    grown = rss1 > rss0 * 1.1 or fds1 > fds0 * 1.1
    print(f"end within 10% of start: RSS x{rss1 / rss0:.2f}, fds x{fds1 / fds0:.2f}: {'no' if grown else 'yes'}")
    print(f"server CPU in the storm: {cpu1 - cpu0:.0f} s over {storm:.0f} s ({(cpu1 - cpu0) / storm:.2f} of {os.cpu_count()} cores)")
    print(f"load average (1, 5, 15 min): at the start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, at the storm's end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    def kinds(k):
        return ", ".join(f"{n} {v / 2**20:.1f} MiB" if n != "Threads" else f"{n} {v}" for n, v in k.items())
    print(f"server RSS by kind: start {kinds(kinds0)}; mid-storm {kinds(mid[2]) if mid else 'n/a'}; end {kinds(kinds1)}")
    print("server anonymous memory by mapping (MiB, mappings holding some):")
    print(f"  start: {fmt_anon(anon0)}")
    if mid:
        print(f"  mid-storm: {fmt_anon(anon_mid)}")
    print(f"  end: {fmt_anon(anon1)}")
    if ctx.slow:
        print("slow or failed probes (UTC start, phase, outcome, seconds at the end of each step):")
        for at, phase, outcome, steps in ctx.slow:
            st = " ".join(f"{k}={v:.3f}" for k, v in steps.items())
            print(f"  {time.strftime('%H:%M:%S', time.gmtime(at))}.{int(at % 1 * 1000):03d} {phase} {outcome} {st}")
    print("events by case and class:")
    for k in sorted(ctx.stats):
        print(f"  {k}: {ctx.stats[k]}")
    honest_errors = {
        k: v for k, v in ctx.stats.items()
        if k.startswith(HONEST_PREFIX) and not k.endswith((":ok", ":pass", ":bytes"))
    }
    print(f"honest errors: {sum(honest_errors.values())} {dict(honest_errors) if honest_errors else ''}")
    bad = bool(honest_errors) or any(t >= 1.0 for t in s) or grown
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()

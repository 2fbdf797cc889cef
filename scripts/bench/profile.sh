#!/bin/bash
# Where the exporter's CPU goes on one big download, per protocol:
# `perf record -g` on the running release binary while curl pulls
# PROF_GIB (default 4) x 1 GiB over HTTP/1.1 and then over HTTP/2 (PROTOS),
# both servers' warm setup of (a) (the file in the page cache, the exporter
# with direct_io = false; MODE=cold for the default O_DIRECT config). Prints
# the exporter's CPU seconds per GiB and a table of the share of its samples
# by kind (AES-GCM, copies, the kernel's file read, TCP send, scheduling,
# the HTTP stack), then the top symbols. Profiles stay in
# $BENCH_DIR/prof-<proto>.data for `perf report`. Needs perf (Debian:
# linux-perf, installed when missing). BIN=another binary to compare builds.
. "$(dirname "$0")/lib.sh"
need_root; build; setup_fs; certs
trap cleanup EXIT
command -v perf >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q linux-perf >/dev/null
PROF_GIB=${PROF_GIB:-4}
DISK=$(make_disk bench-a.img 1100)
io="direct_io = false"
[ "${MODE:-warm}" = cold ] && io=""
start_exporter "$DISK" "$io
${IO_LINES:-}"
read -r SNAP NAME SNAPFILE < <(snapshot)
url="https://localhost:$EXP_PORT/api/v1/vms/$VM/snapshots/$SNAP/disks/$NAME"
files=()
for proto in $PROTOS; do
	use_proto "$proto"
	[ "${MODE:-warm}" = cold ] || cat "$SNAPFILE" >/dev/null
	perf record -F 1999 -g -p "$EXP_PID" -o "$BENCH_DIR/prof-$proto.data" 2>/dev/null &
	ppid=$!
	sleep 0.5
	c0=$(cpu "$EXP_PID")
	for _ in $(seq "$PROF_GIB"); do
		[ "${MODE:-warm}" = cold ] && { sync; echo 3 >/proc/sys/vm/drop_caches; }
		curl -s "${CIPHER[@]}" --cacert "$BENCH_DIR/ca.pem" -o /dev/null -w "$REPORT_V" \
			-r 0-1073741823 -H "Authorization: Bearer $TOKEN" "$url" >"$BENCH_DIR/prof-report"
		check_report "$BENCH_DIR/prof-report" 1 $((1 << 30)) "$HTTP_VERSION" >/dev/null
	done
	echo "$proto: exporter CPU $(per_gib $(($(cpu "$EXP_PID") - c0)) $((PROF_GIB << 30))) s/GiB under perf; load $(load)"
	kill -INT "$ppid"; wait "$ppid" || true
	files+=("$proto:$BENCH_DIR/prof-$proto.data")
done
python3 - "$BIN" "${files[@]}" <<'PY'
import collections, re, subprocess, sys

def rows(data, binary):
    out = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "dso,symbol",
                          "--stdio", "-g", "none"], capture_output=True, text=True).stdout
    got = []
    for line in out.splitlines():
        m = re.match(r"\s+([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*?)\s*(?:-\s+-\s*)?$", line)
        if m:
            got.append([float(m.group(1)), m.group(2), m.group(3), m.group(4).strip()])
    # Symbols perf could not name (an unindexed copy of a binary): ask addr2line.
    raw = [r for r in got if r[3].startswith("0x") and r[1] != "[kernel.kallsyms]"]
    if raw:
        names = subprocess.run(["addr2line", "-f", "-C", "-e", binary] + [r[3] for r in raw],
                               capture_output=True, text=True).stdout.splitlines()
        for i, r in enumerate(raw):
            r[3] = names[2 * i] if 2 * i < len(names) else r[3]
    return got

def kind(dso, k, s):
    if k != "k" and re.search(r"aes|gcm|ghash", s, re.I):
        return "AES-GCM (aws-lc)"
    if "memmove" in s or "memcpy" in s:
        return "memcpy (rustls record, HTTP/2 coalescing)"
    if k == "k":
        if re.search(r"_copy_to_iter|copy_page_to_iter|filemap|folio|xas_|iomap|xfs_|blk_|bio_", s):
            return "kernel: file read"
        if re.search(r"finish_task_switch|schedule|wake_up|futex|_raw_spin_unlock|pick_next|enqueue|"
                     r"dequeue|update_curr|select_task|ttwu|__pv_queued", s):
            return "kernel: scheduling, wakeups"
        if re.search(r"_copy_from_iter|tcp|skb|sock|writev|__check_object_size|ip_|net_|softirq|"
                     r"__dev|loopback|inet|sk_|kmem_cache|page_frag|fdget", s):
            return "kernel: TCP send"
        return "kernel: other"
    if re.search(r"malloc|free|_int_|realloc", s):
        return "malloc, free"
    if re.search(r"^(h2|hyper|tokio|rustls|bytes|coriolis|http)", s):
        return "h2, hyper, tokio, rustls, exporter code"
    return "other user code"

binary, profiles = sys.argv[1], [a.split(":", 1) for a in sys.argv[2:]]
tables = {name: rows(data, binary) for name, data in profiles}
shares = {name: collections.Counter() for name in tables}
for name, rs in tables.items():
    for p, dso, k, s in rs:
        shares[name][kind(dso, k, s)] += p
names = list(tables)
kinds = sorted({k for c in shares.values() for k in c}, key=lambda k: -shares[names[0]][k])
print("| share of the exporter's samples | " + " | ".join(names) + " |")
print("| --- |" + " --- |" * len(names))
for k in kinds:
    print(f"| {k} | " + " | ".join(f"{shares[n][k]:.1f}%" for n in names) + " |")
for n in names:
    print(f"\n{n}: top symbols")
    for p, dso, k, s in tables[n][:12]:
        print(f"  {p:5.2f}%  {s[:80]}")
PY

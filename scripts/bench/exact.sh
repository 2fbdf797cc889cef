#!/bin/bash
# Exact deltas (issue #19): over-report of a diff by extent maps without and
# with refinement by content, and the refinement's cost, on XFS (reflink)
# and btrfs.
#
# Part 1 runs the diff property tests of tests/fs_core.rs on fresh
# loop-mounted filesystems made here and prints their figure lines, for two
# workloads: mixed (random writes of 1 B to 1 MiB, punches, zero ranges and
# appends between two reflink clones of a random sparse file; odd seeds add
# content-preserving remaps) and random 4 KiB writes (4 KiB-aligned writes
# of 4 or 8 KiB into a dense file, a database-like guest):
#   over-report = reported bytes / bytes of truly changed 4 KiB blocks
#   cost        = seconds spent refining / GiB of candidates read per snapshot
#                 (two such reads: older and newer; debug test build)
# For OCFS2 the same tests run in the QEMU guest (scripts/ocfs2/tests.sh:
# `ocfs2_guest::diff_*random_4k*`, `ocfs2_guest::diff_exact_*` and, on the
# guest's second OCFS2 with 128 KiB clusters, `ocfs2_guest::clusters_128k_*`).
#
# Part 2 is the cost in a release build, through the service: `demo --dir`
# on an XFS whose loop device reads its image with direct I/O (so reads
# reach the machine's disk, not the page cache), its 1 GiB disk filled with
# random data, snapshot 1, the disk rewritten in place with its own bytes
# (every block moves, none changes: 1 GiB of candidates, all dropped) plus
# 256 random 4 KiB writes, snapshot 2; then GET ...?compareTo=S1 with
# exact=false and three times with exact=true, each timed by curl, and the
# refinement's own time and bytes from the coe_exact_* counters of /metrics.
#
# Knobs: EXACT_SEEDS (default 16) trials per filesystem and mode;
# EXACT_PARTS (default "1 2"); EXACT_BIN, the binary part 2 runs (default:
# target/release/coriolis-ovm-exporter, built here), to compare two builds.
# Needs root (loop mounts), xfsprogs, btrfs-progs and curl (scripts/deps.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."

seeds=${EXACT_SEEDS:-16}
parts=${EXACT_PARTS:-1 2}
work=$(mktemp -d /tmp/coe-exact.XXXXXX)
demo=
cleanup() {
  if [ -n "$demo" ]; then
    kill "$demo" 2>/dev/null
    wait "$demo" 2>/dev/null
  fi
  umount "$work/xfs" 2>/dev/null || true
  umount "$work/btrfs" 2>/dev/null || true
  umount "$work/cost" 2>/dev/null || true
  [ -n "${loop:-}" ] && losetup -d "$loop" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

load() { uptime | sed 's/.*load average/load average/'; }

part1() {
  mkdir -p "$work/xfs" "$work/btrfs"
  truncate -s 3G "$work/xfs.img" "$work/btrfs.img"
  mkfs.xfs -q -m reflink=1 "$work/xfs.img"
  mkfs.btrfs -q "$work/btrfs.img" >/dev/null
  mount -o loop "$work/xfs.img" "$work/xfs"
  mount -o loop "$work/btrfs.img" "$work/btrfs"

  echo "== exact deltas: $seeds seeds per filesystem and mode ($(nproc) cores, $(uptime | sed 's/.*load average/load average/'))"
  COE_TEST_XFS="$work/xfs" COE_TEST_BTRFS="$work/btrfs" COE_PROPTEST_SEEDS="$seeds" \
    cargo test --locked --test tests -- --test-threads=1 --nocapture \
    fs_core::diff_never_misses_a_changed_byte_xfs \
    fs_core::diff_never_misses_a_changed_byte_btrfs \
    fs_core::diff_exact_never_misses_a_changed_byte_xfs \
    fs_core::diff_exact_never_misses_a_changed_byte_btrfs \
    fs_core::diff_never_misses_a_changed_byte_btrfs_compressed \
    fs_core::diff_exact_never_misses_a_changed_byte_btrfs_compressed \
    fs_core::diff_random_4k_writes_xfs \
    fs_core::diff_random_4k_writes_btrfs \
    fs_core::diff_exact_random_4k_writes_xfs \
    fs_core::diff_exact_random_4k_writes_btrfs \
    --exact 2>&1 | grep -oE 'diff property.*|test result.*' | sed 's/^/  /'
}

# GET with the token; prints curl's total time in seconds.
timed_get() {
  curl -sS --fail --cacert "$ca" -H "Authorization: Bearer $token" \
    -o "$work/answer.json" -w '%{time_total}' "$url$1"
}

metric() {
  curl -sS --fail --cacert "$ca" "$url/metrics" | awk -v m="$1" '$1 == m {print $2}'
}

snapshot() {
  curl -sS --fail --cacert "$ca" -H "Authorization: Bearer $token" -X POST \
    "$url/api/v1/vms/$1/snapshots" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])'
}

# random_writes DISK COUNT SEED: COUNT writes of 4 KiB of random bytes at
# random 4 KiB-aligned offsets, then fsync.
random_writes() {
  python3 - "$@" <<'PY'
import os, random, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
blocks = os.fstat(fd).st_size // 4096
rng = random.Random(int(sys.argv[3]))
for _ in range(int(sys.argv[2])):
    os.pwrite(fd, rng.randbytes(4096), 4096 * rng.randrange(blocks))
os.fsync(fd)
os.close(fd)
PY
}

answer_bytes() {
  python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(sum(c["length"] for x in d["disks"] for c in x["chunks"]))' "$work/answer.json"
}

# measure VM OLD NEW: the diff unrefined once, refined three times.
measure() {
  local path="/api/v1/vms/$1/snapshots/$3?compareTo=$2&zeroed=separate"
  local t i d0 c0 sv0 s0 d1 c1 sv1 s1
  t=$(timed_get "$path&exact=false")
  echo "    exact=false: answered in $t s, $(answer_bytes) bytes to copy ($(load))"
  for i in 1 2 3; do
    d0=$(metric coe_exact_diffs_total) c0=$(metric coe_exact_candidate_bytes_total)
    sv0=$(metric coe_exact_bytes_saved_total) s0=$(metric coe_exact_seconds_total)
    t=$(timed_get "$path&exact=true")
    d1=$(metric coe_exact_diffs_total) c1=$(metric coe_exact_candidate_bytes_total)
    sv1=$(metric coe_exact_bytes_saved_total) s1=$(metric coe_exact_seconds_total)
    python3 - "$t" "$(answer_bytes)" "$((d1 - d0))" "$((c1 - c0))" "$((sv1 - sv0))" "$s0" "$s1" "$(load)" <<'PY'
import sys
t, chunks, diffs, cand, saved, s0, s1, load = sys.argv[1:]
secs = float(s1) - float(s0)
gib = int(cand) / 2**30
print(f"    exact=true:  answered in {t} s, {chunks} bytes to copy; {diffs} diff(s) refined: "
      f"{int(cand)} candidate bytes read from each snapshot in {secs:.3f} s = "
      f"{secs / gib:.2f} s per GiB of candidates ({2 * int(cand) / secs / 1e6:.0f} MB/s read); "
      f"{int(saved)} bytes saved ({load})")
PY
  done
}

part2() {
  echo "== exact deltas: cost in a release build ($(nproc) cores, $(load))"
  local bin=${EXACT_BIN:-}
  if [ -z "$bin" ]; then
    cargo build --release --locked --bin coriolis-ovm-exporter 2>&1 | tail -1
    bin=target/release/coriolis-ovm-exporter
  fi
  echo "  binary: $bin"
  mkdir -p "$work/cost"
  truncate -s 4G "$work/cost.img"
  mkfs.xfs -q -m reflink=1 "$work/cost.img"
  loop=$(losetup -f --show --direct-io=on "$work/cost.img")
  mount "$loop" "$work/cost"
  local port=$((30000 + RANDOM % 20000))
  "$bin" demo --dir "$work/cost" --port "$port" >"$work/demo.out" 2>"$work/demo.err" &
  demo=$!
  for _ in $(seq 120); do
    grep -q '^Try, in another shell' "$work/demo.out" 2>/dev/null && break
    sleep 0.5
  done
  grep -q '^Try, in another shell' "$work/demo.out" || {
    echo "the demo did not start:" >&2
    cat "$work/demo.err" >&2
    exit 1
  }
  url=$(awk '/^url:/ {print $2}' "$work/demo.out")
  ca=$(awk '/^ca-file:/ {print $2}' "$work/demo.out")
  local password repo disk name vm
  password=$(awk '/^password:/ {print $2}' "$work/demo.out")
  repo=$(awk '/^repository:/ {print $2}' "$work/demo.out")
  disk=$(ls -S "$repo"/VirtualDisks/*.img | head -1)
  name=$(basename "$disk")
  vm=$(grep -F "$name" "$work/demo.out" | awk '/disk\(s\)/ {print $1; exit}')
  token=$(curl -sS --fail --cacert "$ca" -H 'Content-Type: application/json' \
    -d "{\"username\":\"demo\",\"password\":\"$password\"}" "$url/api/v1/auth/login" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
  local size s1 s2
  size=$(stat -c %s "$disk")
  dd if=/dev/urandom of="$disk" bs=1M count=$((size >> 20)) conv=notrunc,fsync status=none
  s1=$(snapshot "$vm")
  dd if="$disk" of="$disk" bs=1M conv=notrunc,fsync status=none
  random_writes "$disk" 256 19
  s2=$(snapshot "$vm")
  echo "  $name, $((size >> 20)) MiB rewritten with its own bytes + 256 random 4 KiB writes:"
  measure "$vm" "$s1" "$s2"
  random_writes "$disk" 4096 1919
  local s3
  s3=$(snapshot "$vm")
  echo "  then 4096 random 4 KiB writes (scattered 4 KiB candidates on XFS):"
  measure "$vm" "$s2" "$s3"
  kill "$demo"
  wait "$demo" 2>/dev/null || true
  demo=
}

for p in $parts; do
  "part$p"
done

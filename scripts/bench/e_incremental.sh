#!/bin/bash
# (e) Transferring a diff of 100,000 scattered 4 KiB changes: one
# incremental stream vs one `Range` request per changed chunk (the Python
# client's pattern, all over one kept-alive connection), each timed from the
# request that computes the diff (the per-chunk client first GETs the
# snapshot with compareTo) to the last byte. Both write to /dev/null: this
# measures the transfer, the part that differs. Every timed request writes
# its status and body size (REPORT): a non-2xx answer or a body short of
# what the diff asked for fails the run. E_DISK_MIB sizes the disk (default
# 2048).
. "$(dirname "$0")/lib.sh"
need_root; build; setup_fs; certs
trap cleanup EXIT
CHANGES=${CHANGES:-100000}
E_DISK_MIB=${E_DISK_MIB:-2048}
DISK=$(make_disk bench-e.img "$E_DISK_MIB")
start_exporter "$DISK" "${IO_LINES:-}"
read -r OLD NAME _ < <(snapshot)
python3 - "$DISK" "$CHANGES" <<'PY'
import os, random, sys
path, n = sys.argv[1], int(sys.argv[2])
blocks = os.path.getsize(path) // 4096
random.seed(6)
fd = os.open(path, os.O_WRONLY)
for b in random.sample(range(blocks), n):
    os.pwrite(fd, os.urandom(4096), b * 4096)
os.fsync(fd); os.close(fd)
PY
read -r NEW _ _ < <(snapshot)
BASE="https://localhost:$EXP_PORT/api/v1/vms/$VM/snapshots/$NEW"
api "$BASE?compareTo=$OLD" >"$BENCH_DIR/diff.json"
# One section per chunk; write-out per section: curl's exit status reports
# only the last URL of a -K file, the REPORT lines report every one.
# fail-early is global: the first error ends the run with its status.
python3 - "$BENCH_DIR/diff.json" "$BASE/disks/$NAME" "$TOKEN" "$BENCH_DIR/ca.pem" "$REPORT" >"$BENCH_DIR/per-chunk.curl" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))["disks"][0]
print("fail-early")
first = True
for c in d["chunks"]:
    if not first:
        print("next")
    first = False
    print(f'url = "{sys.argv[2]}"\nrange = "{c["start"]}-{c["start"] + c["length"] - 1}"\n'
          f'output = "/dev/null"\nheader = "Authorization: Bearer {sys.argv[3]}"\n'
          f'cacert = "{sys.argv[4]}"\nfail\nhttp1.1\ntlsv1.3\ntls13-ciphers = "TLS_AES_128_GCM_SHA256"\nsilent\n'
          f'write-out = "{sys.argv[5]}"')
PY
CHUNKS=$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["disks"][0]["chunks"]))' "$BENCH_DIR/diff.json")
CHUNK_BYTES=$(python3 -c 'import json,sys; print(sum(c["length"] for c in json.load(open(sys.argv[1]))["disks"][0]["chunks"]))' "$BENCH_DIR/diff.json")
# Bytes the stream must carry as data: the chunks less the zeroed ranges
# (sent as zero records).
DATA_BYTES=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1]))["disks"][0]; print(sum(c["length"] for c in d["chunks"]) - sum(z["length"] for z in d.get("zeroed") or []))' "$BENCH_DIR/diff.json")
inc=(); per=(); inc_bytes=0
for _ in $(seq "$RUNS"); do
	t0=$(date +%s.%N)
	api "${CIPHER[@]}" -o /dev/null -w "$REPORT" "$BASE/disks/$NAME/incremental?compareTo=$OLD" >"$BENCH_DIR/inc-report"
	t1=$(date +%s.%N)
	api "${CIPHER[@]}" -o /dev/null -w "$REPORT" "$BASE?compareTo=$OLD" >"$BENCH_DIR/diff-report"
	curl -K "$BENCH_DIR/per-chunk.curl" >"$BENCH_DIR/per-chunk-report"
	t2=$(date +%s.%N)
	# The stream holds the changed bytes plus its framing: never fewer.
	inc_bytes=$(check_report "$BENCH_DIR/inc-report" 1)
	[ "$inc_bytes" -ge "$DATA_BYTES" ] || { echo "the stream sent $inc_bytes bytes for $DATA_BYTES changed" >&2; exit 1; }
	check_report "$BENCH_DIR/diff-report" 1 >/dev/null
	check_report "$BENCH_DIR/per-chunk-report" "$CHUNKS" "$CHUNK_BYTES" >/dev/null
	inc+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')")
	per+=("$(awk -v a="$t1" -v b="$t2" 'BEGIN{print b-a}')")
done
i=$(printf '%s\n' "${inc[@]}" | median); p=$(printf '%s\n' "${per[@]}" | median)
echo "(e) chunks in the diff: $CHUNKS, $CHUNK_BYTES bytes (the stream: $inc_bytes bytes with its framing)"
echo "(e) incremental stream s: ${inc[*]}"
echo "(e) one request per chunk s: ${per[*]}"
echo "(e) median stream ${i}s, per chunk ${p}s, speed-up $(ratio "$p" "$i")x (target >= 20x)"

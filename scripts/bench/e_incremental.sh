#!/bin/bash
# (e) Transferring a diff of 100,000 scattered 4 KiB changes: one
# incremental stream vs one `Range` request per changed chunk (the Python
# client's pattern, all over one kept-alive connection), each timed from the
# request that computes the diff (the per-chunk client first GETs the
# snapshot with compareTo) to the last byte. Both write to /dev/null: this
# measures the transfer, the part that differs.
. "$(dirname "$0")/lib.sh"
need_root; build; setup_fs; certs
trap cleanup EXIT
CHANGES=${CHANGES:-100000}
DISK=$(make_disk bench-e.img 2048)
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
python3 - "$BENCH_DIR/diff.json" "$BASE/disks/$NAME" "$TOKEN" "$BENCH_DIR/ca.pem" >"$BENCH_DIR/per-chunk.curl" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))["disks"][0]
first = True
for c in d["chunks"]:
    if not first:
        print("next")
    first = False
    print(f'url = "{sys.argv[2]}"\nrange = "{c["start"]}-{c["start"] + c["length"] - 1}"\n'
          f'output = "/dev/null"\nheader = "Authorization: Bearer {sys.argv[3]}"\n'
          f'cacert = "{sys.argv[4]}"\nfail\nhttp1.1\ntlsv1.3\ntls13-ciphers = "TLS_AES_128_GCM_SHA256"\nsilent')
print(len(d["chunks"]), file=sys.stderr)
PY
inc=(); per=()
for _ in $(seq "$RUNS"); do
	t0=$(date +%s.%N)
	api "${CIPHER[@]}" -o /dev/null "$BASE/disks/$NAME/incremental?compareTo=$OLD"
	t1=$(date +%s.%N)
	api "${CIPHER[@]}" -o /dev/null "$BASE?compareTo=$OLD"
	curl -K "$BENCH_DIR/per-chunk.curl"
	t2=$(date +%s.%N)
	inc+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')")
	per+=("$(awk -v a="$t1" -v b="$t2" 'BEGIN{print b-a}')")
done
i=$(printf '%s\n' "${inc[@]}" | median); p=$(printf '%s\n' "${per[@]}" | median)
echo "(e) chunks in the diff: $(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["disks"][0]["chunks"]))' "$BENCH_DIR/diff.json")"
echo "(e) incremental stream s: ${inc[*]}"
echo "(e) one request per chunk s: ${per[*]}"
echo "(e) median stream ${i}s, per chunk ${p}s, speed-up $(ratio "$p" "$i")x (target >= 20x)"

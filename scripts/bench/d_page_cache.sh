#!/bin/bash
# (d) Page-cache growth (/proc/meminfo Cached, after drop_caches) while
# streaming a 4 GiB snapshot through the exporter, O_DIRECT on vs off.
. "$(dirname "$0")/lib.sh"
need_root; build; setup_fs; certs
trap cleanup EXIT
D_DISK_MIB=${D_DISK_MIB:-4096}
DISK=$(make_disk bench-d.img "$D_DISK_MIB")
cached() { awk '/^Cached:/ {print $2}' /proc/meminfo; }
measure() {
	start_exporter "$DISK" "direct_io = $1"
	read -r SNAP NAME _ < <(snapshot)
	sync; echo 3 >/proc/sys/vm/drop_caches
	local before after out code bytes secs
	before=$(cached)
	out=$(api "${CIPHER[@]}" -o /dev/null -w '%{http_code} %{size_download} %{time_total}' \
		"https://localhost:$EXP_PORT/api/v1/vms/$VM/snapshots/$SNAP/disks/$NAME")
	after=$(cached)
	read -r code bytes secs <<<"$out"
	printf '%s %s\n' "$code" "$bytes" >"$BENCH_DIR/d-report"
	check_report "$BENCH_DIR/d-report" 1 $((D_DISK_MIB << 20)) >/dev/null
	echo "(d) direct_io=$1: Cached grew $(((after - before) / 1024)) MiB while streaming $D_DISK_MIB MiB ($(awk -v b="$bytes" -v s="$secs" 'BEGIN{printf "%.0f", b/s/1e6}') MB/s)"
	stop_exporter
}
measure true
measure false

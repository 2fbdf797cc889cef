#!/bin/bash
# (d) Page-cache growth (/proc/meminfo Cached, after drop_caches) while
# streaming a 4 GiB snapshot through the exporter, O_DIRECT on vs off.
. "$(dirname "$0")/lib.sh"
need_root; build; setup_fs; certs
trap cleanup EXIT
DISK=$(make_disk bench-d.img 4096)
cached() { awk '/^Cached:/ {print $2}' /proc/meminfo; }
measure() {
	start_exporter "$DISK" "direct_io = $1"
	read -r SNAP NAME _ < <(snapshot)
	sync; echo 3 >/proc/sys/vm/drop_caches
	local before after speed
	before=$(cached)
	speed=$(api "${CIPHER[@]}" -o /dev/null -w '%{speed_download}' \
		"https://localhost:$EXP_PORT/api/v1/vms/$VM/snapshots/$SNAP/disks/$NAME")
	after=$(cached)
	echo "(d) direct_io=$1: Cached grew $(((after - before) / 1024)) MiB while streaming 4096 MiB ($(awk -v x="$speed" 'BEGIN{printf "%.0f", x/1e6}') MB/s)"
	stop_exporter
}
measure true
measure false

#!/bin/bash
# The incremental stream on loopback, no shaping (issue #14: "(ii) is not
# slower than today"): the full-copy stream of a snapshot pulled with curl
# to /dev/null, as format 1 (what a client asking nothing gets, today's
# stream), format 2 (`version=2`: zero blocks) and format 2 with zstd
# (`compress=zstd`), from two server binaries in the same run, interleaved
# (BIN_A, BIN_B; default: BIN_A is $MAIN_BIN if set, else this tree's
# release build, and BIN_B this tree's release build). Disks: 512 MiB of
# random data (incompressible: what zstd costs when it cannot win) and,
# when WAN_LO_GUEST names one, a copy of a guest image (e.g. wan.sh's
# $BENCH_DIR/fs/repo/VirtualDisks/guest.img). Prints medians of RUNS and
# the load average before each case.
BENCH_DIR=${BENCH_DIR:-/tmp/coe-bench-wanlo}
BENCH_FS_SIZE=${BENCH_FS_SIZE:-8G}
EXP_PORT=${EXP_PORT:-25747}
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
RUNS=${RUNS:-3}
need_root
build
BIN_B=${BIN_B:-$BIN}
BIN_A=${BIN_A:-${MAIN_BIN:-$BIN}}
setup_fs
certs
trap cleanup EXIT

DISKS=("$(make_disk wan-lo-random.img 512)")
if [ -n "${WAN_LO_GUEST:-}" ]; then
	g=$BENCH_DIR/fs/repo/VirtualDisks/wan-lo-guest.img
	[ -f "$g" ] || cp --sparse=always "$WAN_LO_GUEST" "$g"
	DISKS+=("$g")
fi

for disk in "${DISKS[@]}"; do
	declare -A T=()
	declare -A L=()
	for run in $(seq "$RUNS"); do
		for which in A B; do
			[ "$which" = A ] && BIN=$BIN_A || BIN=$BIN_B
			start_exporter "$disk"
			read -r SNAP NAME _ < <(snapshot)
			url="https://localhost:$EXP_PORT/api/v1/vms/$VM/snapshots/$SNAP/disks/$NAME/incremental"
			for q in "" "?version=2" "?compress=zstd"; do
				L[$which$q]+="$(cut -d' ' -f1 /proc/loadavg) "
				t=$(api "${CIPHER[@]}" -o /dev/null -w '%{time_total} %{size_download}' "$url$q")
				T[$which$q]+="${t%% *} "
				log "$(basename "$disk") $which ${q:-(format 1)} run $run: $t"
			done
			api -X DELETE "https://localhost:$EXP_PORT/api/v1/vms/$VM/snapshots/$SNAP" >/dev/null || true
			stop_exporter
		done
	done
	echo "$(basename "$disk") ($(du -h "$disk" | cut -f1) allocated), full-copy stream on loopback, medians of $RUNS ($(date -u '+%F %H:%M') UTC):"
	for q in "" "?version=2" "?compress=zstd"; do
		for which in A B; do
			printf '  %s %-16s %6.2f s   load %s\n' "$which" "${q:-format 1}" \
				"$(printf '%s\n' ${T[$which$q]} | median)" "$(printf '%s\n' ${L[$which$q]} | median)"
		done
	done
	unset T L
done
echo "A: $BIN_A"
echo "B: $BIN_B"

#!/bin/bash
# (a) One HTTPS connection reading one 1 GiB range: the exporter vs nginx
# serving the same snapshot file, same certificate, cipher and client
# (curl). Both servers read the same source in each mode, as in (b):
#   warm: both from the page cache (the file was read once before each
#         run); the exporter with direct_io = false, since O_DIRECT by
#         definition cannot use the cache.
#   cold: both from the disk, caches dropped before each run; the exporter
#         in its default config (O_DIRECT), nginx buffered.
# Prints each run's MB/s (bytes received / curl's transfer time), the
# medians and the ratio per mode. A non-2xx answer or a short body fails
# the run. MODES="warm cold" picks some; A_DISK_MIB and A_RANGE_MIB size
# the disk and the range (defaults 1100 and 1024); IO_LINES adds [io] lines.
. "$(dirname "$0")/lib.sh"
need_root; build; setup_fs; certs
trap cleanup EXIT
MODES=${MODES:-warm cold}
A_DISK_MIB=${A_DISK_MIB:-1100}
A_RANGE_MIB=${A_RANGE_MIB:-1024}
DISK=$(make_disk bench-a.img "$A_DISK_MIB")
RANGE_BYTES=$((A_RANGE_MIB << 20))
RANGE="0-$((RANGE_BYTES - 1))"
# One timed GET of $RANGE; prints MB/s from the bytes received.
run() {
	local out code bytes secs
	out=$(curl -s "${CIPHER[@]}" --cacert "$BENCH_DIR/ca.pem" -o /dev/null \
		-w '%{http_code} %{size_download} %{time_total}\n' -r "$RANGE" "$@")
	read -r code bytes secs <<<"$out"
	printf '%s %s\n' "$code" "$bytes" >"$BENCH_DIR/a-report"
	check_report "$BENCH_DIR/a-report" 1 "$RANGE_BYTES" >/dev/null
	awk -v b="$bytes" -v s="$secs" 'BEGIN {printf "%.0f\n", b / s / 1e6}'
}
prepare() {
	if [ "$1" = cold ]; then sync; echo 3 >/proc/sys/vm/drop_caches; else cat "$SNAPFILE" >/dev/null; fi
}
for mode in $MODES; do
	case $mode in
	warm) io="direct_io = false" ;;
	cold) io="" ;;
	*) echo "unknown mode $mode" >&2; exit 2 ;;
	esac
	start_exporter "$DISK" "$io
${IO_LINES:-}"
	read -r SNAP NAME SNAPFILE < <(snapshot)
	start_nginx "$(dirname "$SNAPFILE")"
	exp=(); ngx=()
	for _ in $(seq "$RUNS"); do
		prepare "$mode"
		exp+=("$(run -H "Authorization: Bearer $TOKEN" "https://localhost:$EXP_PORT/api/v1/vms/$VM/snapshots/$SNAP/disks/$NAME")")
		prepare "$mode"
		ngx+=("$(run "https://localhost:$NGINX_PORT/$(basename "$SNAPFILE")")")
	done
	e=$(printf '%s\n' "${exp[@]}" | median); n=$(printf '%s\n' "${ngx[@]}" | median)
	echo "(a) $mode: exporter MB/s: ${exp[*]}"
	echo "(a) $mode: nginx    MB/s: ${ngx[*]}"
	echo "(a) $mode: median exporter $e MB/s, nginx $n MB/s, ratio exporter/nginx $(ratio "$e" "$n")"
	stop_nginx
done

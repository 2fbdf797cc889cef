#!/bin/bash
# (a) One HTTPS connection reading one 1 GiB range: the exporter vs nginx
# serving the same snapshot file, same certificate, cipher and client
# (curl), over HTTP/1.1 and HTTP/2 (PROTOS="h1 h2"; nginx with http2
# enabled). Both servers read the same source in each mode, as in (b):
#   warm: both from the page cache (the file was read once before each
#         run); the exporter with direct_io = false, since O_DIRECT by
#         definition cannot use the cache.
#   cold: both from the disk, caches dropped before each run; the exporter
#         in its default config (O_DIRECT), nginx buffered.
# Prints each run's MB/s (bytes received / curl's transfer time), the
# medians and the ratio per mode and protocol, each server's CPU seconds
# per GiB sent (user + system from /proc/<pid>/stat, nginx's workers
# summed), the exporter's HTTP/2 ÷ HTTP/1.1 speed, its peak RSS, and the
# load average beside each line. A non-2xx answer, a short body or another
# protocol than asked fails the run. MODES="warm cold" picks some;
# A_DISK_MIB and A_RANGE_MIB size the disk and the range (defaults 1100 and
# 1024); IO_LINES adds [io] lines.
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
	local out code bytes secs version
	out=$(curl -s "${CIPHER[@]}" --cacert "$BENCH_DIR/ca.pem" -o /dev/null \
		-w '%{http_code} %{size_download} %{time_total} %{http_version}\n' -r "$RANGE" "$@")
	read -r code bytes secs version <<<"$out"
	printf '%s %s %s\n' "$code" "$bytes" "$version" >"$BENCH_DIR/a-report"
	check_report "$BENCH_DIR/a-report" 1 "$RANGE_BYTES" "$HTTP_VERSION" >/dev/null
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
	eurl="https://localhost:$EXP_PORT/api/v1/vms/$VM/snapshots/$SNAP/disks/$NAME"
	nurl="https://localhost:$NGINX_PORT/$(basename "$SNAPFILE")"
	declare -A emed=()
	for proto in $PROTOS; do
		use_proto "$proto"
		exp=(); ngx=(); ecpu=0; ncpu=0; loads=()
		for _ in $(seq "$RUNS"); do
			loads+=("$(load | cut -d' ' -f1)")
			prepare "$mode"
			c0=$(cpu "$EXP_PID")
			exp+=("$(run -H "Authorization: Bearer $TOKEN" "$eurl")")
			ecpu=$((ecpu + $(cpu "$EXP_PID") - c0))
			prepare "$mode"
			# shellcheck disable=SC2086
			c0=$(cpu $NGINX_WORKERS)
			ngx+=("$(run "$nurl")")
			# shellcheck disable=SC2086
			ncpu=$((ncpu + $(cpu $NGINX_WORKERS) - c0))
		done
		e=$(printf '%s\n' "${exp[@]}" | median); n=$(printf '%s\n' "${ngx[@]}" | median)
		emed[$proto]=$e
		sent=$((RUNS * RANGE_BYTES))
		echo "(a) $mode $proto: exporter MB/s: ${exp[*]}"
		echo "(a) $mode $proto: nginx    MB/s: ${ngx[*]}"
		echo "(a) $mode $proto: median exporter $e MB/s, nginx $n MB/s, ratio exporter/nginx $(ratio "$e" "$n"); CPU s/GiB exporter $(per_gib "$ecpu" "$sent"), nginx $(per_gib "$ncpu" "$sent"); load (1 min) at each run: ${loads[*]}"
	done
	if [ -n "${emed[h1]:-}" ] && [ -n "${emed[h2]:-}" ]; then
		echo "(a) $mode: exporter HTTP/2 / HTTP/1.1: $(ratio "${emed[h2]}" "${emed[h1]}") (target >= 0.95)"
	fi
	echo "(a) $mode: exporter peak RSS (VmHWM) $(($(hwm "$EXP_PID") / 1024)) MiB"
	unset emed
	stop_nginx
done

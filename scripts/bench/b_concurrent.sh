#!/bin/bash
# (b) 16 concurrent connections, each pulling consecutive 4 MiB ranges over
# one kept-alive connection (one curl process each), aggregate throughput,
# exporter vs nginx, over HTTP/1.1 and HTTP/2 (PROTOS="h1 h2"; nginx with
# http2 enabled), with each server's CPU seconds per GiB sent; and (c) the
# exporter's peak RSS (VmHWM) during (b), target <= 48 MiB with the
# default config (the cold and default modes run it).
#
# Both servers must read the same source for the ratio to mean anything,
# so (b) is measured three ways, each against nginx in the same run:
#   warm:    both from the page cache (the file was read once): the exporter
#            with direct_io = false, as O_DIRECT by definition cannot use
#            the cache. Measures the serving path: TLS, HTTP, copies.
#   cold:    both from the disk, caches dropped before each run: the
#            exporter in its default config (O_DIRECT), nginx buffered with
#            the kernel's read-ahead.
#   default: the exporter's default (O_DIRECT, from the disk) against nginx
#            from the warm page cache: the disk against RAM, printed with
#            the disk's own ceiling (fio, O_DIRECT, no TLS, no network) so
#            it is clear which one binds.
# MODES="warm cold default" picks some; IO_LINES adds [io] lines to all;
# B_DISK_MIB sizes the disk (default 2048). Rates are the bytes actually
# received over the wall time; any non-2xx answer, missing answer, short
# body or another protocol than asked fails the run. Each line says the
# load average at its runs (the machine is shared).
. "$(dirname "$0")/lib.sh"
need_root; build; setup_fs; certs
trap cleanup EXIT
CONNS=${CONNS:-16}
PER_CONN=${PER_CONN:-32} # 4 MiB requests per connection per run
MODES=${MODES:-warm cold default}
B_DISK_MIB=${B_DISK_MIB:-2048}
DISK=$(make_disk bench-b.img "$B_DISK_MIB")
# One curl per connection, PER_CONN ranges each (curl reuses the
# connection between URLs of one invocation), one REPORT line per range
# in $BENCH_DIR/b-report.<c>. --fail-early: the first error ends the curl
# with its status instead of the last URL's.
pull() {
	local url=$1 c=$2; shift 2
	local args=() i start
	for i in $(seq 0 $((PER_CONN - 1))); do
		start=$(( ((c * PER_CONN + i) % (B_DISK_MIB / 4)) << 22 ))
		args+=(-r "$start-$((start + (1 << 22) - 1))" -o /dev/null -w "$REPORT_V" "$url")
		[ "$i" -lt $((PER_CONN - 1)) ] && args+=(--next "${CIPHER[@]}" --cacert "$BENCH_DIR/ca.pem" "$@")
	done
	curl -s --fail-early "${CIPHER[@]}" --cacert "$BENCH_DIR/ca.pem" "$@" "${args[@]}" >"$BENCH_DIR/b-report.$c"
}
# Prints MB/s of one run of CONNS pulls; its bytes received go to
# $BENCH_DIR/b-bytes (the caller runs it in a subshell).
aggregate() {
	local url=$1; shift
	local t0 t1 c p pids=() bytes=0
	t0=$(date +%s.%N)
	for c in $(seq 0 $((CONNS - 1))); do
		pull "$url" "$c" "$@" &
		pids+=($!)
	done
	# Each pull on its own: a failed curl fails the run (a bare `wait`
	# would not say).
	for p in "${pids[@]}"; do wait "$p"; done
	t1=$(date +%s.%N)
	for c in $(seq 0 $((CONNS - 1))); do
		bytes=$((bytes + $(check_report "$BENCH_DIR/b-report.$c" "$PER_CONN" $((PER_CONN << 22)) "$HTTP_VERSION")))
	done
	echo "$bytes" >"$BENCH_DIR/b-bytes"
	awk -v t0="$t0" -v t1="$t1" -v b="$bytes" 'BEGIN {printf "%.0f\n", b/(t1-t0)/1e6}'
}
# series MODE EXPORTER_IO_LINES COLD WARM_NGINX: for each protocol, RUNS
# alternating runs of both servers; also the CPU time each server spent per
# GiB sent, which the machine's noise disturbs far less than the
# throughput.
hwm_max=0
series() {
	local mode=$1 io=$2 cold=$3 warm_nginx=$4
	start_exporter "$DISK" "$io
${IO_LINES:-}"
	read -r SNAP NAME SNAPFILE < <(snapshot)
	start_nginx "$(dirname "$SNAPFILE")"
	local exp ngx e n hwm ecpu ebytes nbytes ncpu c0 proto loads
	local eurl="https://localhost:$EXP_PORT/api/v1/vms/$VM/snapshots/$SNAP/disks/$NAME"
	local nurl
	nurl="https://localhost:$NGINX_PORT/$(basename "$SNAPFILE")"
	for proto in $PROTOS; do
		use_proto "$proto"
		exp=(); ngx=(); ecpu=0; ncpu=0; ebytes=0; nbytes=0; loads=()
		for _ in $(seq "$RUNS"); do
			loads+=("$(load | cut -d' ' -f1)")
			if [ "$cold" = 1 ]; then sync; echo 3 >/proc/sys/vm/drop_caches; else cat "$SNAPFILE" >/dev/null; fi
			c0=$(cpu "$EXP_PID")
			exp+=("$(aggregate "$eurl" -H "Authorization: Bearer $TOKEN")")
			ebytes=$((ebytes + $(cat "$BENCH_DIR/b-bytes")))
			ecpu=$((ecpu + $(cpu "$EXP_PID") - c0))
			if [ "$cold" = 1 ] && [ "$warm_nginx" = 0 ]; then sync; echo 3 >/proc/sys/vm/drop_caches; else cat "$SNAPFILE" >/dev/null; fi
			# shellcheck disable=SC2086
			c0=$(cpu $NGINX_WORKERS)
			ngx+=("$(aggregate "$nurl")")
			nbytes=$((nbytes + $(cat "$BENCH_DIR/b-bytes")))
			# shellcheck disable=SC2086
			ncpu=$((ncpu + $(cpu $NGINX_WORKERS) - c0))
		done
		e=$(printf '%s\n' "${exp[@]}" | median); n=$(printf '%s\n' "${ngx[@]}" | median)
		echo "(b) $mode $proto: exporter MB/s: ${exp[*]}"
		echo "(b) $mode $proto: nginx    MB/s: ${ngx[*]}"
		echo "(b) $mode $proto: median exporter $e MB/s, nginx $n MB/s, ratio exporter/nginx $(ratio "$e" "$n"); CPU s/GiB exporter $(per_gib "$ecpu" "$ebytes"), nginx $(per_gib "$ncpu" "$nbytes"); load (1 min) at each run: ${loads[*]}"
	done
	hwm=$(hwm "$EXP_PID")
	[ "$hwm" -gt "$hwm_max" ] && hwm_max=$hwm
	echo "(c) $mode: exporter peak RSS (VmHWM) $((hwm / 1024)) MiB"
	stop_nginx
}
for mode in $MODES; do
	case $mode in
	warm) series warm "direct_io = false" 0 1 ;;
	cold) series cold "" 1 0 ;;
	default)
		series default "" 1 1
		command -v fio >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q fio >/dev/null
		sync; echo 3 >/proc/sys/vm/drop_caches
		fio_mbs=$(fio --name=ceiling --filename="$DISK" --readonly --rw=read --bs=4m --direct=1 \
			--ioengine=io_uring --iodepth=4 --numjobs="$CONNS" --offset_increment=128m --size=128m \
			--group_reporting --output-format=terse | awk -F';' '{printf "%.0f", $7 * 1.024 / 1000}')
		echo "(b) default: disk ceiling (fio, O_DIRECT, $CONNS jobs x 4 x 4 MiB in flight, no TLS): $fio_mbs MB/s"
		;;
	*) echo "unknown mode $mode" >&2; exit 2 ;;
	esac
done
echo "(c) exporter peak RSS (VmHWM) over all (b) runs: $((hwm_max / 1024)) MiB (target <= 48 MiB with the default config)"

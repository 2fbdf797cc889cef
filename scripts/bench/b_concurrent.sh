#!/bin/bash
# (b) 16 concurrent connections, each pulling consecutive 4 MiB ranges over
# one kept-alive connection, aggregate throughput, exporter vs nginx; and
# (c) the exporter's peak RSS (VmHWM) during (b), target < 128 MiB.
. "$(dirname "$0")/lib.sh"
need_root; build; setup_fs; certs
trap cleanup EXIT
CONNS=${CONNS:-16}
PER_CONN=${PER_CONN:-32} # 4 MiB requests per connection per run
DISK=$(make_disk bench-b.img 2048)
start_exporter "$DISK" "${IO_LINES:-}"
read -r SNAP NAME SNAPFILE < <(snapshot)
start_nginx "$(dirname "$SNAPFILE")"
cat "$SNAPFILE" >/dev/null
# One curl per connection, PER_CONN ranges each (curl reuses the
# connection between URLs of one invocation).
pull() {
	local url=$1 c=$2; shift 2
	local args=() i start
	for i in $(seq 0 $((PER_CONN - 1))); do
		start=$(( ((c * PER_CONN + i) % 512) << 22 ))
		args+=(-r "$start-$((start + (1 << 22) - 1))" -o /dev/null "$url")
		[ "$i" -lt $((PER_CONN - 1)) ] && args+=(--next "${CIPHER[@]}" --cacert "$BENCH_DIR/ca.pem" "$@")
	done
	curl -s "${CIPHER[@]}" --cacert "$BENCH_DIR/ca.pem" "$@" "${args[@]}"
}
aggregate() {
	local url=$1; shift
	local t0 t1 c
	t0=$(date +%s.%N)
	for c in $(seq 0 $((CONNS - 1))); do pull "$url" "$c" "$@" & done
	wait
	t1=$(date +%s.%N)
	awk -v t0="$t0" -v t1="$t1" -v b=$((CONNS * PER_CONN << 22)) 'BEGIN {printf "%.0f\n", b/(t1-t0)/1e6}'
}
exp=(); ngx=()
for _ in $(seq "$RUNS"); do
	exp+=("$(aggregate "https://localhost:$EXP_PORT/api/v1/vms/$VM/snapshots/$SNAP/disks/$NAME" -H "Authorization: Bearer $TOKEN")")
	ngx+=("$(aggregate "https://localhost:$NGINX_PORT/$(basename "$SNAPFILE")")")
done
e=$(printf '%s\n' "${exp[@]}" | median); n=$(printf '%s\n' "${ngx[@]}" | median)
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$EXP_PID/status")
echo "(b) exporter MB/s: ${exp[*]}"
echo "(b) nginx    MB/s: ${ngx[*]}"
echo "(b) median exporter $e MB/s, nginx $n MB/s, ratio exporter/nginx $(ratio "$e" "$n")"
echo "(c) exporter peak RSS (VmHWM) over all (b) runs: $((hwm / 1024)) MiB (target < 128 MiB)"

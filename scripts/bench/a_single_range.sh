#!/bin/bash
# (a) One HTTPS connection reading one 1 GiB range, page cache warm: the
# exporter vs nginx serving the same snapshot file, same certificate, cipher
# and client (curl). Prints each run's MB/s, the medians and the ratio.
. "$(dirname "$0")/lib.sh"
need_root; build; setup_fs; certs
trap cleanup EXIT
DISK=$(make_disk bench-a.img 1100)
start_exporter "$DISK" "${IO_LINES:-}"
read -r SNAP NAME SNAPFILE < <(snapshot)
start_nginx "$(dirname "$SNAPFILE")"
RANGE="0-$(((1 << 30) - 1))"
cat "$SNAPFILE" >/dev/null # warm the page cache
run() { curl -s "${CIPHER[@]}" --cacert "$BENCH_DIR/ca.pem" -o /dev/null -w '%{speed_download}\n' -r "$RANGE" "$@"; }
exp=(); ngx=()
for _ in $(seq "$RUNS"); do
	exp+=("$(run -H "Authorization: Bearer $TOKEN" "https://localhost:$EXP_PORT/api/v1/vms/$VM/snapshots/$SNAP/disks/$NAME")")
	ngx+=("$(run "https://localhost:$NGINX_PORT/$(basename "$SNAPFILE")")")
done
e=$(printf '%s\n' "${exp[@]}" | median); n=$(printf '%s\n' "${ngx[@]}" | median)
echo "(a) exporter MB/s: $(printf '%s ' "${exp[@]}" | awk '{for(i=1;i<=NF;i++) printf "%.0f ", $i/1e6}')"
echo "(a) nginx    MB/s: $(printf '%s ' "${ngx[@]}" | awk '{for(i=1;i<=NF;i++) printf "%.0f ", $i/1e6}')"
echo "(a) median exporter $(awk -v x="$e" 'BEGIN{printf "%.0f", x/1e6}') MB/s, nginx $(awk -v x="$n" 'BEGIN{printf "%.0f", x/1e6}') MB/s, ratio exporter/nginx $(ratio "$e" "$n")"

#!/bin/bash
# Soak of the release binary for issue 16 (failures that heal): memory that
# comes back, races that answer what happened, health that stays true.
#
# One exporter (default config, [io] untouched) serving one VM with one disk
# of SOAK_DISK_MIB MiB of data; for SOAK_SECS seconds:
#   - CLIENTS clients, each `client download --jobs JOBS --verify` in a loop
#     of the newest snapshot into its own folder;
#   - one churn loop: create a snapshot every CHURN_SECS (with the client,
#     which sends an Idempotency-Key), delete the older ones, so downloads
#     race deletes;
#   - a sampler: the exporter's VmRSS every second, and GET /health.
# Then the clients stop, the exporter idles IDLE_SECS, and its RSS is read
# again. Passes when: idle RSS after <= 1.2 x idle RSS before; peak RSS
# (VmHWM) <= PEAK_MAX_MIB; every download ended 0 or 4 (not found: its
# snapshot was deleted meanwhile), never another code; /health never
# answered other than 200; a create replayed with the same Idempotency-Key
# answers the same id.
#
# Needs root (loop mount), openssl, curl, python3; builds the release
# binary if missing. Knobs: SOAK_SECS (600), CLIENTS (4), JOBS (4),
# SOAK_DISK_MIB (256), CHURN_SECS (5), IDLE_SECS (15), PEAK_MAX_MIB (64),
# SOAK_IO ([io] lines for the exporter's config, none by default),
# BENCH_DIR (/tmp/coe-soak-heal), EXP_PORT (25744). The hostile-load soak
# (#11) is scripts/soak.sh beside it.
BENCH_DIR=${BENCH_DIR:-/tmp/coe-soak-heal}
EXP_PORT=${EXP_PORT:-25744}
. "$(dirname "$0")/bench/lib.sh"

SOAK_SECS=${SOAK_SECS:-600}
CLIENTS=${CLIENTS:-4}
JOBS=${JOBS:-4}
SOAK_DISK_MIB=${SOAK_DISK_MIB:-256}
CHURN_SECS=${CHURN_SECS:-5}
IDLE_SECS=${IDLE_SECS:-15}
PEAK_MAX_MIB=${PEAK_MAX_MIB:-64}
BENCH_FS_SIZE=${BENCH_FS_SIZE:-4G}

need_root; build; setup_fs; certs
W="$BENCH_DIR/soak"
rm -rf "$W"; mkdir -p "$W"
PIDS=()
finish() {
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
	[ ${#PIDS[@]} -eq 0 ] || wait "${PIDS[@]}" 2>/dev/null || true
	cleanup
}
trap finish EXIT

DISK=$(make_disk soak-heal.img "$SOAK_DISK_MIB")
start_exporter "$DISK" "${SOAK_IO:-}"
export COE_URL="https://localhost:$EXP_PORT" COE_USER=bench COE_PASSWORD="$USER_PASS" \
	COE_CA_FILE="$BENCH_DIR/ca.pem" XDG_CACHE_HOME="$W/cache"

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$EXP_PID/status"; }
hwm_kib() { awk '/^VmHWM/ {print $2}' "/proc/$EXP_PID/status"; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

"$BIN" client login >/dev/null
# One round before measuring, so that one-time setup (TLS, first LMDB
# pages, the first buffers) is in both idle figures.
SNAP=$("$BIN" client snapshots create "$VM" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
echo "$SNAP" >"$W/newest"
"$BIN" client download "$VM" "$SNAP" --out "$W/warm" --jobs "$JOBS" >/dev/null
rm -rf "$W/warm"
# Idle as long as after the soak (reads started ahead expire in 5 s).
sleep "$IDLE_SECS"
IDLE_BEFORE=$(rss_kib)
log "idle RSS before: $(mib "$IDLE_BEFORE") MiB"

END=$(( $(date +%s) + SOAK_SECS ))
client_loop() {
	local c=$1 n=0
	while [ "$(date +%s)" -lt "$END" ]; do
		local s code
		s=$(cat "$W/newest")
		code=0
		"$BIN" client download "$VM" "$s" --out "$W/out$c" --jobs "$JOBS" --verify \
			>/dev/null 2>>"$W/client$c.err" || code=$?
		echo "$code" >>"$W/codes"
		# A fresh replica each time: a full download, not a no-op.
		rm -rf "$W/out$c"
		n=$((n + 1))
	done
}
churn_loop() {
	while [ "$(date +%s)" -lt "$END" ]; do
		local new old
		new=$("$BIN" client snapshots create "$VM" --json 2>>"$W/churn.err" |
			python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])') || { echo churn-create-failed >>"$W/churn.err"; sleep 1; continue; }
		old=$(cat "$W/newest")
		# Atomically: a client never reads a half-written id.
		echo "$new" >"$W/newest.tmp" && mv "$W/newest.tmp" "$W/newest"
		echo create >>"$W/churn"
		sleep "$CHURN_SECS"
		"$BIN" client snapshots delete "$VM" "$old" >/dev/null 2>>"$W/churn.err" && echo delete >>"$W/churn"
	done
}
sampler() {
	while [ "$(date +%s)" -lt "$END" ]; do
		rss_kib >>"$W/rss"
		curl -s -o /dev/null -w '%{http_code}\n' --cacert "$BENCH_DIR/ca.pem" \
			"https://localhost:$EXP_PORT/api/v1/health" >>"$W/health" || echo 000 >>"$W/health"
		sleep 1
	done
}

for c in $(seq "$CLIENTS"); do client_loop "$c" & PIDS+=($!); done
churn_loop & PIDS+=($!)
sampler & PIDS+=($!)
log "soaking for $SOAK_SECS s: $CLIENTS clients x $JOBS jobs, a create every $CHURN_SECS s"
wait "${PIDS[@]}"
PIDS=()
PEAK_SAMPLED=$(sort -n "$W/rss" | tail -1)
PEAK_HWM=$(hwm_kib)
sleep "$IDLE_SECS"
IDLE_AFTER=$(rss_kib)

# Idempotency: a create replayed with the same key answers the same id.
KEY=soak-$RANDOM-$RANDOM
A=$(api -X POST -H "Idempotency-Key: $KEY" "https://localhost:$EXP_PORT/api/v1/vms/$VM/snapshots" |
	python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
B=$(api -X POST -H "Idempotency-Key: $KEY" "https://localhost:$EXP_PORT/api/v1/vms/$VM/snapshots" |
	python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')

DOWNLOADS=$(wc -l <"$W/codes")
OK=$(grep -cx 0 "$W/codes" || true)
NOTFOUND=$(grep -cx 4 "$W/codes" || true)
OTHER=$((DOWNLOADS - OK - NOTFOUND))
HEALTH_BAD=$(grep -cvx 200 "$W/health" || true)
CREATES=$(grep -cx create "$W/churn" || true)
DELETES=$(grep -cx delete "$W/churn" || true)
RATIO=$(awk -v a="$IDLE_AFTER" -v b="$IDLE_BEFORE" 'BEGIN { printf "%.2f", a / b }')

echo "soak: ${SOAK_SECS}s, $CLIENTS clients x $JOBS jobs, disk $SOAK_DISK_MIB MiB"
echo "downloads: $DOWNLOADS (ok $OK, not found $NOTFOUND, other $OTHER); creates $CREATES, deletes $DELETES"
echo "health answers not 200: $HEALTH_BAD of $(wc -l <"$W/health")"
echo "RSS idle before $(mib "$IDLE_BEFORE") MiB, peak sampled $(mib "$PEAK_SAMPLED") MiB, VmHWM $(mib "$PEAK_HWM") MiB, idle after $(mib "$IDLE_AFTER") MiB (x$RATIO)"
echo "idempotent replay: $A $B"

fail=0
[ "$OTHER" -eq 0 ] || { echo "FAIL: downloads ended with other codes:" >&2; sort "$W/codes" | uniq -c >&2; for f in "$W"/client*.err; do tail -n 5 "$f" >&2; done; fail=1; }
[ "$HEALTH_BAD" -eq 0 ] || { echo "FAIL: /health answered other than 200" >&2; sort "$W/health" | uniq -c >&2; fail=1; }
[ "$IDLE_AFTER" -le $((IDLE_BEFORE * 12 / 10)) ] || { echo "FAIL: idle RSS after is x$RATIO of before" >&2; fail=1; }
[ "$PEAK_HWM" -le $((PEAK_MAX_MIB * 1024)) ] || { echo "FAIL: peak RSS over $PEAK_MAX_MIB MiB" >&2; fail=1; }
[ -n "$A" ] && [ "$A" = "$B" ] || { echo "FAIL: the replayed create answered another id" >&2; fail=1; }
[ "$DOWNLOADS" -gt 0 ] || { echo "FAIL: no download ran" >&2; fail=1; }
exit $fail

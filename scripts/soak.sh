#!/usr/bin/env bash
# The soak (#11): N minutes of mixed hostile load on the release binary,
# and the figures that say whether honest clients were still served.
#
#   sudo ./scripts/soak.sh [MINUTES]        (default 10)
#
# What runs (scripts/soak.py, standard-library Python; cases in its CASES
# table, each its own function, so more can be added there):
#   quiet phase   only the probe: one honest client on its own address asking
#                 for a 1 MiB range on a fresh TLS connection every 0.2 s
#   storm         the probe, plus SOAK_HONEST (16) honest downloads (the disk
#                 in 4 MiB ranges over kept-alive connections, each from its
#                 own address), snapshot create/diff/delete churn,
#                 SOAK_STALLED (64) stalled readers (each replaced once the
#                 server has cut it) and SOAK_HALF_SENT (1024)
#                 half-sent logins from one address each, bursts of 30
#                 wrong-password logins, and HTTP/2 rapid resets
# Before the quiet phase, a warm-up (10 s of the honest downloads, 20 s of
# the storm, 15 s to settle: tokio keeps an idle blocking thread 10 s) so
# that the start figures are taken after the allocator and the runtime have
# seen a storm once; the end figures also come after a 15 s settle.
# Printed: the probe's p50/p99 quiet and in the storm (and the ratio), how
# many storm ranges took 1 s or more, the server's RSS and descriptor count
# at start, mid-storm and end (by kind: anon, file; the anonymous memory by
# mapping: main heap, glibc arenas, thread stacks, others), its CPU in the storm,
# the load average, the probes that took 0.5 s or more with the time of each
# step, and every event by case and class. Exit status 1 if an honest
# request failed, a storm range took 1 s or more, or the server's RSS or
# descriptors at the end are over 1.1x the start.
#
# Knobs (environment): SOAK_DIR (/tmp/coe-soak), SOAK_PORT (25644),
# SOAK_DISK_MIB (256), SOAK_QUIET_SECONDS (min(60, a fifth of the run)),
# SOAK_HONEST, SOAK_STALLED, SOAK_HALF_SENT, SOAK_WARMUP_STORM (seconds of
# storm in the warm-up before the start figures, 20), SOAK_SEND_TIMEOUT (the
# server's api.send_timeout, default its own 120s), SOAK_STALL_HOLD (seconds
# each stalled reader is held before it is replaced by a new one, 130: keep
# it above the send timeout), SOAK_KEEP_LOGS (a folder to keep
# the server's logs in), SOAK_SMAPS (a folder to save the server's
# /proc/PID/smaps in at the start, mid-storm and end, to diff mapping by
# mapping), SOAK_HOLD (seconds to keep the server running after the figures,
# its pid printed, to look at it with gdb or pmap; 0), BIN (the binary; built with `cargo build --release`
# when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

MINUTES=${1:-10}
DIR=${SOAK_DIR:-/tmp/coe-soak}
PORT=${SOAK_PORT:-25644}
DISK_MIB=${SOAK_DISK_MIB:-256}
BIN=${BIN:-$ROOT/target/release/coriolis-ovm-exporter}
SECONDS_TOTAL=$(python3 -c "print(int(float('$MINUTES') * 60))")
QUIET=${SOAK_QUIET_SECONDS:-$(python3 -c "print(min(60, $SECONDS_TOTAL // 5))")}
VM=soak-vm
USER_NAME=soak
USER_PASS=$(openssl rand -hex 12)

[ "$(id -u)" = 0 ] || { echo "scripts/soak.sh must run as root (loop mount)" >&2; exit 1; }
command -v argon2 >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q argon2 >/dev/null
[ -x "$BIN" ] || cargo build --release --bin coriolis-ovm-exporter

server=
cleanup() {
	set +e
	[ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
	if mountpoint -q "$DIR/fs"; then umount "$DIR/fs" 2>/dev/null || umount -l "$DIR/fs"; fi
	if [ -n "${SOAK_KEEP_LOGS:-}" ]; then
		mkdir -p "$SOAK_KEEP_LOGS" && cp "$DIR"/exporter.log "$DIR"/stderr.log "$SOAK_KEEP_LOGS"/ 2>/dev/null
	fi
	rm -rf "$DIR"
}
trap cleanup EXIT INT TERM

# ---- the node: a loop XFS with one VM of one disk of data -----------------------
mkdir -p "$DIR/fs"
truncate -s 2G "$DIR/xfs.img"
mkfs.xfs -q -f -m reflink=1 "$DIR/xfs.img"
mount -o loop "$DIR/xfs.img" "$DIR/fs"
mkdir -p "$DIR/fs/repo/VirtualDisks"
(openssl enc -aes-128-ctr -pass pass:soak -nosalt -pbkdf2 </dev/zero 2>/dev/null || true) |
	head -c $((DISK_MIB << 20)) >"$DIR/fs/repo/VirtualDisks/disk01.img"

. "$ROOT/scripts/lib/exporter-config.sh"
make_exporter_certs "$DIR" soak-ca localhost DNS:localhost,IP:127.0.0.1
USER_HASH=$(printf %s "$USER_PASS" | argon2 "$(openssl rand -hex 8)" -id -t 1 -m 12 -p 1 -e)

SEND_LINE=
[ -n "${SOAK_SEND_TIMEOUT:-}" ] && SEND_LINE="send_timeout = \"$SOAK_SEND_TIMEOUT\""
write_exporter_config "$DIR/config.toml" \
	db_file="$DIR/exporter.db" log_file="$DIR/exporter.log" \
	secret="$(openssl rand -base64 48)" port="$PORT" api_lines="$SEND_LINE" \
	certificate="$DIR/srv.pem" key="$DIR/srv.key" \
	user="$USER_NAME" password_hash="$USER_HASH" \
	repo="$DIR/fs/repo" vm="$VM" disk="$DIR/fs/repo/VirtualDisks/disk01.img"

# ---- the server ----------------------------------------------------------------------
# Enough descriptors for the storm (the systemd unit sets 65536).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
"$BIN" --config "$DIR/config.toml" 2>"$DIR/stderr.log" &
server=$!
for _ in $(seq 100); do
	curl -sf --cacert "$DIR/ca.pem" "https://localhost:$PORT/api/v1/health" >/dev/null && break
	sleep 0.2
done
curl -sf --cacert "$DIR/ca.pem" "https://localhost:$PORT/api/v1/health" >/dev/null ||
	{ echo "the server did not start:" >&2; cat "$DIR/stderr.log" "$DIR/exporter.log" >&2; exit 1; }

echo "# soak: ${MINUTES} min on $BIN (pid $server), disk ${DISK_MIB} MiB, $(nproc) cores"
status=0
python3 "$ROOT/scripts/soak.py" --port "$PORT" --ca "$DIR/ca.pem" --pid "$server" \
	--user "$USER_NAME" --password "$USER_PASS" --vm "$VM" \
	--disk-size $((DISK_MIB << 20)) --seconds "$SECONDS_TOTAL" --quiet-seconds "$QUIET" \
	--honest "${SOAK_HONEST:-16}" --stalled "${SOAK_STALLED:-64}" \
	--half-sent "${SOAK_HALF_SENT:-1024}" --warmup-storm "${SOAK_WARMUP_STORM:-20}" \
	--stall-hold "${SOAK_STALL_HOLD:-130}" ${SOAK_SMAPS:+--smaps "$SOAK_SMAPS"} || status=$?
if [ "${SOAK_HOLD:-0}" != 0 ]; then
	echo "# the server (pid $server) is kept ${SOAK_HOLD} s for inspection"
	sleep "$SOAK_HOLD"
fi
echo "# server log lines by level: $(grep -oE '^[^ ]+ +(INFO|WARN|ERROR)' "$DIR/exporter.log" | awk '{print $2}' | sort | uniq -c | tr '\n' ' ')"
exit $status

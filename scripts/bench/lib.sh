#!/bin/bash
# Shared setup of the benchmark scripts (sourced, not run). Needs root (loop
# mounts, drop_caches), openssl, curl, and installs nginx from Debian.
#
# Client: curl for both servers. It is the same binary, TLS library
# (OpenSSL) and HTTP code (its own for HTTP/1.1, nghttp2 for HTTP/2) against
# the exporter and nginx, it speaks the way the Python client does (one
# `Range: bytes=a-b` request per chunk over a kept-alive connection, one
# connection per process) and the way Go and curl users do (HTTP/2, which
# ALPN picks when offered), and `-w` reports its own timing and the protocol
# it spoke; a load tool like wrk/h2load would add a second client to
# justify, and h2load cannot vary the `Range` of its requests. Cipher:
# forced on the client side (TLS 1.3, TLS_AES_128_GCM_SHA256) so both
# servers use it.
set -euo pipefail
# A failure inside $(...) fails the script too (timed runs are captured).
shopt -s inherit_errexit

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BENCH_DIR=${BENCH_DIR:-/tmp/coe-bench}
BENCH_FS_SIZE=${BENCH_FS_SIZE:-14G}
RUNS=${RUNS:-5}
EXP_PORT=${EXP_PORT:-25544}
NGINX_PORT=${NGINX_PORT:-25545}
BIN=${BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/coriolis-ovm-exporter}
# --fail: an error answer ends the run instead of being timed as a transfer
# (curl's exit status says so only for the last URL of a command line or
# a -K file: every timed request also writes REPORT, checked with
# check_report).
TLS_ARGS=(--fail --tlsv1.3 --tls13-ciphers TLS_AES_128_GCM_SHA256)
# HTTP/1.1 like the Python client (requests), unless a script picks the
# protocol per run (use_proto).
CIPHER=("${TLS_ARGS[@]}" --http1.1)
# The protocols (a) and (b) measure, each against nginx: h1 (HTTP/1.1),
# h2 (HTTP/2, nginx with http2 enabled).
PROTOS=${PROTOS:-h1 h2}
# One line per request: status and bytes of body received.
REPORT='%{http_code} %{size_download}\n'
# The same and the HTTP version spoken (check_report's 4th argument).
REPORT_V='%{http_code} %{size_download} %{http_version}\n'

# use_proto h1|h2: the client arguments (CIPHER) and the version curl must
# report (HTTP_VERSION) for that protocol.
use_proto() {
	case $1 in
	h1) CIPHER=("${TLS_ARGS[@]}" --http1.1); HTTP_VERSION=1.1 ;;
	h2) CIPHER=("${TLS_ARGS[@]}" --http2); HTTP_VERSION=2 ;;
	*) echo "unknown protocol $1 (h1 or h2)" >&2; exit 2 ;;
	esac
}

VM=bench-vm

# write_exporter_config, make_exporter_certs: shared with the soak runs.
. "$ROOT/scripts/lib/exporter-config.sh"

log() { echo "# $*" >&2; }

need_root() {
	[ "$(id -u)" = 0 ] || { echo "run as root (loop mounts, drop_caches)" >&2; exit 1; }
}

build() {
	if [ ! -x "$BIN" ] || [ -n "${REBUILD:-}" ]; then
		(cd "$ROOT" && cargo build --release --bin coriolis-ovm-exporter)
	fi
}

# An XFS loop filesystem with reflink at $BENCH_DIR/fs. The loop device
# reads its backing file with direct I/O: otherwise every read of the
# filesystem also fills the host's page cache with the image file, and (d)
# would measure the loop device, not the exporter. The image stays for the
# next script (made once); what setup_fs mounted, release_fs (called by
# cleanup) unmounts and detaches, unless BENCH_KEEP_FS=1.
FS_MOUNTED=
setup_fs() {
	mkdir -p "$BENCH_DIR/fs"
	if ! mountpoint -q "$BENCH_DIR/fs"; then
		if [ ! -f "$BENCH_DIR/xfs.img" ]; then
			truncate -s "$BENCH_FS_SIZE" "$BENCH_DIR/xfs.img"
			mkfs.xfs -q -f -m reflink=1 "$BENCH_DIR/xfs.img"
		fi
		local dev
		dev=$(losetup -f --show --direct-io=on "$BENCH_DIR/xfs.img")
		mount "$dev" "$BENCH_DIR/fs"
		FS_MOUNTED=$dev
	fi
	mkdir -p "$BENCH_DIR/fs/repo/VirtualDisks"
}

certs() {
	[ -f "$BENCH_DIR/srv.pem" ] && return
	make_exporter_certs "$BENCH_DIR" bench-ca localhost DNS:localhost,IP:127.0.0.1
}

# A disk of $2 MiB of data (not holes) at $BENCH_DIR/fs/repo/VirtualDisks/$1.
make_disk() {
	local f="$BENCH_DIR/fs/repo/VirtualDisks/$1"
	if [ ! -f "$f" ] || [ "$(stat -c %s "$f")" != $(($2 << 20)) ]; then
		# Incompressible bytes, written once (openssl's CTR stream is fast).
		(openssl enc -aes-128-ctr -pass pass:bench -nosalt -pbkdf2 </dev/zero 2>/dev/null || true) |
			head -c $(($2 << 20)) >"$f"
		[ "$(stat -c %s "$f")" = $(($2 << 20)) ] || { echo "could not write $f (openssl missing?)" >&2; rm -f "$f"; exit 1; }
		sync
	fi
	echo "$f"
}

# The bench user's password and its Argon2id hash, made once per run with
# the argon2 CLI (Debian package, installed when missing): the example
# config's hash is public and the service refuses it.
bench_user() {
	[ -n "${USER_HASH:-}" ] && return
	command -v argon2 >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q argon2 >/dev/null
	USER_PASS=$(openssl rand -hex 16)
	USER_HASH=$(printf %s "$USER_PASS" | argon2 "$(openssl rand -hex 8)" -id -t 1 -m 12 -p 1 -e)
}

# Starts the exporter serving disk $1 with extra [io] lines $2; sets EXP_PID.
start_exporter() {
	local disk=$1 io=${2:-}
	stop_exporter
	bench_user
	mkdir -p "$BENCH_DIR/exp"
	write_exporter_config "$BENCH_DIR/exp/config.toml" \
		db_file="$BENCH_DIR/fs/exporter.db" log_file="$BENCH_DIR/exp/exporter.log" \
		secret=bench-secret-0123456789abcdef0123456789 port="$EXP_PORT" \
		certificate="$BENCH_DIR/srv.pem" key="$BENCH_DIR/srv.key" \
		user=bench password_hash="$USER_HASH" \
		repo="$BENCH_DIR/fs/repo" vm="$VM" disk="$disk" io_lines="$io"
	"$BIN" -config "$BENCH_DIR/exp/config.toml" 2>"$BENCH_DIR/exp/stderr.log" &
	EXP_PID=$!
	for _ in $(seq 100); do
		curl -s --cacert "$BENCH_DIR/ca.pem" "https://localhost:$EXP_PORT/api/v1/health" >/dev/null && break
		sleep 0.1
	done
	TOKEN=$(curl -s --cacert "$BENCH_DIR/ca.pem" -d "{\"username\":\"bench\",\"password\":\"$USER_PASS\"}" \
		"https://localhost:$EXP_PORT/api/v1/auth/login" | sed -n 's/.*"token":"\([^"]*\)".*/\1/p')
	[ -n "$TOKEN" ] || { cat "$BENCH_DIR/exp/stderr.log" "$BENCH_DIR/exp/exporter.log" >&2; exit 1; }
}

stop_exporter() {
	if [ -n "${EXP_PID:-}" ]; then
		kill "$EXP_PID" 2>/dev/null || true
		wait "$EXP_PID" 2>/dev/null || true
		EXP_PID=
	fi
}

api() { curl -s --fail --cacert "$BENCH_DIR/ca.pem" -H "Authorization: Bearer $TOKEN" "$@"; }

# Creates a snapshot; prints "<id> <disk name> <snapshot file path>".
snapshot() {
	api -X POST "https://localhost:$EXP_PORT/api/v1/vms/$VM/snapshots" |
		python3 -c 'import json,sys; s=json.load(sys.stdin); d=s["disks"][0]; print(s["id"], d["name"], d["path"])'
}

# nginx serving $1 over TLS 1.3 with HTTP/2 offered by ALPN (so a client
# asking h2 gets it, one asking HTTP/1.1 gets that); its other settings are
# the defaults a new user gets (http2_chunk_size 8k among them). Sets
# NGINX_WORKERS (worker pids, for cpu).
start_nginx() {
	local root=$1 listen h2=""
	command -v nginx >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx >/dev/null
	stop_nginx
	# `http2 on` from nginx 1.25.1; before it (Debian 12 has 1.22) the
	# listen parameter.
	if printf '%s\n1.25.1\n' "$(nginx -v 2>&1 | sed 's,.*nginx/,,')" | sort -V -C; then
		listen="127.0.0.1:$NGINX_PORT ssl http2"
	else
		listen="127.0.0.1:$NGINX_PORT ssl"; h2="http2 on;"
	fi
	mkdir -p "$BENCH_DIR/nginx"
	cat >"$BENCH_DIR/nginx/nginx.conf" <<CONF
user root;
worker_processes auto;
pid $BENCH_DIR/nginx/nginx.pid;
error_log $BENCH_DIR/nginx/error.log;
events { worker_connections 1024; }
http {
    access_log off;
    sendfile on;
    keepalive_requests 1000000;
    server {
        listen $listen;
        $h2
        ssl_certificate $BENCH_DIR/srv.pem;
        ssl_certificate_key $BENCH_DIR/srv.key;
        ssl_protocols TLSv1.3;
        root $root;
        location / { }
    }
}
CONF
	nginx -c "$BENCH_DIR/nginx/nginx.conf" -p "$BENCH_DIR/nginx"
	sleep 0.5
	NGINX_WORKERS=$(pgrep -P "$(cat "$BENCH_DIR/nginx/nginx.pid")" | xargs)
}

stop_nginx() {
	if [ -f "$BENCH_DIR/nginx/nginx.pid" ]; then
		kill "$(cat "$BENCH_DIR/nginx/nginx.pid")" 2>/dev/null || true
		rm -f "$BENCH_DIR/nginx/nginx.pid"
		sleep 0.3
	fi
}

# check_report FILE COUNT [BYTES [VERSION]]: FILE holds one REPORT (or
# REPORT_V) line per request; fails unless there are COUNT lines, every
# status is 2xx, (when given) the bodies add up to BYTES and every request
# spoke HTTP VERSION. Prints the bytes received, the figure every rate is
# computed from.
check_report() {
	awk -v want="$2" -v want_bytes="${3:-}" -v want_version="${4:-}" -v f="$1" '
		{
			n++
			if ($1 !~ /^2[0-9][0-9]$/) {
				if (bad < 5) printf "%s: request %d answered %s\n", f, n, $1 >"/dev/stderr"
				bad++
			}
			if (want_version != "" && $3 != want_version) {
				if (bad < 5) printf "%s: request %d spoke HTTP/%s, not %s\n", f, n, $3, want_version >"/dev/stderr"
				bad++
			}
			bytes += $2
		}
		END {
			if (n != want) { printf "%s: %d answers for %d requests\n", f, n, want >"/dev/stderr"; bad++ }
			if (want_bytes != "" && bytes != want_bytes) {
				printf "%s: %.0f bytes received, %.0f expected\n", f, bytes, want_bytes >"/dev/stderr"; bad++
			}
			if (bad) exit 1
			printf "%.0f\n", bytes
		}' "$1"
}

# Median of numbers on stdin.
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a/b}'; }

# CPU time (user + system, clock ticks) the given processes used so far.
cpu() { local p t=0; for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo "$t"; }
TICKS=$(getconf CLK_TCK)
# per_gib TICKS BYTES: CPU seconds per GiB sent.
per_gib() { awk -v t="$1" -v k="$TICKS" -v b="$2" 'BEGIN {printf "%.2f", t / k / (b / 2^30)}'; }
# Peak RSS (VmHWM) of a process, KiB.
hwm() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }
# The machine's load, to print beside every figure (the machine is shared).
load() { cut -d' ' -f1-3 /proc/loadavg; }

release_fs() {
	[ -n "$FS_MOUNTED" ] && [ -z "${BENCH_KEEP_FS:-}" ] || return 0
	umount "$BENCH_DIR/fs" 2>/dev/null && losetup -d "$FS_MOUNTED" 2>/dev/null || true
	FS_MOUNTED=
}

cleanup() { stop_exporter; stop_nginx; release_fs; }

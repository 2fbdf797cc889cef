#!/bin/bash
# WAN benchmark (issue #14): pulling a guest disk over a shaped link, full
# and incremental, four ways:
#   (i)   python-ovmexporterclient's pattern, by scripts/bench/wan_pyclient.py
#         (python requests): one Range request per chunk of the snapshot
#         (squashChunks=True; compareTo's chunks include the zeroed ranges),
#         one after the other, each on a new connection, read 1 MiB at a time
#   (ii)  the incremental stream (format 2):        --transport stream --jobs 1
#   (iii) the stream with zstd:                     ... --compress zstd
#   (iv)  the stream with zstd over 4 shards:       ... --compress zstd --jobs 4
# Prints seconds and bytes on the wire per case and the ratios against (i),
# with the load average (uptime) at the start of each case.
#
# The link: two network namespaces (server coe-wan-s, client coe-wan-c)
# joined by a veth pair, addresses only inside them. Rate: tbf on both
# ends of the veth. Delay: this kernel has no netem, so scripts/bench/wan_delay.py
# holds every packet for the one-way delay, each way: it owns the client
# end of the veth through a packet socket and gives the client its address
# on a TUN device (a packet forwarder, not a TCP proxy: TCP sees the RTT).
# Links: (a) 1 Gbit/s, 10 ms RTT; (b) 100 Mbit/s, 50 ms RTT. Each is checked
# with ping (RTT) and one curl (rate) before any figure is taken.
#
# The disk: a sparse image holding an ext4 filesystem filled with a copy of
# part of this machine's /usr plus random data (snapshot 1), then a change
# set: files written, files deleted, fstrim (snapshot 2).
#
# Knobs (defaults are the full benchmark; the machine was shared when it
# was first run, see the README for the small run):
#   WAN_IMG_SIZE=4G      image size (sparse)
#   WAN_USR="/usr/share /usr/bin /usr/lib"  folders copied into the guest,
#                        entry by entry, until WAN_USR_MB are copied
#   WAN_USR_MB=1536      (zstd -3 makes this machine's /usr about 0.37 of
#                        its size: a guest's system files)
#   WAN_RANDOM_MB=256    random data written into the guest (incompressible)
#   WAN_CHANGE_MB=256    new data in the change set (half random, half copies)
#   WAN_DELETE_IN=/usr/bin  every third file of this copied folder is
#                        deleted in the change set (then fstrim)
#   WAN_LINKS="a b"      which links
#   RUNS=3               runs per case (the median is printed)
#   WAN_CASES="i ii iii iv"  which cases (ratios are against the first)
#   WAN_RANGES=1         also this project's client by ranges (--transport
#                        ranges --jobs 1, 8 MiB pieces on one kept-alive
#                        connection), printed as (i')
# Needs root, iproute2 (tc tbf), ethtool, ping (scripts/deps.sh), python3.
# Its own folder and filesystem: never the other benchmarks' ones.
BENCH_DIR=${BENCH_DIR:-/tmp/coe-bench-wan}
BENCH_FS_SIZE=${BENCH_FS_SIZE:-12G}
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

WAN_IMG_SIZE=${WAN_IMG_SIZE:-4G}
WAN_USR=${WAN_USR:-/usr/share /usr/bin /usr/lib}
WAN_USR_MB=${WAN_USR_MB:-1536}
WAN_RANDOM_MB=${WAN_RANDOM_MB:-256}
WAN_CHANGE_MB=${WAN_CHANGE_MB:-256}
WAN_DELETE_IN=${WAN_DELETE_IN:-/usr/bin}
WAN_LINKS=${WAN_LINKS:-a b}
WAN_RANGES=${WAN_RANGES:-}
WAN_CASES=${WAN_CASES:-i ii iii iv}
RUNS=${RUNS:-3}
NS_S=coe-wan-s
NS_C=coe-wan-c
SRV_IP=10.231.0.1
CLI_IP=10.231.0.2
WAN_DIR=$BENCH_DIR/wan
FWD_PID=

need_root
for t in tc ethtool ping python3 mkfs.ext4 fstrim; do
	command -v "$t" >/dev/null || { echo "missing $t (scripts/deps.sh)" >&2; exit 1; }
done

cleanup() {
	set +e
	[ -n "$FWD_PID" ] && kill "$FWD_PID" 2>/dev/null
	stop_server
	mountpoint -q "$WAN_DIR/mnt" && umount "$WAN_DIR/mnt"
	ip netns del $NS_S 2>/dev/null
	ip netns del $NS_C 2>/dev/null
	release_fs
}
trap cleanup EXIT

# The two namespaces and the veth; the forwarder is started per link.
make_link() {
	ip netns del $NS_S 2>/dev/null || true
	ip netns del $NS_C 2>/dev/null || true
	ip netns add $NS_S
	ip netns add $NS_C
	ip link add s0 netns $NS_S type veth peer name c0 netns $NS_C
	ip -n $NS_S link set lo up
	ip -n $NS_C link set lo up
	# Jumbo frames: fewer packets for the forwarder (a Python process).
	ip -n $NS_S link set s0 mtu 9000 up
	ip -n $NS_C link set c0 mtu 9000 up
	# Offloads off: the forwarder sees real frames with real checksums.
	ip netns exec $NS_S ethtool -K s0 tx off tso off gso off gro off >/dev/null 2>&1
	ip netns exec $NS_C ethtool -K c0 tx off tso off gso off gro off >/dev/null 2>&1
	ip -n $NS_S addr add $SRV_IP/24 dev s0
	# c0 has no address; the client's address is on the TUN device. Frames
	# the kernel would take from c0 directly fail the strict reverse-path
	# check (the route back is the TUN), so only the forwarder's copy counts.
	ip netns exec $NS_C sysctl -qw net.ipv6.conf.c0.disable_ipv6=1 \
		net.ipv4.conf.all.rp_filter=1 net.ipv4.conf.c0.rp_filter=1
	local cmac
	cmac=$(ip -n $NS_C -br link show c0 | awk '{print $3}')
	ip -n $NS_S neigh replace $CLI_IP lladdr "$cmac" dev s0 nud permanent
}

# shape RATE RTT_MS: tbf on both veth ends, the forwarder at RTT/2 each way.
shape() {
	local rate=$1 rtt=$2 smac bdp
	if [ -n "$FWD_PID" ]; then
		kill "$FWD_PID" 2>/dev/null || true
		wait "$FWD_PID" 2>/dev/null || true
		FWD_PID=
	fi
	ip -n $NS_C link del coe-tun 2>/dev/null || true
	# Queue: one bandwidth-delay product (bytes), at least 256 KiB.
	bdp=$(( ${rate%mbit} * 1000000 / 8 * rtt / 1000 ))
	[ "$bdp" -lt 262144 ] && bdp=262144
	for end in "$NS_S s0" "$NS_C c0"; do
		set -- $end
		ip netns exec "$1" tc qdisc replace dev "$2" root tbf rate "$rate" burst 256kb limit "$bdp"
	done
	smac=$(ip -n $NS_S -br link show s0 | awk '{print $3}')
	# Real-time priority: the delay stays the delay when builds load the
	# machine (the forwarder sleeps in select between packets; at link (b)
	# it takes about 5% of a core).
	ip netns exec $NS_C chrt -f 20 python3 "$ROOT/scripts/bench/wan_delay.py" c0 coe-tun $((rtt / 2)) "$smac" \
		>"$WAN_DIR/fwd.log" 2>&1 &
	FWD_PID=$!
	for _ in $(seq 50); do grep -q ready "$WAN_DIR/fwd.log" && break; sleep 0.1; done
	ip -n $NS_C addr add $CLI_IP/32 dev coe-tun
	ip -n $NS_C link set coe-tun mtu 9000 txqueuelen 10000 up
	ip -n $NS_C route add $SRV_IP/32 dev coe-tun
}

certs_wan() {
	[ -f "$WAN_DIR/srv.pem" ] && return
	make_exporter_certs "$WAN_DIR" wan-ca wan "IP:$SRV_IP"
}

SRV_PID=
start_server() {
	local disk=$1
	bench_user
	write_exporter_config "$WAN_DIR/config.toml" \
		db_file="$BENCH_DIR/fs/wan-exporter.db" log_file="$WAN_DIR/exporter.log" \
		secret=wan-bench-secret-0123456789abcdef0123456789 bind="$SRV_IP" port="$EXP_PORT" \
		certificate="$WAN_DIR/srv.pem" key="$WAN_DIR/srv.key" \
		user=bench password_hash="$USER_HASH" \
		repo="$BENCH_DIR/fs/repo" vm="$VM" disk="$disk"
	ip netns exec $NS_S "$BIN" -config "$WAN_DIR/config.toml" 2>"$WAN_DIR/stderr.log" &
	SRV_PID=$!
	for _ in $(seq 100); do
		ip netns exec $NS_S curl -s --cacert "$WAN_DIR/ca.pem" "https://$SRV_IP:$EXP_PORT/api/v1/health" \
			>/dev/null && return
		sleep 0.1
	done
	cat "$WAN_DIR/stderr.log" >&2
	exit 1
}

stop_server() {
	if [ -n "$SRV_PID" ]; then
		kill "$SRV_PID" 2>/dev/null || true
		wait "$SRV_PID" 2>/dev/null || true
		SRV_PID=
	fi
}

# The client binary in the client namespace.
client() {
	ip netns exec $NS_C env COE_URL="https://$SRV_IP:$EXP_PORT" COE_USER=bench \
		COE_PASSWORD="$USER_PASS" COE_CA_FILE="$WAN_DIR/ca.pem" XDG_CACHE_HOME="$WAN_DIR/cache" \
		"$BIN" client "$@"
}

wire_bytes() {
	ip netns exec $NS_S sh -c 'echo $(( $(cat /sys/class/net/s0/statistics/tx_bytes) + $(cat /sys/class/net/s0/statistics/rx_bytes) ))'
}

# The guest image: ext4 with a copy of $WAN_USR and random data.
make_guest() {
	GUEST=$BENCH_DIR/fs/repo/VirtualDisks/guest.img
	rm -f "$GUEST"
	truncate -s "$WAN_IMG_SIZE" "$GUEST"
	# Inode tables and journal written now, not by a background thread
	# between the snapshots (it would count as a change).
	mkfs.ext4 -q -F -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 "$GUEST"
	mkdir -p "$WAN_DIR/mnt"
	mount -o loop "$GUEST" "$WAN_DIR/mnt"
	local left=$((WAN_USR_MB << 20)) e n
	for d in $WAN_USR; do
		mkdir -p "$WAN_DIR/mnt/copy$d"
		for e in "$d"/* "$d"/.[!.]*; do
			[ -e "$e" ] || [ -L "$e" ] || continue
			n=$(du -sb "$e" 2>/dev/null | cut -f1)
			[ "${n:-0}" -le "$left" ] || continue
			cp -a "$e" "$WAN_DIR/mnt/copy$d/" 2>/dev/null || true
			left=$((left - ${n:-0}))
		done
	done
	mkdir -p "$WAN_DIR/mnt/random"
	head -c $((WAN_RANDOM_MB << 20)) /dev/urandom >"$WAN_DIR/mnt/random/blob"
	umount "$WAN_DIR/mnt"
	log "guest: $(du -h --apparent-size "$GUEST" | cut -f1) image, $(du -h "$GUEST" | cut -f1) allocated"
}

# The change set: new random and copied files, a deleted tree, fstrim.
change_guest() {
	mount -o loop "$GUEST" "$WAN_DIR/mnt"
	head -c $((WAN_CHANGE_MB << 19)) /dev/urandom >"$WAN_DIR/mnt/random/new-blob"
	# Copies of copied files, up to the other half of WAN_CHANGE_MB.
	mkdir -p "$WAN_DIR/mnt/new"
	find "$WAN_DIR/mnt/copy" -type f -printf '%s %p\n' |
		awk -v max=$((WAN_CHANGE_MB << 19)) '{ t += $1; if (t > max) exit; print $2 }' |
		while read -r f; do cp "$f" "$WAN_DIR/mnt/new/$(basename "$f").$RANDOM"; done ||
		true # find ends on SIGPIPE when awk has enough
	# Delete every third file of one copied folder (scattered holes).
	find "$WAN_DIR/mnt/copy$WAN_DELETE_IN" -type f | sort | awk 'NR % 3 == 0' | xargs -r rm -f
	sync
	fstrim "$WAN_DIR/mnt" || true
	umount "$WAN_DIR/mnt"
}

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# Case (i): python-ovmexporterclient's pattern (scripts/bench/wan_pyclient.py).
pyclient() {
	ip netns exec $NS_C python3 "$ROOT/scripts/bench/wan_pyclient.py" "https://$SRV_IP:$EXP_PORT" \
		bench "$USER_PASS" "$WAN_DIR/ca.pem" "$VM" "$SNAP" "$WAN_DIR/out" ${BASE_SNAP:+"$BASE_SNAP"}
}

# run_case NAME ARGS...: RUNS downloads (case i: the Python pattern; the
# others: this client with ARGS); prints "NAME seconds bytes load" (medians;
# load: the 1-minute load average before each run).
run_case() {
	local name=$1
	shift
	local t b secs=() bytes=() loads=()
	for _ in $(seq "$RUNS"); do
		rm -rf "$WAN_DIR/out"
		if [ -n "${BASE_COPY:-}" ]; then
			mkdir -p "$WAN_DIR/out"
			cp -a --sparse=always "$BASE_COPY/." "$WAN_DIR/out/"
		fi
		sync
		loads+=("$(cut -d' ' -f1 /proc/loadavg)")
		b=$(wire_bytes)
		t=$(date +%s%N)
		if [ "$name" = i ]; then
			pyclient >"$WAN_DIR/last.json"
		else
			client download "$VM" "$SNAP" --out "$WAN_DIR/out" --json "$@" >"$WAN_DIR/last.json"
		fi
		secs+=("$(awk -v a="$t" -v b="$(date +%s%N)" 'BEGIN {printf "%.2f", (b - a) / 1e9}')")
		bytes+=("$(( $(wire_bytes) - b ))")
		cmp "$WAN_DIR/out/$DISK" "$SNAP_FILE" || { echo "case $name: replica differs" >&2; exit 1; }
		log "case ($name) run: ${secs[-1]} s, ${bytes[-1]} bytes, load ${loads[-1]}" \
			"$([ "$name" = i ] && cat "$WAN_DIR/last.json")"
	done
	echo "$name $(printf '%s\n' "${secs[@]}" | median) $(printf '%s\n' "${bytes[@]}" | median)" \
		"$(printf '%s\n' "${loads[@]}" | median)"
}

build
setup_fs
mkdir -p "$WAN_DIR"
certs_wan
make_link
make_guest
start_server "$GUEST"
snap() { client snapshots create "$VM" --json | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["id"], d["disks"][0]["name"], d["disks"][0]["path"])'; }
# Snapshots over an unshaped link (their cost is not the transfer's).
ip netns exec $NS_S tc qdisc del dev s0 root 2>/dev/null || true
shape 10000mbit 0
read -r S1 DISK S1_FILE < <(snap)
change_guest
read -r S2 _ S2_FILE < <(snap)
log "snapshots $S1 $S2 of disk $DISK"

declare -A LINK_RATE=([a]=1000mbit [b]=100mbit)
declare -A LINK_RTT=([a]=10 [b]=50)
for link in $WAN_LINKS; do
	shape "${LINK_RATE[$link]}" "${LINK_RTT[$link]}"
	log "link ($link): ${LINK_RATE[$link]}, ${LINK_RTT[$link]} ms RTT"
	ip netns exec $NS_C ping -c 5 -i 0.2 -q $SRV_IP | tail -1 | sed 's/^/# ping: /' >&2
	# One curl of a 32 MiB range of random data: the rate the link gives.
	TOKEN=$(ip netns exec $NS_C curl -s --cacert "$WAN_DIR/ca.pem" \
		-d "{\"username\":\"bench\",\"password\":\"$USER_PASS\"}" \
		"https://$SRV_IP:$EXP_PORT/api/v1/auth/login" | sed -n 's/.*"token":"\([^"]*\)".*/\1/p')
	rate=$(ip netns exec $NS_C curl -s --fail --cacert "$WAN_DIR/ca.pem" -H "Authorization: Bearer $TOKEN" \
		-r 0-$(((32 << 20) - 1)) -o /dev/null -w '%{speed_download}' \
		"https://$SRV_IP:$EXP_PORT/api/v1/vms/$VM/snapshots/$S1/disks/$DISK")
	log "curl: $(awk -v r="$rate" 'BEGIN {printf "%.0f", r * 8 / 1e6}') Mbit/s"
	for kind in full incremental; do
		if [ "$kind" = full ]; then
			SNAP=$S1 SNAP_FILE=$S1_FILE BASE_COPY= BASE_SNAP= DIFF=()
		else
			# The base replica: a full copy of S1 (made once, over this link).
			rm -rf "$WAN_DIR/base"
			client download "$VM" "$S1" --out "$WAN_DIR/base" --json --transport stream \
				--compress zstd --jobs 4 >/dev/null
			SNAP=$S2 SNAP_FILE=$S2_FILE BASE_COPY=$WAN_DIR/base BASE_SNAP=$S1 DIFF=(--diff-from "$S1")
		fi
		results=$(
			want() { [[ " $WAN_CASES " == *" $1 "* ]]; }
			! want i || run_case i
			[ -z "$WAN_RANGES" ] || run_case "i'" --transport ranges --jobs 1 "${DIFF[@]}"
			! want ii || run_case ii --transport stream --jobs 1 "${DIFF[@]}"
			! want iii || run_case iii --transport stream --jobs 1 --compress zstd "${DIFF[@]}"
			! want iv || run_case iv --transport stream --jobs 4 --compress zstd "${DIFF[@]}"
		)
		echo "link ($link) $kind, medians of $RUNS ($(date -u '+%F %H:%M') UTC):"
		echo "$results" | awk 'NR == 1 {t0 = $2; b0 = $3}
			{printf "  (%-4s) %8.2f s %14d bytes   %5.2fx faster  %5.2f of the bytes of (i)   load %s\n",
			 $1, $2, $3, t0 / $2, $3 / b0, $4}'
	done
done

#!/usr/bin/env bash
# OCFS2 guests for the test command: Debian's stock kernel in QEMU (TCG).
#
# The host kernel of a CI machine has no OCFS2, and its /dev/kvm (when there
# is one) cannot run a stock kernel, so OCFS2 runs in QEMU guests under TCG:
#
#   scripts/ocfs2/guest.sh fetch
#       Downloads the stock Debian kernel package (the one `linux-image-amd64`
#       depends on, not the host's kernel) into the cache and extracts it.
#       Run by scripts/deps.sh; idempotent.
#   scripts/ocfs2/guest.sh run [--nodes 1|2] [--timeout SECS] -- CMD [ARG...]
#       Formats a fresh sparse raw image as OCFS2 (on the host, with
#       mkfs.ocfs2 on the file: no loop device), boots one guest (`-M local`
#       filesystem) or two guests sharing the image (an o2cb cluster of two
#       nodes over a `-netdev socket` link), and runs CMD in each, from the
#       caller's folder, with COE_TEST_OCFS2 set to the guest's OCFS2 mount
#       and COE_OCFS2_NODE to the node number (1 or 2). One node also gets
#       a second, small OCFS2 with 128 KiB clusters (the cluster size of
#       `mkfs.ocfs2 -T vmstore`, the VM-image profile) at COE_TEST_OCFS2_128K,
#       for the refined diffs of issue #19. Every COE_* and
#       RUST_* variable of the caller is passed in. Exits with CMD's status
#       (the first non-zero one for two nodes); 125 when a guest did not
#       boot or did not finish within the timeout (default 1500 s), with the
#       end of its console log.
#
# Each guest runs the initramfs built here (busybox-static, the kernel's
# OCFS2, 9p and virtio modules loaded in `modprobe --show-depends` order),
# mounts the host's / read-only over 9p and chroots into it, so commands
# run the host's binaries with the host's libraries; a second, writable 9p
# share carries the job script in and the exit status out. The guest has
# its own tmpfs /tmp and /run: CMD and its files must live elsewhere (the
# test binary is under target/). `no_timer_check` on the kernel command
# line: under TCG on a loaded host the boot-time timer check can fail and
# panic the guest. The host keeps no mount and no loop device;
# QEMU processes and the work folder are removed on every exit path.
#
# Environment: COE_GUEST_CACHE (default /var/cache/coriolis-ovm-exporter/guest),
# COE_GUEST_MEM (MiB per guest, default 2048), COE_GUEST_CPUS (default 2),
# COE_GUEST_SIZE (image size, default 6G), COE_GUEST_CLUSTER (OCFS2 cluster
# size of that image, default 4K), COE_GUEST_SIZE_128K (the one-node second
# image with 128 KiB clusters, default 1G).
set -euo pipefail

cache=${COE_GUEST_CACHE:-/var/cache/coriolis-ovm-exporter/guest}
mem=${COE_GUEST_MEM:-2048}
cpus=${COE_GUEST_CPUS:-2}
size=${COE_GUEST_SIZE:-6G}
size128k=${COE_GUEST_SIZE_128K:-1G}
cluster=${COE_GUEST_CLUSTER:-4K}

die() {
  echo "guest.sh: $*" >&2
  exit 1
}

# The kernel package linux-image-amd64 depends on, as apt sees it now.
kernel_package() {
  apt-cache depends linux-image-amd64 2>/dev/null |
    awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}

fetch() {
  local pkg
  pkg=$(kernel_package)
  if [ -z "$pkg" ]; then
    apt-get update -qq
    pkg=$(kernel_package)
  fi
  [ -n "$pkg" ] || die "apt knows no linux-image-amd64 dependency (apt-get update?)"
  if [ -f "$cache/$pkg/ok" ]; then
    return 0
  fi
  echo "guest.sh: fetching the guest kernel $pkg (host runs $(uname -r))"
  rm -rf "${cache:?}/$pkg"
  mkdir -p "$cache/$pkg"
  (cd "$cache/$pkg" && apt-get download -q "$pkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
  local deb
  deb=$(ls "$cache/$pkg"/*.deb 2>/dev/null | head -1)
  [ -n "$deb" ] || die "apt-get download $pkg fetched nothing"
  dpkg-deb -x "$deb" "$cache/$pkg/root"
  rm -f "$deb"
  local kver
  kver=$(ls "$cache/$pkg/root/lib/modules")
  depmod -b "$cache/$pkg/root" "$kver"
  echo "$pkg" >"$cache/current"
  touch "$cache/$pkg/ok"
}

# Modules in load order, deduplicated, as paths relative to lib/modules/KVER.
MODULES=(virtio_pci virtio_blk virtio_net 9pnet_virtio 9p configfs ocfs2
  ocfs2_stack_o2cb ocfs2_dlmfs)

build_initramfs() {
  local root=$1 kver=$2 out=$3 ir
  ir=$(mktemp -d "$work/initramfs.XXXXXX")
  mkdir -p "$ir/bin" "$ir/mods" "$ir/proc" "$ir/sys" "$ir/dev" "$ir/host"
  cp /bin/busybox "$ir/bin/busybox"
  local m line seen=" "
  : >"$ir/mods/order"
  for m in "${MODULES[@]}"; do
    while read -r line; do
      case $line in
        insmod\ *) ;;
        builtin\ *) continue ;;
        *) die "unexpected modprobe output: $line" ;;
      esac
      local ko=${line#insmod }
      ko=${ko%% *}
      case $seen in *" $ko "*) continue ;; esac
      seen="$seen$ko "
      cp "$ko" "$ir/mods/"
      basename "$ko" >>"$ir/mods/order"
    done < <(modprobe -d "$root" -S "$kver" --show-depends "$m")
  done
  cat >"$ir/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
node=1
for a in $(cat /proc/cmdline); do
  case $a in coe.node=*) node=${a#coe.node=} ;; esac
done
fail() { echo "coe-guest: $*"; poweroff -f; }
for m in $(cat /mods/order); do
  insmod "/mods/$m" || fail "insmod $m failed"
done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 hostroot /host ||
  fail "cannot mount the host root"
mount -t proc proc /host/proc
mount -t sysfs sys /host/sys
mount -t devtmpfs dev /host/dev
mkdir -p /host/dev/shm /host/dev/pts
mount -t tmpfs shm /host/dev/shm
mount -t devpts devpts /host/dev/pts
mount -t tmpfs tmp /host/tmp
mount -t tmpfs run /host/run
mount -t configfs configfs /host/sys/kernel/config
mount -t tmpfs etc-ocfs2 /host/etc/ocfs2
# The kernel runs ocfs2_hb_ctl (heartbeat stop at umount) from this root,
# where the host's tools and libraries are under /host.
printf '#!/bin/busybox sh\nexec chroot /host /sbin/ocfs2_hb_ctl "$@"\n' >/bin/coe-hb-ctl
chmod +x /bin/coe-hb-ctl
echo /bin/coe-hb-ctl >/proc/sys/fs/ocfs2/nm/hb_ctl_path
mkdir -p /host/run/coe
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 coeshare /host/run/coe ||
  fail "cannot mount the job share"
hostname "node$node"
ip link set lo up
if ip link show eth0 >/dev/null 2>&1; then
  ip addr add "10.0.2.$node/24" dev eth0
  ip link set eth0 up
fi
echo "coe-guest: node $node up"
chroot /host /bin/bash /run/coe/job.sh "$node"
echo "coe-guest: node $node done (job script status $?)"
sync
poweroff -f
EOF
  chmod +x "$ir/init"
  (cd "$ir" && find . | cpio -o -H newc --quiet | gzip -1) >"$out"
}

# The script each guest runs in the chroot: OCFS2 up, CMD, OCFS2 down.
write_job() {
  local job=$1 nodes=$2
  shift 2
  {
    echo '#!/bin/bash'
    echo 'set -u'
    echo 'node=$1'
    echo 'export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
    echo 'export HOME=/tmp TMPDIR=/tmp'
    env | grep -E '^(COE|RUST)_[A-Za-z0-9_]*=' | grep -v '^COE_TEST_' | while IFS='=' read -r k v; do
      printf 'export %s=%q\n' "$k" "$v"
    done
    printf 'export COE_TEST_OCFS2=/run/coe-ocfs2 COE_OCFS2_NODE=$node COE_OCFS2_NODES=%s\n' "$nodes"
    if [ "$nodes" = 1 ]; then
      echo 'export COE_TEST_OCFS2_128K=/run/coe-ocfs2-128k'
    fi
    printf 'cd %q\n' "$PWD"
    printf 'cmd=(%s)\n' "$(printf '%q ' "$@")"
    cat <<'EOF'
st=/run/coe/status.$node
mkdir -p /run/coe-ocfs2
if [ "$COE_OCFS2_NODES" = 2 ]; then
  cat >/etc/ocfs2/cluster.conf <<CONF
cluster:
	node_count = 2
	heartbeat_mode = local
	name = coe

node:
	ip_port = 7777
	ip_address = 10.0.2.1
	number = 1
	name = node1
	cluster = coe

node:
	ip_port = 7777
	ip_address = 10.0.2.2
	number = 2
	name = node2
	cluster = coe
CONF
  o2cb register-cluster coe || { echo "o2cb register-cluster failed"; echo 124 >"$st"; exit 1; }
fi
tries=0
until mount -t ocfs2 /dev/vda /run/coe-ocfs2; do
  tries=$((tries + 1))
  if [ $tries -ge 20 ]; then
    echo "cannot mount OCFS2 on node $node"
    echo 124 >"$st"
    exit 1
  fi
  sleep 3
done
if [ -n "${COE_TEST_OCFS2_128K:-}" ]; then
  mkdir -p "$COE_TEST_OCFS2_128K"
  mount -t ocfs2 /dev/vdb "$COE_TEST_OCFS2_128K" || {
    echo "cannot mount the OCFS2 with 128 KiB clusters on node $node"
    umount /run/coe-ocfs2
    echo 124 >"$st"
    exit 1
  }
fi
echo "coe-guest: OCFS2 mounted on node $node ($(uname -r))"
"${cmd[@]}"
rc=$?
echo "coe-guest: the command exited with $rc on node $node"
cd /
sync
# Node 2 leaves the cluster first: two nodes leaving the lock domain at
# once log DLM lock-migration errors.
if [ "$COE_OCFS2_NODES" = 2 ] && [ "$node" = 1 ]; then
  for _ in $(seq 240); do
    [ -f /run/coe/status.2 ] && break
    sleep 0.5
  done
fi
if [ -n "${COE_TEST_OCFS2_128K:-}" ]; then
  umount "$COE_TEST_OCFS2_128K" || echo "umount of the 128 KiB-cluster OCFS2 failed on node $node"
fi
umount /run/coe-ocfs2 || echo "umount failed on node $node"
echo "$rc" >"$st"
sync
EOF
  } >"$job"
}

run() {
  local nodes=1 timeout=1500
  while [ $# -gt 0 ]; do
    case $1 in
      --nodes) nodes=$2; shift 2 ;;
      --timeout) timeout=$2; shift 2 ;;
      --) shift; break ;;
      *) die "unknown option $1" ;;
    esac
  done
  [ $# -gt 0 ] || die "run: no command"
  [ "$nodes" = 1 ] || [ "$nodes" = 2 ] || die "--nodes must be 1 or 2"
  local pkg root kver
  pkg=$(cat "$cache/current" 2>/dev/null) || die "no guest kernel: run scripts/ocfs2/guest.sh fetch"
  root=$cache/$pkg/root
  [ -f "$cache/$pkg/ok" ] || die "no guest kernel: run scripts/ocfs2/guest.sh fetch"
  kver=$(ls "$root/lib/modules")
  command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing: run scripts/deps.sh"
  command -v mkfs.ocfs2 >/dev/null || die "mkfs.ocfs2 missing: run scripts/deps.sh"

  work=$(mktemp -d /tmp/coe-guest.XXXXXX)
  pids=()
  trap cleanup EXIT
  trap 'exit 130' INT TERM
  build_initramfs "$root" "$kver" "$work/initramfs.gz"
  truncate -s "$size" "$work/disk.img"
  local extra_drive=()
  if [ "$nodes" = 1 ]; then
    mkfs.ocfs2 -q -F -M local -N 1 -b 4K -C "$cluster" --fs-features=refcount,xattr,unwritten \
      -L coe "$work/disk.img" >/dev/null
    truncate -s "$size128k" "$work/disk128k.img"
    mkfs.ocfs2 -q -F -M local -N 1 -b 4K -C 128K --fs-features=refcount,xattr,unwritten \
      -L coe128k "$work/disk128k.img" >/dev/null
    extra_drive=(-drive "file=$work/disk128k.img,if=none,id=d1,format=raw,cache=unsafe"
      -device "virtio-blk-pci,drive=d1")
  else
    mkfs.ocfs2 -q -F -M cluster -N 2 --cluster-stack=o2cb --cluster-name=coe -b 4K -C "$cluster" \
      --fs-features=refcount,xattr,unwritten -L coe "$work/disk.img" >/dev/null
  fi
  mkdir -p "$work/share"
  write_job "$work/share/job.sh" "$nodes" "$@"
  local port=$((20000 + RANDOM % 20000)) n
  local started=$SECONDS
  for n in $(seq 1 "$nodes"); do
    local net=() drive
    if [ "$nodes" = 2 ]; then
      if [ "$n" = 1 ]; then
        net=(-netdev "socket,id=n0,listen=127.0.0.1:$port")
      else
        net=(-netdev "socket,id=n0,connect=127.0.0.1:$port")
      fi
      net+=(-device "virtio-net-pci,netdev=n0,mac=52:54:00:00:02:0$n,romfile=")
      drive="file=$work/disk.img,if=none,id=d0,format=raw,cache=none,file.locking=off"
    else
      drive="file=$work/disk.img,if=none,id=d0,format=raw,cache=unsafe"
    fi
    # A line-buffered prefix per node; the console log also goes to a file.
    timeout -s KILL "$timeout" qemu-system-x86_64 \
      -accel tcg,thread=multi -cpu max -smp "$cpus" -m "$mem" \
      -nographic -no-reboot -nodefaults -serial stdio -pidfile "$work/qemu.$n.pid" \
      -kernel "$root/boot/vmlinuz-$kver" -initrd "$work/initramfs.gz" \
      -append "console=ttyS0 panic=-1 quiet loglevel=4 no_timer_check coe.node=$n" \
      -drive "$drive" -device "virtio-blk-pci,drive=d0,share-rw=on" "${extra_drive[@]}" \
      -virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap" \
      -virtfs "local,path=$work/share,mount_tag=coeshare,security_model=none" \
      "${net[@]}" </dev/null 2>&1 |
      tee "$work/console.$n" | sed -u "s/^/[node$n] /" &
    pids+=($!)
    [ "$nodes" = 2 ] && [ "$n" = 1 ] && sleep 2
  done
  local rc=0 r
  # When a guest ends without a status (it did not boot, or crashed), the
  # other one would wait for its peer until the timeout: stop it now.
  local alive stopped=
  while :; do
    alive=0
    for n in $(seq 1 "$nodes"); do
      if kill -0 "${pids[$((n - 1))]}" 2>/dev/null; then
        alive=$((alive + 1))
      elif [ ! -f "$work/share/status.$n" ] && [ -z "$stopped" ]; then
        echo "guest.sh: node $n ended without a status; stopping the others" >&2
        kill_qemus
        stopped=1
      fi
    done
    [ "$alive" = 0 ] && break
    sleep 1
  done
  wait
  for n in $(seq 1 "$nodes"); do
    if [ -f "$work/share/status.$n" ]; then
      r=$(cat "$work/share/status.$n")
      if [ "$rc" = 0 ]; then rc=$r; fi
    else
      echo "guest.sh: node $n did not finish (no boot, a crash or the ${timeout}s timeout);" \
        "the end of its console:" >&2
      tail -n 40 "$work/console.$n" >&2 || true
      rc=125
    fi
  done
  echo "guest.sh: $nodes node(s) done in $((SECONDS - started)) s, status $rc"
  return "$rc"
}

# The QEMUs started here, by the pids they wrote; their pipelines then end.
kill_qemus() {
  local f
  for f in "$work"/qemu.*.pid; do
    [ -f "$f" ] && kill -KILL "$(cat "$f")" 2>/dev/null
  done
  return 0
}

cleanup() {
  set +e
  kill_qemus
  wait 2>/dev/null
  rm -rf "$work"
}

case ${1:-} in
  fetch) shift; fetch "$@" ;;
  run) shift; run "$@" ;;
  *) die "usage: guest.sh fetch | guest.sh run [--nodes 1|2] [--timeout SECS] -- CMD..." ;;
esac

#!/usr/bin/env bash
# Installs what the tests, benches and fuzzing need on a fresh Debian machine
# (as root). Idempotent: only what is missing is installed.
set -euo pipefail

# python3-fusepy, fuse3, e2fsprogs: the faulty block device of tests/heal.rs
# (tests/tools/faultyfs.py under a loop device holding ext4).
# qemu-system-x86, ocfs2-tools, busybox-static, kmod, cpio, gzip: the OCFS2
# guests (scripts/ocfs2/guest.sh): QEMU, the OCFS2 tools (also run in the
# guests, which chroot into this machine's /), the initramfs.
# iproute2, ethtool, iputils-ping, curl: the WAN benchmark's shaped link
# (scripts/bench/wan.sh: namespaces, tbf, offloads off, the RTT check).
pkgs=(xfsprogs btrfs-progs db5.3-util openssl util-linux python3 python3-fusepy fuse3 e2fsprogs
  qemu-system-x86 ocfs2-tools busybox-static kmod cpio gzip iproute2 ethtool iputils-ping curl)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The guests' kernel: Debian's stock one, whatever the host runs.
"$(dirname "$0")/ocfs2/guest.sh" fetch

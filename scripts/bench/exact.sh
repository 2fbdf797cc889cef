#!/bin/bash
# Exact deltas (issue #19): over-report of a diff by extent maps without and
# with refinement by content, and the refinement's cost, on XFS (reflink)
# and btrfs. It runs the diff property tests of tests/fs_core.rs (random
# writes, punches, zero ranges and appends between two reflink clones of a
# random sparse file; odd seeds add content-preserving remaps) on fresh
# loop-mounted filesystems made here, and prints their figure lines:
#   over-report = reported bytes / bytes of truly changed 4 KiB blocks
#   cost        = seconds spent refining / GiB of candidates read per snapshot
#                 (two such reads: older and newer; debug test build)
# For OCFS2 the same tests run in the QEMU guest (scripts/ocfs2/tests.sh,
# `ocfs2_guest::diff_exact_never_misses_a_changed_byte`).
#
# Knobs: EXACT_SEEDS (default 16) trials per filesystem and mode.
# Needs root (loop mounts), xfsprogs and btrfs-progs (scripts/deps.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."

seeds=${EXACT_SEEDS:-16}
work=$(mktemp -d /tmp/coe-exact.XXXXXX)
cleanup() {
  umount "$work/xfs" 2>/dev/null || true
  umount "$work/btrfs" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/xfs" "$work/btrfs"
truncate -s 3G "$work/xfs.img" "$work/btrfs.img"
mkfs.xfs -q -m reflink=1 "$work/xfs.img"
mkfs.btrfs -q "$work/btrfs.img" >/dev/null
mount -o loop "$work/xfs.img" "$work/xfs"
mount -o loop "$work/btrfs.img" "$work/btrfs"

echo "== exact deltas: $seeds seeds per filesystem and mode ($(nproc) cores, $(uptime | sed 's/.*load average/load average/'))"
COE_TEST_XFS="$work/xfs" COE_TEST_BTRFS="$work/btrfs" COE_PROPTEST_SEEDS="$seeds" \
  cargo test --locked --test tests -- --test-threads=1 --nocapture \
  fs_core::diff_never_misses_a_changed_byte_xfs \
  fs_core::diff_never_misses_a_changed_byte_btrfs \
  fs_core::diff_exact_never_misses_a_changed_byte_xfs \
  fs_core::diff_exact_never_misses_a_changed_byte_btrfs \
  --exact 2>&1 | grep -oE 'diff property.*|test result.*' | sed 's/^/  /'

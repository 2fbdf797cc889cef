#!/usr/bin/env bash
# The one test command (README): `./scripts/test.sh`, as root.
#
# On a fresh machine as root it installs what the suite needs, makes one
# loop-mounted XFS (reflink=1) and one btrfs image for this run, hands their
# folders to the tests (COE_TEST_XFS, COE_TEST_BTRFS), runs the gates (fmt, the
# layer rule of docs/architecture.md, clippy) and the
# whole suite (clippy --all-targets also type-checks the benches), builds the
# fuzz targets and runs each fuzz target
# briefly, and unmounts and removes everything even when a step fails.
#
# Then the OCFS2 part (scripts/ocfs2/tests.sh): the `ocfs2_*` tests run
# inside QEMU guests on OCFS2 (Debian's stock kernel, TCG), not on the host.
#
# Environment: COE_FUZZ_SECONDS (default 20) per fuzz target; COE_SKIP_FUZZ=1
# to leave fuzzing out of a local run (CI never sets it).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "scripts/test.sh must run as root: it mounts loop filesystems" >&2
  exit 1
fi

./scripts/deps.sh

work=$(mktemp -d /tmp/coe-test.XXXXXX)
cleanup() {
  set +e
  for m in "$work/xfs" "$work/btrfs"; do
    if mountpoint -q "$m"; then
      umount "$m" 2>/dev/null || umount -l "$m"
    fi
  done
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

mkdir -p "$work/xfs" "$work/btrfs"
truncate -s 4G "$work/xfs.img"
mkfs.xfs -q -m reflink=1 "$work/xfs.img"
mount -o loop "$work/xfs.img" "$work/xfs"
truncate -s 4G "$work/btrfs.img"
mkfs.btrfs -q "$work/btrfs.img"
mount -o loop "$work/btrfs.img" "$work/btrfs"
export COE_TEST_XFS="$work/xfs" COE_TEST_BTRFS="$work/btrfs"
echo "test filesystems: XFS at $COE_TEST_XFS, btrfs at $COE_TEST_BTRFS"

cargo fmt --all -- --check
./scripts/check-layers.sh
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked -- --test-threads="${COE_TEST_THREADS:-2}" \
  --skip ocfs2_guest:: --skip ocfs2_cluster::
./scripts/ocfs2/tests.sh
# Benches are type-checked by clippy --all-targets above; building them in
# release here would cost a full optimised build of the tree.

if [ "${COE_SKIP_FUZZ:-0}" != 1 ]; then
  ./scripts/fuzz.sh "${COE_FUZZ_SECONDS:-20}"
fi
echo "all tests passed"

#!/usr/bin/env bash
# Runs inside the single-node OCFS2 guest (scripts/ocfs2/tests.sh starts it
# through guest.sh): the `ocfs2_guest::` tests of the test binary BIN in
# groups, one boot for all, each group's wall time printed. Every test of
# the module runs: the first group is all of it but the named groups. Exits
# non-zero if any group failed or matched no test (after running all).
#
# Usage: steps.sh BIN
set -u
bin=$1
m=ocfs2_guest::
named=(diff_never ocfs2_reflink client_full a_kill demo clusters_128k)
skips=()
for n in "${named[@]}"; do
  skips+=(--skip "$m$n")
done
rc=0
group() {
  local title=$1 start=$SECONDS r=0
  shift
  echo "== OCFS2 guest: $title"
  "$bin" "$@" --test-threads=1 --nocapture 2>&1 | tee /tmp/coe-step.log
  r=${PIPESTATUS[0]}
  if grep -q '^running 0 tests' /tmp/coe-step.log; then
    echo "no test matched: the groups of scripts/ocfs2/steps.sh are out of date"
    r=1
  fi
  echo "== OCFS2 guest: $title: $((SECONDS - start)) s, status $r"
  [ "$r" = 0 ] || rc=$r
}
group "filesystem core (FIEMAP, clones, symlinks, 100,000 extents)" "$m" "${skips[@]}"
group "diff property test, FICLONE and OCFS2_IOC_REFLINK" "$m${named[0]}"
group "OCFS2_IOC_REFLINK against swapped names" "$m${named[1]}"
group "service end to end (OCFS2 ioctl)" "$m${named[2]}"
group "kill -9 at every fault point, reconcile" "$m${named[3]}"
group "demo --dir" "$m${named[4]}"
group "128 KiB clusters: refined diffs (mixed, random 4 KiB writes), incremental bytes" "$m${named[5]}"
exit "$rc"

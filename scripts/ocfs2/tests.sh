#!/usr/bin/env bash
# The OCFS2 part of the test command (scripts/test.sh runs it; it can run
# alone, as root, after scripts/deps.sh): builds the integration test binary
# on the host and runs its `ocfs2_guest::` tests inside one QEMU guest on a
# fresh single-node OCFS2, then its `ocfs2_cluster::` tests in two guests at
# once, sharing one two-node o2cb OCFS2 (scripts/ocfs2/guest.sh). The guest chroots into
# this machine's /, so the binary runs there as built, with the same
# libraries. Each step (and each group of tests in the single-node guest,
# scripts/ocfs2/steps.sh) prints its wall time.
#
# Environment: COE_OCFS2_PROPTEST_SEEDS (default 8) trials of the diff
# property test per clone ioctl; COE_OCFS2_TIMEOUT (default 1500) seconds
# per guest run.
set -euo pipefail
cd "$(dirname "$0")/../.."

bin=$(cargo test --locked --test tests --no-run --message-format=json 2>/dev/null |
  python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if (m.get("reason") == "compiler-artifact" and m.get("executable")
            and m["target"]["name"] == "tests" and m["profile"]["test"]):
        print(m["executable"])
')
[ -x "$bin" ] || {
  echo "scripts/ocfs2/tests.sh: cannot find the integration test binary" >&2
  exit 1
}
timeout=${COE_OCFS2_TIMEOUT:-1500}

step() {
  local name=$1 start=$SECONDS rc=0
  shift
  echo "== OCFS2: $name"
  "$@" || rc=$?
  echo "== OCFS2: $name: $((SECONDS - start)) s, status $rc"
  return "$rc"
}

step "one node: filesystem core, OCFS2 reflink ioctl, service end to end, demo" \
  scripts/ocfs2/guest.sh run --timeout "$timeout" -- scripts/ocfs2/steps.sh "$bin"

step "two-node cluster: an exporter on each node, one shared repository" \
  scripts/ocfs2/guest.sh run --nodes 2 --timeout "$timeout" -- \
  "$bin" ocfs2_cluster:: --test-threads=1 --nocapture

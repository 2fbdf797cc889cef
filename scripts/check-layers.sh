#!/usr/bin/env bash
# The layer rule (docs/architecture.md), checked over the crate's own
# imports: every `crate::<module>` a file of src/ names, in `use` lines or
# inline paths, must be a layer below the file's own module. An upward
# import, or two modules of one layer importing each other, fails; with
# strict layers there can be no circle. `client` may use only the leaves and
# `wire`.
#
# Usage: scripts/check-layers.sh  (from anywhere; run by scripts/test.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

# Layer of each top-level module, bottom up. A module imports only modules
# of a lower number.
declare -A layer=(
  [error]=0 [extent]=0 [tls]=0 [duration]=0
  [wire]=1 [sys]=1
  [io]=2 [store]=2 [ovm]=2
  [snapshot]=3
  [api]=4
  [server]=5 [client]=5
  [node]=6
  [demo]=7
)
# What the client may import: the wire contract and the leaves, nothing of
# the server side.
client_may="error extent tls wire"

fail=0
while IFS= read -r file; do
  rel=${file#src/}
  mod=${rel%%/*}
  mod=${mod%.rs}
  [ "$mod" = lib ] || [ "$mod" = main ] && continue
  if [ -z "${layer[$mod]+x}" ]; then
    echo "check-layers: $file: module '$mod' has no layer; add it to scripts/check-layers.sh and docs/architecture.md" >&2
    fail=1
    continue
  fi
  # Every module named after `crate::`, outside comments, including the
  # first names inside `crate::{a::x, b::y}`.
  for dep in $(perl -0777 -ne '
      s{//[^\n]*}{}g;
      while (/crate::\{([^}]*)\}/g) { for (split /,/, $1) { print "$1\n" if /^\s*(\w+)/ } }
      while (/crate::(\w+)/g) { print "$1\n" }
    ' "$file" | sort -u); do
    [ "$dep" = "$mod" ] && continue
    if [ -z "${layer[$dep]+x}" ]; then
      echo "check-layers: $file: imports unknown module crate::$dep" >&2
      fail=1
      continue
    fi
    if [ "$mod" = client ]; then
      case " $client_may " in
        *" $dep "*) ;;
        *) echo "check-layers: $file: client imports crate::$dep (only: $client_may)" >&2; fail=1 ;;
      esac
      continue
    fi
    if [ "${layer[$dep]}" -ge "${layer[$mod]}" ]; then
      echo "check-layers: $file: $mod (layer ${layer[$mod]}) imports crate::$dep (layer ${layer[$dep]}): not below it" >&2
      fail=1
    fi
  done
done < <(find src -name '*.rs' | sort)

if [ "$fail" != 0 ]; then
  echo "check-layers: the layer rule is broken (docs/architecture.md)" >&2
  exit 1
fi
echo "check-layers: every import runs downward"

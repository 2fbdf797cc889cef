#!/bin/bash
# Runs every benchmark and prints the machine it ran on.
set -euo pipefail
here=$(dirname "$0")
echo "# $(date -u +%Y-%m-%dT%H:%MZ); $(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(awk '/MemTotal/ {printf "%.1f GiB RAM", $2/1048576}' /proc/meminfo); kernel $(uname -r); load $(cut -d" " -f1-3 /proc/loadavg)"
for s in a_single_range b_concurrent d_page_cache e_incremental; do
	"$here/$s.sh"
done

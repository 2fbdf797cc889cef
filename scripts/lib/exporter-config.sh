#!/bin/bash
# The exporter's config for the scripts that start it (sourced, not run):
# the benchmarks (scripts/bench/lib.sh, scripts/bench/wan.sh) and the soak
# runs (scripts/soak.sh; scripts/soak-heal.sh through bench/lib.sh). One
# local user, TLS from the script's own certificate, and a static
# inventory of one VM with one disk in one repository.

# write_exporter_config FILE NAME=VALUE...
#
# Writes FILE (mode 600: it holds the JWT secret). Required: db_file,
# log_file, secret, port, certificate, key, user, password_hash, repo, vm,
# disk. Optional: bind (127.0.0.1), api_lines and io_lines (more lines for
# the [api] and [io] sections, one key per line).
write_exporter_config() {
	local file=$1
	shift
	local db_file='' log_file='' secret='' bind=127.0.0.1 port='' certificate='' key='' \
		user='' password_hash='' repo='' vm='' disk='' api_lines='' io_lines='' kv name
	for kv in "$@"; do
		case ${kv%%=*} in
		db_file | log_file | secret | bind | port | certificate | key | user | password_hash | \
			repo | vm | disk | api_lines | io_lines)
			local "$kv"
			;;
		*)
			echo "write_exporter_config: unknown setting ${kv%%=*}" >&2
			return 2
			;;
		esac
	done
	for name in db_file log_file secret port certificate key user password_hash repo vm disk; do
		[ -n "${!name}" ] || { echo "write_exporter_config: $name is not set" >&2; return 2; }
	done
	cat >"$file" <<CONF
db_file = "$db_file"
log_file = "$log_file"

[jwt]
secret = "$secret"

[api]
bind = "$bind"
port = $port
$api_lines

[api.tls]
certificate = "$certificate"
key = "$key"

[[auth.users]]
username = "$user"
password_hash = "$password_hash"

[inventory]
source = "static"
ovs_agent_db_dir = "/nonexistent/db"
check_mounted = false

[[inventory.repositories]]
id = "repo"
mount_point = "$repo"

[[inventory.vms]]
name = "$vm"
disks = [ { path = "$disk", device_name = "xvda" } ]

[io]
$io_lines
CONF
	chmod 600 "$file"
}

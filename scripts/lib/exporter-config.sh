#!/bin/bash
# The exporter's config and certificates for the scripts that start it
# (sourced, not run):
# the benchmarks (scripts/bench/lib.sh, scripts/bench/wan.sh) and the soak
# runs (scripts/soak.sh; scripts/soak-heal.sh through bench/lib.sh). One
# local user, TLS from the script's own certificate, and a static
# inventory of one VM with one disk in one repository.

# make_exporter_certs DIR CA_CN SERVER_CN SAN
#
# A CA (DIR/ca.pem, DIR/ca.key) and the exporter's certificate signed by it
# (DIR/srv.pem, DIR/srv.key) for subjectAltName SAN (e.g.
# DNS:localhost,IP:127.0.0.1); P-256 keys, valid two days.
make_exporter_certs() {
	local dir=$1 ca_cn=$2 cn=$3 san=$4
	openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
		-keyout "$dir/ca.key" -out "$dir/ca.pem" -days 2 -subj "/CN=$ca_cn" 2>/dev/null
	openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
		-keyout "$dir/srv.key" -out "$dir/srv.csr" -subj "/CN=$cn" 2>/dev/null
	printf 'subjectAltName=%s\n' "$san" >"$dir/ext.cnf"
	openssl x509 -req -in "$dir/srv.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
		-CAcreateserial -out "$dir/srv.pem" -days 2 -extfile "$dir/ext.cnf" 2>/dev/null
}

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

#!/usr/bin/env bash
# Check a running exporter against docs/openapi.yaml with schemathesis
# (property-based API testing, from PyPI).
#
#   scripts/schemathesis.sh --local [schemathesis args...]
#       Builds the binary, makes a throwaway CA and server certificate with
#       openssl, starts the exporter on 127.0.0.1 with a local user, runs
#       schemathesis against it, and stops it.
#
#   COE_URL=https://host:5544 COE_USER=u COE_PASSWORD=p [COE_CA=ca.pem] \
#   scripts/schemathesis.sh [schemathesis args...]
#       Runs against a server already running (a test node: schemathesis
#       sends many requests, POST and DELETE included).
#
# Needs python3 (venv) and, for --local, cargo and openssl. The venv lives
# in the cargo target folder.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="$(realpath -m "${CARGO_TARGET_DIR:-target}")/schemathesis-venv"
if [ ! -x "$venv/bin/schemathesis" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "schemathesis>=4,<5" "argon2-cffi>=23"
fi
py="$venv/bin/python"

pid=""
work=""
cleanup() {
  if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  if [ -n "$work" ]; then rm -rf "$work"; fi
}
trap cleanup EXIT INT TERM

if [ "${1:-}" = "--local" ]; then
  shift
  work=$(mktemp -d /tmp/coe-schemathesis.XXXXXX)
  cargo build --quiet --bin coriolis-ovm-exporter
  # A private copy: a shared target folder may be rebuilt under us.
  cp "${CARGO_TARGET_DIR:-target}/debug/coriolis-ovm-exporter" "$work/exporter"
  bin="$work/exporter"
  (
    cd "$work"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -keyout ca.key -out ca.pem -days 1 -subj "/CN=coe schemathesis ca" 2>/dev/null
    printf 'basicConstraints=CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >srv.ext
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -keyout srv.key -out srv.csr -subj "/CN=localhost" 2>/dev/null
    openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
      -out srv.pem -days 1 -extfile srv.ext 2>/dev/null
  )
  port=$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  COE_USER=schemathesis
  COE_PASSWORD=$(openssl rand -hex 16)
  hash=$(COE_PASSWORD="$COE_PASSWORD" "$py" -c 'import os, argon2; print(argon2.PasswordHasher().hash(os.environ["COE_PASSWORD"]))')
  cat >"$work/config.toml" <<TOML
db_file = "$work/exporter.db"
log_file = "$work/exporter.log"
[jwt]
secret = "$(openssl rand -hex 32)"
[api]
bind = "127.0.0.1"
port = $port
[api.tls]
certificate = "$work/srv.pem"
key = "$work/srv.key"
[auth]
# schemathesis sends many bad logins on purpose.
login_max_failures = 100000
[[auth.users]]
username = "$COE_USER"
password_hash = "$hash"
TOML
  "$bin" -config "$work/config.toml" &
  pid=$!
  COE_URL="https://127.0.0.1:$port"
  COE_CA="$work/ca.pem"
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || { echo "the exporter exited; see above" >&2; exit 1; }
    if "$py" -c 'import socket,sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1)' "$port" 2>/dev/null; then break; fi
    sleep 0.1
  done
fi

: "${COE_URL:?set COE_URL (or use --local)}" "${COE_USER:?set COE_USER}" "${COE_PASSWORD:?set COE_PASSWORD}"
verify="${COE_CA:-false}"

token=$(COE_URL="$COE_URL" COE_USER="$COE_USER" COE_PASSWORD="$COE_PASSWORD" COE_CA="$verify" "$py" - <<'PY'
import json, os, ssl, urllib.request
ca = os.environ["COE_CA"]
ctx = ssl.create_default_context(cafile=None if ca == "false" else ca)
if ca == "false":
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
body = json.dumps({"username": os.environ["COE_USER"], "password": os.environ["COE_PASSWORD"]}).encode()
req = urllib.request.Request(os.environ["COE_URL"] + "/api/v1/auth/login", data=body,
                             headers={"Content-Type": "application/json"}, method="POST")
with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
    print(json.load(r)["token"])
PY
)

# Run from the venv folder: schemathesis keeps a `.schemathesis` cache in
# its working folder, which must not land in the repository.
repo=$(pwd)
cd "$venv"
"$venv/bin/schemathesis" run "$repo/docs/openapi.yaml" \
  --url "$COE_URL" \
  --tls-verify "$verify" \
  --header "Authorization: Bearer $token" \
  --checks all \
  "$@"

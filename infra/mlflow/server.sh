#!/usr/bin/env bash
# The MLflow tracking server for selva jobs: PostgreSQL metadata, artifacts proxied by the server,
# basic-auth login on every request. Run it as a service (systemd, a container) on a private host.
#
# Configuration, all from the environment (nothing secret is written in a committed file):
#   MLFLOW_BACKEND_STORE_URI      required: postgresql://mlflow@db.internal:5432/mlflow
#                                 (no password in the URI: PGPASSWORD or ~/.pgpass, mode 600, give it)
#   MLFLOW_AUTH_DATABASE_URI      required: the user store, e.g. postgresql://mlflow@db.internal:5432/mlflow_auth
#   MLFLOW_ARTIFACTS_DESTINATION  required: s3://bucket/mlflow (credentials from the host's IAM role) or a
#                                 shared path; clients upload and download through this server
#   MLFLOW_AUTH_ADMIN_PASSWORD    the admin's password the first time the user store is created, or
#   MLFLOW_AUTH_ADMIN_PASSWORD_FILE  a file (mode 600) holding it; MLflow has no default password
#   MLFLOW_AUTH_ADMIN_USERNAME    default admin
#   MLFLOW_AUTH_CONFIG_PATH       optional: your own basic_auth.ini (see basic_auth.ini.example);
#                                 without it one is written from the variables above, mode 600
#   MLFLOW_HOST                   default 127.0.0.1 (behind a TLS reverse proxy on this host), or this
#                                 host's private IP; 0.0.0.0 / :: are refused
#   MLFLOW_PORT                   default 5000
#   MLFLOW_WORKERS                default 4
#   MLFLOW_ALLOWED_HOSTS          the Host names clients use (e.g. mlflow.internal.example.com), when not
#                                 localhost or a private IP (MLflow's default)
#
# Basic auth sends the password with every request: off the loopback interface, put a TLS reverse
# proxy (nginx, Caddy, an internal load balancer) in front, or use a network you trust.
# Jobs then use MLFLOW_TRACKING_URI=https://mlflow.internal.example.com, MLFLOW_TRACKING_USERNAME and
# MLFLOW_TRACKING_PASSWORD (or ~/.mlflow/credentials); create their user as the admin:
#   curl -u "admin:$ADMIN_PW" -X POST https://HOST/api/2.0/mlflow/users/create \
#       -H 'Content-Type: application/json' -d '{"username": "selva-jobs", "password": "..."}'
set -euo pipefail

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI (postgresql://USER@HOST:5432/DB)}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION (s3://BUCKET/PREFIX or a shared path)}"
export MLFLOW_BACKEND_STORE_URI MLFLOW_ARTIFACTS_DESTINATION  # read by `mlflow server`: not on its command line

host=${MLFLOW_HOST:-127.0.0.1}
# Every spelling of "all interfaces" is refused (0.0.0.0, ::, but also 0, ::0, 0:0:0:0:0:0:0:0, 0x0...): the
# name is resolved as the server's bind would resolve it, and any unspecified address among the results
# stops the script. A name that does not resolve is left to mlflow, which then cannot bind either.
if [[ -z $host ]] || ! "${PYTHON:-python3}" - "$host" <<'PY'
import ipaddress
import socket
import sys

name = sys.argv[1].strip().strip("[]")
try:
    found = {info[4][0] for info in socket.getaddrinfo(name, None)}
except (socket.gaierror, UnicodeError):
    sys.exit(0)
sys.exit(1 if any(ipaddress.ip_address(a.split("%")[0]).is_unspecified for a in found) else 0)
PY
then
    echo "error: MLFLOW_HOST=$host would listen on every interface: give this host's private IP," \
        "or keep 127.0.0.1 behind a TLS reverse proxy" >&2
    exit 2
fi

if [[ -n ${MLFLOW_AUTH_ADMIN_PASSWORD_FILE:-} ]]; then
    MLFLOW_AUTH_ADMIN_PASSWORD=$(<"$MLFLOW_AUTH_ADMIN_PASSWORD_FILE")
    export MLFLOW_AUTH_ADMIN_PASSWORD
fi

if [[ -z ${MLFLOW_AUTH_CONFIG_PATH:-} ]]; then
    : "${MLFLOW_AUTH_DATABASE_URI:?set MLFLOW_AUTH_DATABASE_URI (the user store) or MLFLOW_AUTH_CONFIG_PATH}"
    umask 077
    config_dir=$(mktemp -d)
    trap 'rm -rf "$config_dir"' EXIT
    # configparser reads "%" as interpolation: written as "%%"
    cat >"$config_dir/basic_auth.ini" <<EOF
[mlflow]
default_permission = READ
database_uri = ${MLFLOW_AUTH_DATABASE_URI//%/%%}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
    export MLFLOW_AUTH_CONFIG_PATH=$config_dir/basic_auth.ini
fi

args=(server --app-name basic-auth --serve-artifacts --host "$host" --port "${MLFLOW_PORT:-5000}"
    --workers "${MLFLOW_WORKERS:-4}")
if [[ -n ${MLFLOW_ALLOWED_HOSTS:-} ]]; then
    args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi
echo "mlflow ${args[*]} (backend and artifacts from MLFLOW_BACKEND_STORE_URI, MLFLOW_ARTIFACTS_DESTINATION)"
# not exec: the EXIT trap removes the generated config when the server stops
"${MLFLOW:-mlflow}" "${args[@]}" &
server=$!
trap 'kill -TERM "$server" 2>/dev/null || true' TERM INT
wait "$server" || wait "$server"

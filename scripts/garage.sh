#!/usr/bin/env bash
# Start or stop a single-node Garage S3 server on 127.0.0.1 for the tests and benchmarks.
#   scripts/garage.sh start DIR   installs Garage if needed, starts it with its data in DIR, and prints
#                                 `export BITSMITH_TEST_S3_...` lines to eval
#   scripts/garage.sh stop DIR    stops it
set -euo pipefail
cmd=${1:?usage: garage.sh start|stop DIR}
dir=${2:?usage: garage.sh start|stop DIR}
here=$(cd "$(dirname "$0")" && pwd)
. "$here/processes.sh"

case "$cmd" in
start)
  garage=$("$here/install-garage.sh")
  mkdir -p "$dir"
  s3_port=$(free_port)
  rpc_port=$(free_port)
  access_key=GK$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
  secret_key=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
  bucket=bitsmith-test
  cat >"$dir/garage.toml" <<EOT
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "lmdb"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc_port"
rpc_public_addr = "127.0.0.1:$rpc_port"
rpc_secret = "$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')"
[s3_api]
s3_region = "us-east-1"
api_bind_addr = "127.0.0.1:$s3_port"
root_domain = ".s3.garage.localhost"
EOT
  GARAGE_DEFAULT_ACCESS_KEY=$access_key GARAGE_DEFAULT_SECRET_KEY=$secret_key GARAGE_DEFAULT_BUCKET=$bucket \
    RUST_LOG=${GARAGE_LOG:-warn} spawn "$dir" garage "$garage" -c "$dir/garage.toml" server --single-node \
    --default-bucket
  # Ready when the S3 API answers a request (403 without a signature), not merely when the port opens.
  ready=no
  for _ in $(seq 1 300); do
    status=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$s3_port/$bucket" || true)
    if [ "$status" = 403 ] || [ "$status" = 200 ]; then ready=yes; break; fi
    running "$dir" garage || break
    sleep 0.1
  done
  [ "$ready" = yes ] || fail_with_log "$dir" garage "garage did not come up on 127.0.0.1:$s3_port"
  echo "export BITSMITH_TEST_S3_ENDPOINT=http://127.0.0.1:$s3_port"
  echo "export BITSMITH_TEST_S3_BUCKET=$bucket"
  echo "export BITSMITH_TEST_S3_ACCESS_KEY=$access_key"
  echo "export BITSMITH_TEST_S3_SECRET_KEY=$secret_key"
  ;;
stop) stop "$dir" garage ;;
*) echo "usage: garage.sh start|stop DIR" >&2; exit 2 ;;
esac

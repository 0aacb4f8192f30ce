#!/usr/bin/env bash
# Start or stop fake-gcs-server on 127.0.0.1 for the tests, with one bucket.
#   scripts/fake-gcs.sh start DIR   installs it if needed, starts it, creates the bucket, and prints `export ...`
#                                   lines to eval
#   scripts/fake-gcs.sh stop DIR    stops it
# It serves the JSON API and object downloads, not XML multipart uploads, so the tests read GCS objects as
# sources but cannot use it as a store. Clients reach it with `endpoint=$BITSMITH_TEST_GCS_ENDPOINT` and a
# service account key that says `"disable_oauth": true`.
set -euo pipefail
cmd=${1:?usage: fake-gcs.sh start|stop DIR}
dir=${2:?usage: fake-gcs.sh start|stop DIR}
here=$(cd "$(dirname "$0")" && pwd)
bucket=bitsmith-test

. "$here/processes.sh"

case "$cmd" in
start)
  server=$("$here/install-fake-gcs.sh")
  mkdir -p "$dir"
  port=$(free_port)
  endpoint=http://127.0.0.1:$port
  spawn "$dir" fake-gcs "$server" -scheme http -host 127.0.0.1 -port "$port" -public-host "127.0.0.1:$port" \
    -backend memory -log-level warn
  # Creating the bucket is the readiness check.
  ready=no
  for _ in $(seq 1 300); do
    status=$(curl -s -o /dev/null -w '%{http_code}' -X POST -H 'Content-Type: application/json' \
      -d "{\"name\": \"$bucket\"}" "$endpoint/storage/v1/b?project=bitsmith" || true)
    if [ "$status" = 200 ] || [ "$status" = 409 ]; then ready=yes; break; fi
    running "$dir" fake-gcs || break
    sleep 0.1
  done
  [ "$ready" = yes ] || fail_with_log "$dir" fake-gcs "fake-gcs-server did not come up on $endpoint"
  echo "export BITSMITH_TEST_GCS_ENDPOINT=$endpoint"
  echo "export BITSMITH_TEST_GCS_BUCKET=$bucket"
  ;;
stop) stop "$dir" fake-gcs ;;
*) echo "usage: fake-gcs.sh start|stop DIR" >&2; exit 2 ;;
esac

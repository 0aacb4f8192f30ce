#!/usr/bin/env bash
# Run a command with a Garage S3 server on loopback: installs Garage on first use, starts it, exports
# BITSMITH_TEST_S3_{ENDPOINT,BUCKET,ACCESS_KEY,SECRET_KEY} for the command, and stops it afterwards.
#   scripts/with-s3.sh cargo test --locked
set -euo pipefail
cd "$(dirname "$0")/.."
state=$(mktemp -d "${TMPDIR:-/tmp}/bitsmith-s3.XXXXXX")
cleanup() { scripts/garage.sh stop "$state"; rm -rf "$state"; }
trap cleanup EXIT
eval "$(scripts/garage.sh start "$state")"
"$@"

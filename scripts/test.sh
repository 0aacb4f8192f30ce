#!/usr/bin/env bash
# The whole test suite: starts what the tests need (Garage S3 on loopback), runs them, and stops it again.
set -euo pipefail
cd "$(dirname "$0")/.."
state=$(mktemp -d "${TMPDIR:-/tmp}/bitsmith-test.XXXXXX")
cleanup() { scripts/garage.sh stop "$state"; rm -rf "$state"; }
trap cleanup EXIT
eval "$(scripts/garage.sh start "$state/garage")"
cargo test --locked "$@"

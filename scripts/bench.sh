#!/usr/bin/env bash
# Benchmarks: starts Garage for the S3 rows, runs the bench target (release build), prints its table.
set -euo pipefail
cd "$(dirname "$0")/.."
state=$(mktemp -d "${TMPDIR:-/tmp}/bitsmith-bench.XXXXXX")
cleanup() { scripts/garage.sh stop "$state"; rm -rf "$state"; }
trap cleanup EXIT
eval "$(scripts/garage.sh start "$state/garage")"
cargo bench --locked --bench pipeline -- "$@"

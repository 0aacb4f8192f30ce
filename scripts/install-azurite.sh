#!/usr/bin/env bash
# Install Azurite (Microsoft's Azure Storage emulator, npm `azurite`) for the Azure Blob tests, with the machine's
# Node.js (installed from Debian when missing). Cached outside the checkout; prints the path of `azurite-blob`.
set -euo pipefail
AZURITE_VERSION=${AZURITE_VERSION:-3.37.0}
AZURITE_ROOT=${AZURITE_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/bitsmith/azurite-$AZURITE_VERSION}
bin="$AZURITE_ROOT/node_modules/.bin/azurite-blob"
if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi
if ! command -v npm >/dev/null; then
  apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null
fi
echo "installing azurite $AZURITE_VERSION into $AZURITE_ROOT (first run on this machine: about a minute)" >&2
mkdir -p "$(dirname "$AZURITE_ROOT")"
# Into a staging directory first, so that an interrupted install is never taken for a finished one.
rm -rf "$AZURITE_ROOT.partial"
npm install --prefix "$AZURITE_ROOT.partial" --no-audit --no-fund --loglevel=error "azurite@$AZURITE_VERSION" >&2
rm -rf "$AZURITE_ROOT"
mv "$AZURITE_ROOT.partial" "$AZURITE_ROOT"
echo "$bin"

#!/usr/bin/env bash
# Start or stop Azurite's Blob service on 127.0.0.1 for the tests and benchmarks, with one container.
#   scripts/azurite.sh start DIR   installs Azurite if needed, starts it with its data in DIR, creates the
#                                  container, and prints `export ...` lines to eval
#   scripts/azurite.sh stop DIR    stops it
# Clients reach it as a storage account at an explicit endpoint:
#   az://CONTAINER/PREFIX?endpoint=$BITSMITH_TEST_AZURE_ENDPOINT with the account's name and key,
# Azurite's well-known development account (documented by Microsoft, the same in every Azurite).
set -euo pipefail
cmd=${1:?usage: azurite.sh start|stop DIR}
dir=${2:?usage: azurite.sh start|stop DIR}
here=$(cd "$(dirname "$0")" && pwd)
container=bitsmith-test
account=devstoreaccount1
key=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==

. "$here/processes.sh"

case "$cmd" in
start)
  azurite=$("$here/install-azurite.sh")
  mkdir -p "$dir/data"
  port=$(free_port)
  spawn "$dir" azurite "$azurite" --blobHost 127.0.0.1 --blobPort "$port" --location "$dir/data" --silent \
    --disableProductStyleUrl --skipApiVersionCheck
  endpoint=http://127.0.0.1:$port
  # Creating the container is the readiness check: it needs the Blob service to answer a signed request.
  ready=no
  for _ in $(seq 1 300); do
    if python3 "$here/azurite-container.py" "$endpoint" "$account" "$key" "$container" 2>/dev/null; then
      ready=yes
      break
    fi
    running "$dir" azurite || break
    sleep 0.1
  done
  [ "$ready" = yes ] || fail_with_log "$dir" azurite "azurite did not come up on $endpoint"
  echo "export BITSMITH_TEST_AZURE_ENDPOINT=$endpoint/$account"
  echo "export BITSMITH_TEST_AZURE_CONTAINER=$container"
  echo "export BITSMITH_TEST_AZURE_ACCOUNT=$account"
  echo "export BITSMITH_TEST_AZURE_KEY=$key"
  ;;
# It closes the Blob service on SIGTERM but may then linger on open handles: wait only briefly.
stop) stop "$dir" azurite 3 ;;
*) echo "usage: azurite.sh start|stop DIR" >&2; exit 2 ;;
esac

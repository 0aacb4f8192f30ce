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

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

case "$cmd" in
start)
  azurite=$("$here/install-azurite.sh")
  mkdir -p "$dir/data"
  port=$(free_port)
  # In a session of its own, which records its own pid: `$!` would name setsid when setsid has to fork.
  setsid sh -c 'echo $$ >"$0"; exec "$@"' "$dir/azurite.pid" "$azurite" --blobHost 127.0.0.1 \
    --blobPort "$port" --location "$dir/data" --silent --disableProductStyleUrl --skipApiVersionCheck \
    >"$dir/azurite.log" 2>&1 </dev/null &
  for _ in $(seq 1 50); do [ -s "$dir/azurite.pid" ] && break; sleep 0.1; done
  endpoint=http://127.0.0.1:$port
  # Creating the container is the readiness check: it needs the Blob service to answer a signed request.
  ready=no
  for _ in $(seq 1 300); do
    if python3 "$here/azurite-container.py" "$endpoint" "$account" "$key" "$container" 2>/dev/null; then ready=yes; break; fi
    kill -0 "$(cat "$dir/azurite.pid")" 2>/dev/null || break
    sleep 0.1
  done
  if [ "$ready" != yes ]; then
    echo "azurite did not come up on $endpoint; its log:" >&2
    tail -20 "$dir/azurite.log" >&2
    exit 1
  fi
  echo "export BITSMITH_TEST_AZURE_ENDPOINT=$endpoint/$account"
  echo "export BITSMITH_TEST_AZURE_CONTAINER=$container"
  echo "export BITSMITH_TEST_AZURE_ACCOUNT=$account"
  echo "export BITSMITH_TEST_AZURE_KEY=$key"
  ;;
stop)
  if [ -f "$dir/azurite.pid" ]; then
    pid=$(cat "$dir/azurite.pid")
    # It closes the Blob service on SIGTERM but may then linger on open handles: wait briefly, then kill.
    kill -- "-$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$dir/azurite.pid"
  fi
  ;;
*) echo "usage: azurite.sh start|stop DIR" >&2; exit 2 ;;
esac

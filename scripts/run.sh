#!/usr/bin/env bash
# `make run`: the operator, in the foreground, until Ctrl-C.
#   - With a reachable cluster in the current kubeconfig: installs the CRDs there and reconciles it.
#   - Without one: starts a local control plane (etcd + kube-apiserver, built and cached on first use), installs
#     the CRDs, serves examples/ on 127.0.0.1:8765, applies the example Packages and Droplet, and shows them once
#     they have settled. Its state lives in .bitsmith/local and starts afresh on every run.
# The controller also serves the CF v3 API on $API_LISTEN (default 127.0.0.1:9000), plain HTTP.
# The store is the embedded file:// store in .bitsmith/ unless BITSMITH_STORE says otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/bitsmith
examples_port=${EXAMPLES_PORT:-8765}
metrics_listen=${METRICS_LISTEN:-127.0.0.1:8080}
api_listen=${API_LISTEN:-127.0.0.1:9000}
pids=()
local_dir=""
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  if [ -n "$local_dir" ]; then scripts/apiserver.sh stop "$local_dir/apiserver"; fi
}
trap cleanup EXIT

command -v kubectl >/dev/null || { apt-get update -qq && apt-get install -y -qq kubectl; }

if kubectl version --request-timeout=5s >/dev/null 2>&1; then
  echo "bitsmith: using the cluster of context $(kubectl config current-context)"
  store=${BITSMITH_STORE:-.bitsmith/store}
else
  echo "bitsmith: no reachable cluster in the kubeconfig; starting a local control plane in .bitsmith/local"
  local_dir=.bitsmith/local
  scripts/apiserver.sh stop "$local_dir/apiserver" 2>/dev/null || true
  rm -rf "$local_dir"
  mkdir -p "$local_dir"
  eval "$(scripts/apiserver.sh start "$PWD/$local_dir/apiserver")"
  export KUBECONFIG
  store=${BITSMITH_STORE:-$local_dir/store}
fi

kubectl apply -f crds/ >/dev/null
kubectl wait --for condition=established --timeout=60s crd/packages.bitsmith.dev crd/droplets.bitsmith.dev >/dev/null

if [ -n "$local_dir" ]; then
  python3 -m http.server --bind 127.0.0.1 --directory examples "$examples_port" >/dev/null 2>&1 &
  pids+=($!)
  kubectl apply -f examples/packages.yaml -f examples/droplet.yaml
  # Show the objects once none is still in flight.
  (
    for _ in $(seq 1 120); do
      states=$(kubectl get packages,droplets -o 'jsonpath={range .items[*]}{.status.state}{"\n"}{end}' 2>/dev/null)
      if [ -n "$states" ] && ! grep -qxE 'PROCESSING_UPLOAD|COPYING|' <<<"$states"; then
        echo
        kubectl get packages,droplets
        echo
        echo "bitsmith: the CF v3 API is on http://$api_listen. Upload the waiting package's bits with:"
        echo "  export KUBECONFIG=$KUBECONFIG"
        echo "  TOKEN=\$(kubectl config view --raw -o jsonpath='{.users[0].user.token}')"
        echo "  GUID=\$(kubectl get pkg hello-upload -o jsonpath='{.metadata.uid}')"
        echo "  curl -H \"Authorization: bearer \$TOKEN\" -F bits=@examples/sample-app.zip http://$api_listen/v3/packages/\$GUID/upload"
        echo "bitsmith: Ctrl-C stops everything"
        exit 0
      fi
      sleep 1
    done
    echo "bitsmith: the examples did not settle within 2 minutes:" >&2
    kubectl get packages,droplets >&2
  ) &
  pids+=($!)
fi

# On the local control plane the examples are served on loopback, which sources may reach only when allowed.
source_args=()
if [ -n "$local_dir" ]; then source_args=(--allow-source-cidr 127.0.0.1/32); fi
"$bin" controller --store "$store" --metrics-listen "$metrics_listen" --listen "$api_listen" \
  --instance "$(hostname)-make-run" "${source_args[@]}"

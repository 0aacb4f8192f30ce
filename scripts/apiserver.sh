#!/usr/bin/env bash
# Start or stop etcd + kube-apiserver on 127.0.0.1 for the tests: HTTPS with its own CA, a static admin token,
# RBAC authorization, service-account tokens, and a front proxy for aggregated APIs. A kube-controller-manager
# runs only the ClusterRole aggregation controller, so that roles labelled aggregate-to-edit/view reach the
# built-in edit and view roles as on a real cluster; nothing else (no garbage collection, no namespace deletion).
#   scripts/apiserver.sh start DIR   builds the binaries if needed, starts them with state in DIR, writes
#                                    DIR/kubeconfig and prints `export KUBECONFIG=...`
#   scripts/apiserver.sh restart-apiserver DIR   stops kube-apiserver and starts it again on the same address
#                                    with the same data, as when a control plane is upgraded or its Pod moves
#   scripts/apiserver.sh stop DIR
# BITSMITH_APISERVER_ARGS adds flags to kube-apiserver (e.g. a short --request-timeout).
set -euo pipefail
cmd=${1:?usage: apiserver.sh start|restart-apiserver|stop DIR}
dir=${2:?usage: apiserver.sh start|restart-apiserver|stop DIR}
here=$(cd "$(dirname "$0")" && pwd)
. "$here/processes.sh"

certs() {
  local d="$dir/certs"
  mkdir -p "$d"
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=bitsmith-test-ca \
    -keyout "$d/ca.key" -out "$d/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj /CN=kube-apiserver -keyout "$d/server.key" -out "$d/server.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' >"$d/ext.cnf"
  openssl x509 -req -in "$d/server.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial -days 30 \
    -extfile "$d/ext.cnf" -out "$d/server.crt" 2>/dev/null
  openssl genrsa -out "$d/sa.key" 2048 2>/dev/null
  openssl rsa -in "$d/sa.key" -pubout -out "$d/sa.pub" 2>/dev/null
  echo "$token,admin,admin,system:masters" >"$d/tokens.csv"
  # The front proxy: the client certificate the aggregator presents to aggregated API servers, from its own CA.
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=bitsmith-test-front-proxy-ca \
    -keyout "$d/front-proxy-ca.key" -out "$d/front-proxy-ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj /CN=front-proxy-client \
    -keyout "$d/front-proxy-client.key" -out "$d/front-proxy-client.csr" 2>/dev/null
  printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' >"$d/client.cnf"
  openssl x509 -req -in "$d/front-proxy-client.csr" -CA "$d/front-proxy-ca.crt" -CAkey "$d/front-proxy-ca.key" \
    -CAcreateserial -days 30 -extfile "$d/client.cnf" -out "$d/front-proxy-client.crt" 2>/dev/null
}

# kube-apiserver on $api_port over etcd on $etcd_port, with the certificates in $dir/certs.
start_apiserver() {
  spawn "$dir" apiserver "$root/bin/kube-apiserver" --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --secure-port "$api_port" --advertise-address 127.0.0.1 \
    --tls-cert-file "$dir/certs/server.crt" --tls-private-key-file "$dir/certs/server.key" \
    --client-ca-file "$dir/certs/ca.crt" \
    --token-auth-file "$dir/certs/tokens.csv" --authorization-mode RBAC \
    --service-cluster-ip-range 10.0.0.0/24 --endpoint-reconciler-type none \
    --service-account-key-file "$dir/certs/sa.pub" --service-account-signing-key-file "$dir/certs/sa.key" \
    --service-account-issuer https://kubernetes.default.svc \
    --requestheader-client-ca-file "$dir/certs/front-proxy-ca.crt" --requestheader-allowed-names front-proxy-client \
    --requestheader-username-headers X-Remote-User --requestheader-group-headers X-Remote-Group \
    --requestheader-extra-headers-prefix X-Remote-Extra- \
    --proxy-client-cert-file "$dir/certs/front-proxy-client.crt" \
    --proxy-client-key-file "$dir/certs/front-proxy-client.key" \
    --enable-priority-and-fairness=false ${BITSMITH_APISERVER_ARGS:-}
}

# Wait until kube-apiserver answers /readyz with the admin token.
await_apiserver() {
  for _ in $(seq 1 240); do
    running "$dir" apiserver || fail_with_log "$dir" apiserver "kube-apiserver exited"
    if curl -fsS --cacert "$dir/certs/ca.crt" -H "Authorization: Bearer $token" \
      "https://127.0.0.1:$api_port/readyz" >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.25
  done
  fail_with_log "$dir" apiserver "kube-apiserver did not become ready"
}

case "$cmd" in
start)
  root=$("$here/install-apiserver.sh")
  mkdir -p "$dir"
  token=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
  api_port=$(free_port) etcd_port=$(free_port) etcd_peer=$(free_port)
  echo "$api_port $etcd_port $token" >"$dir/ports"
  certs
  spawn "$dir" etcd "$root/bin/etcd" --data-dir "$dir/etcd" --name bitsmith-test \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "bitsmith-test=http://127.0.0.1:$etcd_peer"
  start_apiserver
  cat >"$dir/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: bitsmith-test
  cluster: {server: "https://127.0.0.1:$api_port", certificate-authority: "$dir/certs/ca.crt"}
users:
- name: admin
  user: {token: "$token"}
contexts:
- name: bitsmith-test
  context: {cluster: bitsmith-test, user: admin, namespace: default}
current-context: bitsmith-test
KC
  await_apiserver
  spawn "$dir" controller-manager "$root/bin/kube-controller-manager" --kubeconfig "$dir/kubeconfig" \
    --controllers clusterrole-aggregation --leader-elect=false --port 0 --secure-port 0
  echo "export KUBECONFIG=$dir/kubeconfig"
  ;;
restart-apiserver)
  root=$("$here/install-apiserver.sh")
  read -r api_port etcd_port token <"$dir/ports"
  stop "$dir" apiserver
  start_apiserver
  await_apiserver
  ;;
stop)
  stop "$dir" controller-manager
  stop "$dir" apiserver
  stop "$dir" etcd
  ;;
*) echo "usage: apiserver.sh start|restart-apiserver|stop DIR" >&2; exit 2 ;;
esac

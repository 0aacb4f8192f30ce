#!/usr/bin/env bash
# Build a real kube-apiserver and kube-controller-manager (v1.20.2, from Debian's `kubernetes` source package)
# and take etcd from Debian, for the tests that need a control plane. No registry ships these binaries, so they
# are built here with Debian's Go 1.19 (unpacked, not installed). Cached outside the checkout: only the first run on a machine pays
# the 6-10 minute build. Prints the directory holding bin/kube-apiserver, bin/kube-controller-manager and bin/etcd.
set -euo pipefail
WORK=${APISERVER_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/bitsmith/apiserver-1.20.2}
if [ -x "$WORK/bin/kube-apiserver" ] && [ -x "$WORK/bin/kube-controller-manager" ] && [ -x "$WORK/bin/etcd" ]; then
  echo "$WORK"
  exit 0
fi
echo "building kube-apiserver and kube-controller-manager 1.20.2 into $WORK (first run on this machine: 6-10 minutes)" >&2
rm -rf "$WORK/build"
B=$WORK/build
mkdir -p "$B"/{apt/lists/partial,apt/cache/archives/partial,apt/parts,debs,root,src,shim,gocache,gotmp,gopath/src/k8s.io} "$WORK/bin"
cd "$B"
APTO=(-o Dir::Etc::SourceList="$B/apt/sources.list" -o Dir::Etc::SourceParts="$B/apt/parts"
      -o Dir::State::Lists="$B/apt/lists" -o Dir::Cache="$B/apt/cache" -o Debug::NoLocking=1)
printf 'deb http://deb.debian.org/debian bookworm main\ndeb-src http://deb.debian.org/debian bookworm main\n' >apt/sources.list
apt-get "${APTO[@]}" update -qq >&2
(cd src && apt-get "${APTO[@]}" source --download-only kubernetes -qq >&2)   # the orig tarball includes vendor/
(cd debs && apt-get "${APTO[@]}" download -qq golang-1.19-go golang-1.19-src etcd-server golang-github-modern-go-reflect2-dev >&2)
for d in debs/*.deb; do dpkg-deb -x "$d" root; done
tar xzf src/kubernetes_*.orig.tar.gz -C src
K=$B/src/kubernetes-1.20.2
# The vendored reflect2 1.0.1 crashes under Go >= 1.18 the first time a custom resource is served; use 1.0.2.
rm -rf "$K/vendor/github.com/modern-go/reflect2"
cp -r root/usr/share/gocode/src/github.com/modern-go/reflect2 "$K/vendor/github.com/modern-go/reflect2"
# hack/ scripts want rsync only to copy files.
printf '#!/bin/sh\nwhile [ $# -gt 0 ]; do case "$1" in -*) shift;; *) break;; esac; done\nexec cp -p "$@"\n' >shim/rsync
chmod +x shim/rsync
ln -sfn "$K" gopath/src/k8s.io/kubernetes
export GOROOT=$B/root/usr/lib/go-1.19 GOPATH=$B/gopath GOCACHE=$B/gocache GOTMPDIR=$B/gotmp
export PATH=$B/shim:$GOROOT/bin:$PATH GOPROXY=off GOSUMDB=off CGO_ENABLED=0 GO111MODULE=off GOFLAGS=
# pkg/generated/openapi is not in the tarball.
(cd "$K" && make gen_openapi >"$B/gen_openapi.log" 2>&1)
V=k8s.io/kubernetes/vendor/k8s.io
LDF="-s -w"
for P in component-base/version client-go/pkg/version; do
  LDF+=" -X $V/$P.gitVersion=v1.20.2 -X $V/$P.gitMajor=1 -X $V/$P.gitMinor=20"
done
for cmd in kube-apiserver kube-controller-manager; do
  (cd gopath/src/k8s.io/kubernetes && go build -ldflags "$LDF" -o "$WORK/bin/$cmd" "./cmd/$cmd")
done
cp root/usr/bin/etcd "$WORK/bin/etcd"
"$WORK/bin/kube-apiserver" --version >&2
rm -rf "$B"
echo "$WORK"

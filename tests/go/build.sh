#!/usr/bin/env bash
# Builds the test control plane's binaries from upstream Go modules (through the
# Go module proxy) into a cache outside the clone, keyed by tool and version:
#
#   $KAB_CACHE_DIR/bin/<tool>-<version>/<binaries>      (default ~/.cache/kab)
#
# A warm cache is reused without touching Go at all. Concurrent runs are safe: each
# tool builds under an exclusive flock into a temporary directory that is renamed
# into place only when complete, so a killed build never leaves a half cache entry.
#
# Usage: tests/go/build.sh [kubernetes|etcd|kwok|nats|olm|olm-validate ...]
#   (default: the plane's four; olm and olm-validate are built when the install tests ask)
# Prints one line per tool: <tool> <directory holding its binaries>.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${KAB_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kab}"
min_go="1.26"

# tool -> "version binaries..." ; the version must match the wrapper's go.mod.
declare -A spec=(
  [kubernetes]="v1.37.2 kube-apiserver kube-controller-manager kube-scheduler kubectl"
  [etcd]="v3.6.13 etcd"
  [kwok]="v0.8.0 kwok"
  [nats]="v2.15.2 nats-server"
  [olm]="v0.46.0 olm"
  [olm-validate]="v0.45.0-r2 olm-validate"
)
declare -A pkgs=(
  [kubernetes]="k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl"
  [etcd]="go.etcd.io/etcd/server/v3"
  [kwok]="sigs.k8s.io/kwok/cmd/kwok"
  [nats]="github.com/nats-io/nats-server/v2"
  [olm]="github.com/operator-framework/operator-lifecycle-manager/cmd/olm"
  [olm-validate]="kab.dev/tests/go/olm-validate"
)

die() { echo "tests/go/build.sh: $*" >&2; exit 1; }

check_go() {
  command -v go >/dev/null 2>&1 || die "Go is not installed. Install Go >= $min_go (https://go.dev/dl or your package manager) and re-run."
  local v
  v="$(go env GOVERSION 2>/dev/null | sed 's/^go//')"
  [ -n "$v" ] || die "cannot read the Go version ('go env GOVERSION' failed)"
  if [ "$(printf '%s\n%s\n' "$min_go" "$v" | sort -V | head -1)" != "$min_go" ]; then
    die "Go $v is too old: the Kubernetes $(echo "${spec[kubernetes]}" | cut -d' ' -f1) wrapper needs Go >= $min_go"
  fi
}

ldflags_for() {
  local tool="$1" version="$2"
  case "$tool" in
    kubernetes)
      local minor major flags=""
      major="$(echo "$version" | sed -E 's/^v([0-9]+)\..*/\1/')"
      minor="$(echo "$version" | sed -E 's/^v[0-9]+\.([0-9]+)\..*/\1/')"
      for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        flags+=" -X $p.gitVersion=$version -X $p.gitMajor=$major -X $p.gitMinor=$minor"
        flags+=" -X $p.gitTreeState=clean -X $p.gitCommit=release-$version -X $p.buildDate=1970-01-01T00:00:00Z"
      done
      echo "-s -w$flags" ;;
    etcd) echo "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=release-$version" ;;
    kwok) echo "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${version#v}" ;;
    nats) echo "-s -w -X github.com/nats-io/nats-server/v2/server.gitCommit=release-$version" ;;
  esac
}

build_one() {
  local tool="$1"
  [ -n "${spec[$tool]:-}" ] || die "unknown tool '$tool' (known: ${!spec[*]})"
  read -r version bins <<<"${spec[$tool]}"
  local dest="$cache/bin/$tool-$version"
  local complete=1 b
  for b in $bins; do [ -x "$dest/$b" ] || complete=0; done
  if [ "$complete" = 1 ]; then echo "$tool $dest"; return; fi

  check_go
  mkdir -p "$cache/bin"
  exec {lock}>"$cache/bin/.$tool-$version.lock"
  flock "$lock"
  # Another run may have finished the build while we waited for the lock.
  complete=1
  for b in $bins; do [ -x "$dest/$b" ] || complete=0; done
  if [ "$complete" = 0 ]; then
    local tmp start
    tmp="$(mktemp -d "$cache/bin/.$tool-$version.XXXXXX")"
    start=$(date +%s)
    echo "building $tool $version (first time only; cached in $dest) ..." >&2
    (
      cd "$here/$tool"
      # shellcheck disable=SC2086
      CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "$(ldflags_for "$tool" "$version")" \
        -o "$tmp/" ${pkgs[$tool]}
    ) || { rm -rf "$tmp"; die "building $tool $version failed (see the go output above)"; }
    # `go build -o dir/` names a binary after its package path's last element.
    for n in v3 server; do if [ "$tool" = etcd ] && [ -x "$tmp/$n" ]; then mv "$tmp/$n" "$tmp/etcd"; fi; done
    if [ "$tool" = nats ] && [ -x "$tmp/v2" ]; then mv "$tmp/v2" "$tmp/nats-server"; fi
    for b in $bins; do [ -x "$tmp/$b" ] || { rm -rf "$tmp"; die "building $tool produced no $b"; }; done
    rm -rf "$dest"
    mv "$tmp" "$dest"
    echo "built $tool $version in $(( $(date +%s) - start )) s" >&2
  fi
  exec {lock}>&-
  echo "$tool $dest"
}

tools=("$@")
[ ${#tools[@]} -gt 0 ] || tools=(kubernetes etcd kwok nats)
for t in "${tools[@]}"; do build_one "$t"; done

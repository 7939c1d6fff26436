#!/usr/bin/env bash
# Builds the xds-relay container images locally, without pulling anything from a registry.
#
#   deploy/images/build.sh [options]
#
#   1. base image xds-relay-base:bookworm: `debootstrap --variant=minbase bookworm` trimmed
#      (no docs, man pages, locales or apt lists) and `docker import`ed. Skipped when the
#      image exists (--rebuild-base forces it). Not built with --base-image.
#   2. `cargo build --release --bins -p xds-relay -p xds-relay-example`, once (cargo's own
#      incremental build makes a re-run a no-op). Skipped with --skip-cargo or --bin-dir.
#   3. xds-relay:dev, xds-relay-example:dev, xds-relay-lb:dev from Dockerfile.relay,
#      Dockerfile.example and Dockerfile.lb, and xds-relay-grpc-client:dev (grpcio's xDS
#      client + a greeter backend for the chaos tests, chaos-tests/clients/) from
#      Dockerfile.grpc-client, FROM the base image. Docker's layer cache makes a re-run with
#      unchanged binaries take seconds.
#
# Options:
#   --base-image IMAGE   build FROM IMAGE instead of the debootstrap base (for example
#                        debian:bookworm-slim on a machine that can pull it)
#   --bin-dir DIR        take the binaries from DIR instead of building them
#                        (default: ${CARGO_TARGET_DIR:-target}/release after cargo build)
#   --skip-cargo         do not run cargo; use the binaries already in the release dir
#   --tag TAG            image tag (default: dev)
#   --only LIST          comma-separated subset of: relay,example,lb,grpc-client (default: all)
#   --rebuild-base       rebuild the debootstrap base even if it exists
#   --mirror URL         Debian mirror for debootstrap (default: http://deb.debian.org/debian)
#   --no-certs           do not run deploy/tls/gen-certs.sh
#   -q, --quiet          less output from docker build
#
# Environment: CARGO (default cargo), CARGO_TARGET_DIR, DOCKER (default docker), PYTHON (the
# host's python3 whose pip downloads the grpc-client image's wheels).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
docker=${DOCKER:-docker}
cargo=${CARGO:-cargo}

base_repo=xds-relay-base
base_tag=bookworm
base_image="$base_repo:$base_tag"
custom_base=""
bin_dir=""
skip_cargo=0
tag=dev
only="relay,example,lb,grpc-client"
rebuild_base=0
mirror=http://deb.debian.org/debian
quiet=()
certs=1

usage() { sed -n '2,34p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --base-image) custom_base=$2; shift 2 ;;
    --bin-dir) bin_dir=$2; skip_cargo=1; shift 2 ;;
    --skip-cargo) skip_cargo=1; shift ;;
    --tag) tag=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    --rebuild-base) rebuild_base=1; shift ;;
    --mirror) mirror=$2; shift 2 ;;
    --no-certs) certs=0; shift ;;
    -q|--quiet) quiet=(-q); shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "build.sh: unknown option $1" >&2; usage >&2; exit 64 ;;
  esac
done

cleanup=()
trap 'rm -rf "${cleanup[@]}"' EXIT

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { echo "build.sh: $*" >&2; exit 1; }
want() { [[ ",$only," == *",$1,"* ]]; }

command -v "$docker" >/dev/null || die "docker not found"
"$docker" info >/dev/null 2>&1 || die "the Docker daemon is not reachable (is it running? are you in the docker group?)"

# The docker CLI >= 23 uses BuildKit through the buildx plugin; without the plugin the
# classic builder works the same for these Dockerfiles.
if [[ -z "${DOCKER_BUILDKIT:-}" ]] && ! "$docker" buildx version >/dev/null 2>&1; then
  export DOCKER_BUILDKIT=0
fi

# --- 1. base image ----------------------------------------------------------------------------
build_base() {
  if [[ $rebuild_base -eq 0 ]] && "$docker" image inspect "$base_image" >/dev/null 2>&1; then
    log "base image $base_image exists (use --rebuild-base to rebuild)"
    return
  fi
  [[ $(id -u) -eq 0 ]] || die "debootstrap needs root: run as root, or pass --base-image debian:bookworm-slim"
  if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends debootstrap >/dev/null \
      || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends debootstrap >/dev/null; } \
      || die "cannot install debootstrap"
  fi
  local rootfs
  rootfs=$(mktemp -d /tmp/xds-relay-rootfs.XXXXXX)
  cleanup+=("$rootfs")
  log "debootstrap --variant=minbase bookworm ($mirror)"
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
    || { tail -30 "$rootfs.log" >&2; rm -f "$rootfs.log"; die "debootstrap failed"; }
  rm -f "$rootfs.log"

  # Container conventions (as in Debian's official images): no services started by package
  # scripts, no docs, man pages or translations installed later, apt caches not kept.
  cat >"$rootfs/usr/sbin/policy-rc.d" <<'EOF'
#!/bin/sh
exit 101
EOF
  chmod 755 "$rootfs/usr/sbin/policy-rc.d"
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/excludes" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
EOF
  cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  cat >"$rootfs/etc/apt/apt.conf.d/docker-no-recommends" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
EOF
  rm -f "$rootfs/etc/apt/sources.list"
  cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${mirror%/debian}/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  # Trim what a container never uses.
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/cache/debconf/*-old \
    "$rootfs"/var/log/* "$rootfs"/tmp/* "$rootfs"/var/tmp/* \
    "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/lintian/* \
    "$rootfs"/usr/share/locale/*
  find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
  find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
  # Files a container runtime provides.
  : >"$rootfs/etc/resolv.conf"
  : >"$rootfs/etc/hostname"
  rm -f "$rootfs/etc/machine-id" && : >"$rootfs/etc/machine-id"

  log "docker import -> $base_image"
  tar --numeric-owner -C "$rootfs" -c . | "$docker" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap --variant=minbase bookworm (xds-relay build.sh)" \
    - "$base_image" >/dev/null
  rm -rf "$rootfs"
}

if [[ -n "$custom_base" ]]; then
  base_image=$custom_base
  log "using base image $base_image"
else
  build_base
fi

# --- 2. binaries ------------------------------------------------------------------------------
target_dir=${CARGO_TARGET_DIR:-$root/target}
if [[ -z "$bin_dir" ]]; then
  bin_dir="$target_dir/release"
fi
if ! want relay && ! want example; then
  skip_cargo=1 # the other images need no Rust binaries
fi
if [[ $skip_cargo -eq 0 ]]; then
  log "cargo build --release --bins -p xds-relay -p xds-relay-example"
  (cd "$root" && "$cargo" build --release --bins -p xds-relay -p xds-relay-example)
fi
need=()
want relay && need+=(xds-relay)
want example && need+=(example-management-server)
for b in "${need[@]}"; do
  [[ -x "$bin_dir/$b" ]] || die "$bin_dir/$b not found (build it, or pass --bin-dir)"
done
if want relay; then
  missing=$(ldd "$bin_dir/xds-relay" 2>/dev/null | grep 'not found' || true)
  [[ -z "$missing" ]] || die "xds-relay has unresolved libraries: $missing"
fi

# --- 3. images --------------------------------------------------------------------------------
ctx=$(mktemp -d /tmp/xds-relay-image-ctx.XXXXXX)
cleanup+=("$ctx")

build_image() { # name dockerfile
  local name=$1 dockerfile=$2 dir=$ctx/$1
  cp "$here/$dockerfile" "$dir/Dockerfile"
  local old new
  old=$("$docker" image inspect -f '{{.Id}}' "$name:$tag" 2>/dev/null || true)
  log "docker build $name:$tag (FROM $base_image)"
  "$docker" build "${quiet[@]}" --build-arg "BASE_IMAGE=$base_image" -t "$name:$tag" "$dir"
  new=$("$docker" image inspect -f '{{.Id}}' "$name:$tag")
  # The image this tag replaced, if nothing else uses it (rmi refuses otherwise).
  if [[ -n "$old" && "$old" != "$new" ]]; then
    "$docker" rmi "$old" >/dev/null 2>&1 || true
  fi
}

# Hard links keep the copies cheap; cp -p keeps mtimes so the layer cache sees no change.
copy_bin() { ln -f "$1" "$2" 2>/dev/null || cp -p "$1" "$2"; }

if want relay; then
  mkdir -p "$ctx/xds-relay/bin" "$ctx/xds-relay/etc"
  copy_bin "$bin_dir/xds-relay" "$ctx/xds-relay/bin/xds-relay"
  cp -p "$here/http-check" "$ctx/xds-relay/bin/"
  cp -p "$root/deploy/config/relay-standalone.yaml" "$ctx/xds-relay/etc/bootstrap.yaml"
  cp -p "$root/deploy/config/aggregation-rules.yaml" "$ctx/xds-relay/etc/aggregation-rules.yaml"
  build_image xds-relay Dockerfile.relay
fi

if want example; then
  mkdir -p "$ctx/xds-relay-example/bin"
  copy_bin "$bin_dir/example-management-server" "$ctx/xds-relay-example/bin/example-management-server"
  if [[ -x "$bin_dir/xds-loadgen" ]]; then
    copy_bin "$bin_dir/xds-loadgen" "$ctx/xds-relay-example/bin/xds-loadgen"
  else
    log "note: $bin_dir/xds-loadgen not found; the example image will not have the load generator"
  fi
  cp -p "$here/http-check" "$ctx/xds-relay-example/bin/"
  build_image xds-relay-example Dockerfile.example
fi

if want lb; then
  mkdir -p "$ctx/xds-relay-lb/bin"
  cp -p "$here/http-check" "$here/lb-entrypoint" "$ctx/xds-relay-lb/bin/"
  build_image xds-relay-lb Dockerfile.lb
fi

if want grpc-client; then
  mkdir -p "$ctx/xds-relay-grpc-client/bin" "$ctx/xds-relay-grpc-client/wheels"
  # The wheels come from the host's pip (its index, proxy and trust store), for CPython 3.11
  # on x86-64 glibc (Debian bookworm's python3); the build installs them with --no-index.
  # Without a host pip the build fetches them from PyPI itself.
  # Keep in step with the ARGs of Dockerfile.grpc-client.
  wheels=(grpcio==1.85.1 grpcio-csds==1.85.0 xds-protos==1.85.0 "protobuf>=6")
  if "${PYTHON:-python3}" -m pip --version >/dev/null 2>&1; then
    "${PYTHON:-python3}" -m pip download -q --disable-pip-version-check --only-binary=:all: \
      --python-version 3.11 --implementation cp --abi cp311 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$ctx/xds-relay-grpc-client/wheels" "${wheels[@]}" \
      || die "pip download ${wheels[*]} failed"
    touch -d @0 "$ctx/xds-relay-grpc-client/wheels"/*.whl # the layer cache compares mtimes
  else
    log "note: no pip on the host; the grpc-client build fetches its wheels from PyPI"
  fi
  for f in grpc_xds_client.py greeter_server.py; do
    cp -p "$root/chaos-tests/clients/$f" "$ctx/xds-relay-grpc-client/bin/$f"
    chmod 755 "$ctx/xds-relay-grpc-client/bin/$f"
  done
  build_image xds-relay-grpc-client Dockerfile.grpc-client
fi

# --- 4. certificates -------------------------------------------------------------------------
if [[ $certs -eq 1 ]]; then
  log "deploy/tls/gen-certs.sh (existing files are kept)"
  if [[ $(id -u) -eq 0 ]]; then
    "$root/deploy/tls/gen-certs.sh" -q --owner 10001:10001
  else
    "$root/deploy/tls/gen-certs.sh" -q
    log "note: the containers (uid 10001) cannot read deploy/tls/out; run: sudo deploy/tls/gen-certs.sh --owner 10001:10001"
  fi
fi

log "images:"
"$docker" image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' \
  | grep -E "^((xds-relay|xds-relay-example|xds-relay-lb|xds-relay-grpc-client):$tag|${base_image//./\\.}) " | sed 's/^/  /' || true

#!/usr/bin/env bash
# Rebuilds src/admin/envoy-api-descriptors.bin: the protobuf FileDescriptorSet the admin API
# decodes cached resources with (`/cache` renders them as protobuf JSON, src/admin.rs).
#
# The set holds every .proto file the locked envoy-types crate ships (Envoy's data-plane API,
# xds, validate, googleapis, cel, OpenTelemetry, Prometheus, ratelimit) plus the well-known
# google/protobuf types they import, with source info, so that its messages match the Rust
# types the relay is built with.
#
# protoc: $PROTOC when set, otherwise the binary of the locked protoc-bin-vendored crate.
# Both crates are read from the cargo registry at their Cargo.lock versions (`cargo fetch`
# downloads them when missing); nothing is fetched here.
#
# Usage: scripts/regen-descriptors.sh [OUTPUT]   (default: src/admin/envoy-api-descriptors.bin)
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
output="$(realpath -m "${1:-$repo/src/admin/envoy-api-descriptors.bin}")"
cd "$repo"

# The sources of a package at its Cargo.lock version, in the cargo registry.
package_dir() {
    local version dir
    version="$(awk -v name="$1" '$1 == "name" && $3 == "\"" name "\"" { getline; gsub(/"/, "", $3); print $3; exit }' Cargo.lock)"
    if [[ -z "$version" ]]; then
        echo "package $1 is not in Cargo.lock" >&2
        return 1
    fi
    for dir in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"$1-$version"; do
        if [[ -d "$dir" ]]; then
            echo "$dir"
            return 0
        fi
    done
    echo "$1 $version is not in the cargo registry (run cargo fetch)" >&2
    return 1
}

envoy_types="$(package_dir envoy-types)"
protos="$envoy_types/proto"

if [[ -n "${PROTOC:-}" ]]; then
    protoc="$PROTOC"
else
    case "$(uname -sm)" in
        "Linux x86_64") platform=linux-x86_64 ;;
        "Linux aarch64") platform=linux-aarch_64 ;;
        "Darwin x86_64") platform=macos-x86_64 ;;
        "Darwin arm64") platform=macos-aarch_64 ;;
        *) echo "no vendored protoc for $(uname -sm): set PROTOC" >&2; exit 1 ;;
    esac
    vendored="$(package_dir "protoc-bin-vendored-$platform")"
    protoc="$vendored/bin/protoc"
    well_known="$vendored/include"
fi

# One include root per proto tree envoy-types ships; cel-spec keeps its files one level down.
roots=(
    "$protos/data-plane-api"
    "$protos/xds"
    "$protos/protoc-gen-validate"
    "$protos/googleapis"
    "$protos/cel-spec/proto"
    "$protos/opentelemetry-proto"
    "$protos/client_model"
    "$protos/ratelimit"
)
# Sorted, with the files of versioned packages (a `v3` directory) before the unversioned
# ones (envoy/annotations, envoy/type/http_status.proto): the order of the committed set,
# which makes the output byte for byte the same for the same envoy-types and protoc.
versioned_first() {
    local sorted
    sorted="$(LC_ALL=C sort)"
    grep -E '/v[0-9]+[^/]*/' <<<"$sorted" || true
    grep -vE '/v[0-9]+[^/]*/' <<<"$sorted" || true
}

includes=()
files=()
for root in "${roots[@]}"; do
    includes+=("-I" "$root")
    while IFS= read -r file; do
        files+=("$file")
    done < <(cd "$root" && find . -name '*.proto' | sed 's|^\./||' | versioned_first)
done
if [[ -n "${well_known:-}" ]]; then
    includes+=("-I" "$well_known")
fi

"$protoc" "${includes[@]}" --include_imports --include_source_info \
    --descriptor_set_out="$output" "${files[@]}"
echo "wrote $output: ${#files[@]} files and their imports, $(wc -c <"$output") bytes ($("$protoc" --version))"

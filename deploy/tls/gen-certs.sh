#!/usr/bin/env bash
# Generates the secrets of a secure xds-relay deployment with the openssl CLI (OpenSSL 3):
# a private CA, one certificate per relay, the origin's certificate, client certificates, the
# gossip key and the admin token.
#
#   deploy/tls/gen-certs.sh [options]
#
# Writes into the output directory (default deploy/tls/out, git-ignored):
#
#   ca.pem, ca.key               the CA (ECDSA P-256, 10 years); ca.key signs, nothing else needs it
#   <relay>.pem, <relay>.key     per relay (relay-1..relay-N): SAN URI spiffe://<cluster_id>/relay/<relay>,
#                                DNS <relay>, DNS localhost, IP 127.0.0.1, the --relay-dns names;
#                                EKU serverAuth + clientAuth (xDS server, peer protocol both ways,
#                                client of the origin)
#   origin.pem, origin.key       the origin (control plane): DNS control-plane, example-origin,
#                                example, origin, localhost, IP 127.0.0.1; serverAuth
#   client-<name>.pem/.key       per client (--clients): CN and DNS <name>, SAN URI
#                                spiffe://<cluster_id>/client/<name>; clientAuth
#   gossip.keys                  one base64 32-byte key (`openssl rand -base64 32`)
#   admin.token                  the admin API bearer token (64 hex characters, no newline)
#
# Idempotent: existing files are kept (a new CA re-issues every certificate); --force
# regenerates everything. Keys are written with mode 0600, certificates 0644.
#
# Options:
#   --out DIR            output directory (default: deploy/tls/out next to this script)
#   --cluster-id ID      cluster.cluster_id of the relays (default: xds-relay)
#   --relays N           relays relay-1..relay-N (default: 3)
#   --relay-names LIST   comma-separated relay node names instead (e.g. xds-relay-0,xds-relay-1)
#   --relay-dns LIST     extra DNS names on every relay certificate: the names clients use to
#                        reach any relay through a load balancer or Service (default: xds-relay,lb)
#   --origin-dns LIST    DNS names of the origin certificate
#                        (default: control-plane,example-origin,example,origin,localhost)
#   --clients LIST       client certificates to issue (default: loadgen,grpc-client,envoy)
#   --days N             validity of the leaf certificates in days (default: 365)
#   --owner UID[:GID]    chown the directory and files but ca.key (needs root), e.g. 10001:10001,
#                        the user of the xds-relay images, so containers can read bind-mounted keys
#   --force              regenerate every file
#   -q, --quiet          print nothing but errors
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=$here/out
cluster_id=xds-relay
relays=3
relay_names=""
relay_dns="xds-relay,lb"
origin_dns="control-plane,example-origin,example,origin,localhost"
clients="loadgen,grpc-client,envoy"
days=365
owner=""
force=0
quiet=0

usage() { sed -n '2,44p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "gen-certs.sh: $*" >&2; exit 1; }
bad_usage() { echo "gen-certs.sh: $*" >&2; usage >&2; exit 64; }
log() { [[ $quiet -eq 1 ]] || echo "$*" >&2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    --cluster-id) cluster_id=${2:?--cluster-id needs a value}; shift 2 ;;
    --relays) relays=${2:?--relays needs a number}; shift 2 ;;
    --relay-names) relay_names=${2:?--relay-names needs a list}; shift 2 ;;
    --relay-dns) relay_dns=${2-}; shift 2 ;;
    --origin-dns) origin_dns=${2:?--origin-dns needs a list}; shift 2 ;;
    --clients) clients=${2-}; shift 2 ;;
    --days) days=${2:?--days needs a number}; shift 2 ;;
    --owner) owner=${2:?--owner needs UID[:GID]}; shift 2 ;;
    --force) force=1; shift ;;
    -q|--quiet) quiet=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) bad_usage "unknown option $1" ;;
  esac
done

[[ "$relays" =~ ^[1-9][0-9]*$ ]] || bad_usage "--relays must be a positive number, got $relays"
[[ "$days" =~ ^[1-9][0-9]*$ ]] || bad_usage "--days must be a positive number, got $days"
[[ "$cluster_id" =~ ^[A-Za-z0-9._-]+$ ]] || bad_usage "--cluster-id must be letters, digits, '.', '_' or '-', got $cluster_id"
if [[ -n "$owner" ]]; then
  [[ "$owner" =~ ^[0-9]+(:[0-9]+)?$ ]] || bad_usage "--owner must be UID or UID:GID, got $owner"
  [[ $(id -u) -eq 0 ]] || die "--owner needs root (chown); run with sudo, or leave it out"
fi
command -v openssl >/dev/null || die "openssl not found (Debian: apt-get install openssl)"

if [[ -z "$relay_names" ]]; then
  relay_names=$(seq -s, -f 'relay-%g' 1 "$relays")
fi
IFS=, read -r -a relay_list <<<"$relay_names"
IFS=, read -r -a relay_dns_list <<<"$relay_dns"
IFS=, read -r -a origin_dns_list <<<"$origin_dns"
IFS=, read -r -a client_list <<<"$clients"
for name in "${relay_list[@]}" "${client_list[@]}"; do
  [[ "$name" =~ ^[A-Za-z0-9][A-Za-z0-9.-]*$ ]] || bad_usage "invalid name '$name' (letters, digits, '.', '-')"
done

umask 077
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if [[ $force -eq 1 ]]; then
  log "--force: regenerating everything in $out"
  rm -f "$out"/*.pem "$out"/*.key "$out"/gossip.keys "$out"/admin.token
fi

# A new key pair (PKCS#8 "BEGIN PRIVATE KEY", P-256) and a CSR for subject CN=$2.
new_key_and_csr() { # base cn
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$tmp/$1.key" -out "$tmp/$1.csr" -subj "/CN=$2" 2>/dev/null
}

# Signs $tmp/$1.csr with the CA using the extensions in $2, then moves key and cert into $out.
sign() { # base extensions
  printf '%s\n' "$2" >"$tmp/$1.ext"
  openssl x509 -req -in "$tmp/$1.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days "$days" -sha256 \
    -extfile "$tmp/$1.ext" -out "$tmp/$1.pem" 2>/dev/null
  openssl verify -CAfile "$out/ca.pem" "$tmp/$1.pem" >/dev/null
  install -m 0600 "$tmp/$1.key" "$out/$1.key"
  install -m 0644 "$tmp/$1.pem" "$out/$1.pem"
}

# "DNS:a,DNS:b" from a list of names.
dns_sans() { local s="" n; for n in "$@"; do [[ -n "$n" ]] && s+="${s:+,}DNS:$n"; done; printf '%s' "$s"; }

# --- CA ---------------------------------------------------------------------------------------
new_ca=0
if [[ ! -s "$out/ca.pem" || ! -s "$out/ca.key" ]]; then
  log "CA: $out/ca.pem"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 \
    -keyout "$tmp/ca.key" -out "$tmp/ca.pem" -days 3650 -subj "/CN=xds-relay $cluster_id CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" 2>/dev/null
  install -m 0600 "$tmp/ca.key" "$out/ca.key"
  install -m 0644 "$tmp/ca.pem" "$out/ca.pem"
  new_ca=1
fi

# Whether $1.pem/.key must be (re)issued: missing, or the CA is new. An existing certificate
# that does not chain to the CA is an error (mixing CAs would fail every handshake).
needs_issue() { # base
  if [[ $new_ca -eq 1 || ! -s "$out/$1.pem" || ! -s "$out/$1.key" ]]; then
    return 0
  fi
  openssl verify -CAfile "$out/ca.pem" "$out/$1.pem" >/dev/null 2>&1 \
    || die "$out/$1.pem does not chain to $out/ca.pem; pass --force to regenerate everything"
  return 1
}

leaf_ext() { # san eku
  printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=%s\nsubjectAltName=%s\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n' "$2" "$1"
}

# --- relays -----------------------------------------------------------------------------------
for relay in "${relay_list[@]}"; do
  needs_issue "$relay" || continue
  log "relay: $out/$relay.pem (spiffe://$cluster_id/relay/$relay)"
  san="URI:spiffe://$cluster_id/relay/$relay,$(dns_sans "$relay" localhost "${relay_dns_list[@]}"),IP:127.0.0.1"
  new_key_and_csr "$relay" "$relay"
  sign "$relay" "$(leaf_ext "$san" serverAuth,clientAuth)"
done

# --- origin -----------------------------------------------------------------------------------
if needs_issue origin; then
  log "origin: $out/origin.pem ($origin_dns)"
  new_key_and_csr origin "${origin_dns_list[0]}"
  sign origin "$(leaf_ext "$(dns_sans "${origin_dns_list[@]}"),IP:127.0.0.1" serverAuth)"
fi

# --- clients ----------------------------------------------------------------------------------
for client in "${client_list[@]}"; do
  [[ -n "$client" ]] || continue
  needs_issue "client-$client" || continue
  log "client: $out/client-$client.pem (spiffe://$cluster_id/client/$client)"
  new_key_and_csr "client-$client" "$client"
  sign "client-$client" "$(leaf_ext "URI:spiffe://$cluster_id/client/$client,DNS:$client" clientAuth)"
done

# --- gossip key and admin token ---------------------------------------------------------------
if [[ ! -s "$out/gossip.keys" ]]; then
  log "gossip key: $out/gossip.keys"
  openssl rand -base64 32 >"$tmp/gossip.keys"
  install -m 0600 "$tmp/gossip.keys" "$out/gossip.keys"
fi
if [[ ! -s "$out/admin.token" ]]; then
  log "admin token: $out/admin.token"
  printf '%s' "$(openssl rand -hex 32)" >"$tmp/admin.token"
  install -m 0600 "$tmp/admin.token" "$out/admin.token"
fi

if [[ -n "$owner" ]]; then
  # Everything but the CA key, which only this script needs.
  chown "$owner" "$out"
  find "$out" -maxdepth 1 -type f ! -name ca.key -exec chown "$owner" {} +
fi
log "done: $out"

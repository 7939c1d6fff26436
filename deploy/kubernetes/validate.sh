#!/usr/bin/env bash
# Validates the manifests offline: installs kubernetes-validate (it ships the Kubernetes JSON
# schemas) into a cache venv once, then runs validate.py with it. Extra arguments go to
# validate.py (e.g. --relay-bin target/release/xds-relay, --k8s-version 1.30.0).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
venv=${XDS_RELAY_KUBEVAL_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/xds-relay/kubeval-venv}
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c 'import kubernetes_validate, yaml' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'kubernetes-validate>=1.30' pyyaml
fi
exec "$venv/bin/python" "$here/validate.py" "$@"

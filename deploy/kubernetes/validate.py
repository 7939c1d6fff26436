#!/usr/bin/env python3
"""Offline checks of the Kubernetes manifests in this directory.

    python3 deploy/kubernetes/validate.py [--relay-bin target/release/xds-relay] [--k8s-version 1.30.0]

1. Every YAML document parses and has apiVersion, kind and metadata.name.
2. Schema validation against the Kubernetes OpenAPI schemas, when the PyPI package
   `kubernetes-validate` is importable (it ships the schemas, so no network is needed). Without
   it this step is skipped with a note; `validate.sh` installs it in a cache venv first.
3. Cross-references the schemas cannot see: Service selectors match a pod template, named
   target ports and probe ports exist, the StatefulSet's serviceName is a headless Service that
   publishes not-ready addresses, ConfigMap volumes and keys exist, the PDB selects the relays,
   every container has resource requests/limits and runs as non-root, kustomization resources
   exist.
4. The bootstrap template renders for every replica (placeholders replaced), parses, has the
   cluster section with one seed per replica under the headless service; the rules equal
   example/config/aggregation-rules.yaml. With --relay-bin, every rendered bootstrap is checked
   by `xds-relay -m validate` (its TLS, gossip key and token paths pointed at test files made
   by deploy/tls/gen-certs.sh, when openssl is available).
5. Secure by default: the bootstrap has mTLS on the xDS server (client_ca_file), TLS to the
   origin, mTLS between peers, a gossip key file and an admin token file, and is not
   `cluster.insecure`; every file it names is under a volume the relay container (and the init
   container that validates it) mounts; no Service exposes the admin port; the Secret with
   every relay's key (xds-relay-certs) is mounted only by init containers.

Exit status 0 when everything passes, 1 otherwise. Needs PyYAML.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import yaml
except ImportError:  # pragma: no cover - depends on the machine
    sys.exit("validate.py needs PyYAML (pip install pyyaml), or run validate.sh")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
# The Secret holding every relay's certificate and key; the init container copies the pod's own.
ALL_RELAY_KEYS_SECRET = "xds-relay-certs"
# Bootstrap fields that name files, and which file of deploy/tls/gen-certs.sh's output stands in
# for each when the rendered bootstrap is checked with --relay-bin.
SECURE_FIELDS = {
    ("server", "tls", "cert_file"): "{pod}.pem",
    ("server", "tls", "key_file"): "{pod}.key",
    ("server", "tls", "client_ca_file"): "ca.pem",
    ("origin_server", "tls", "ca_file"): "ca.pem",
    ("origin_server", "tls", "cert_file"): "{pod}.pem",
    ("origin_server", "tls", "key_file"): "{pod}.key",
    ("cluster", "tls", "ca_file"): "ca.pem",
    ("cluster", "tls", "cert_file"): "{pod}.pem",
    ("cluster", "tls", "key_file"): "{pod}.key",
    ("cluster", "gossip_keys_file"): "gossip.keys",
    ("admin", "auth_token_file"): "admin.token",
}


def field(b: dict, path: tuple[str, ...]):
    for k in path:
        b = b.get(k) if isinstance(b, dict) else None
    return b


def mount_paths(c: dict) -> list[str]:
    return [m["mountPath"].rstrip("/") + "/" for m in c.get("volumeMounts") or [] if m.get("mountPath")]


def test_secrets(pods: list[str]) -> Path | None:
    """deploy/tls/gen-certs.sh output for `pods` in a temporary directory, or None without openssl."""
    gen = ROOT / "deploy/tls/gen-certs.sh"
    out = Path(tempfile.mkdtemp(prefix="xds-relay-k8s-tls-"))
    r = subprocess.run(
        [str(gen), "-q", "--out", str(out), "--relay-names", ",".join(pods), "--clients", ""],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        if shutil.which("openssl") is None:
            return None
        raise RuntimeError(f"{gen} failed: {r.stderr.strip()[-500:]}")
    return out


class Checker:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.notes: list[str] = []

    def error(self, where: str, msg: str) -> None:
        self.errors.append(f"{where}: {msg}")

    def check(self, cond: bool, where: str, msg: str) -> bool:
        if not cond:
            self.error(where, msg)
        return cond


def load_docs(ck: Checker, files: list[Path]) -> list[tuple[Path, dict]]:
    docs = []
    for f in files:
        try:
            loaded = list(yaml.safe_load_all(f.read_text()))
        except yaml.YAMLError as e:
            ck.error(f.name, f"YAML does not parse: {e}")
            continue
        for i, d in enumerate(loaded):
            if d is None:
                continue
            where = f"{f.name}#{i}"
            if not ck.check(isinstance(d, dict), where, "document is not a mapping"):
                continue
            for field in ("apiVersion", "kind"):
                ck.check(bool(d.get(field)), where, f"missing {field}")
            if d.get("kind") != "Kustomization":
                ck.check(bool((d.get("metadata") or {}).get("name")), where, "missing metadata.name")
            docs.append((f, d))
    return docs


def schema_validate(ck: Checker, docs: list[tuple[Path, dict]], k8s_version: str) -> None:
    try:
        import kubernetes_validate  # type: ignore
    except ImportError:
        ck.notes.append(
            "schema validation skipped: kubernetes-validate is not installed "
            "(run deploy/kubernetes/validate.sh, which installs it in a cache venv)"
        )
        return
    n = 0
    for f, d in docs:
        if d.get("kind") == "Kustomization":
            continue
        where = f"{f.name}:{d.get('kind')}/{(d.get('metadata') or {}).get('name')}"
        try:
            kubernetes_validate.validate(d, k8s_version, strict=True)
            n += 1
        except kubernetes_validate.ValidationError as e:
            ck.error(where, f"schema: {e.message} at {'.'.join(str(p) for p in e.path)}")
        except Exception as e:  # unknown kind/version and the like
            ck.error(where, f"schema: {e}")
    ck.notes.append(f"schema validation: {n} documents valid against Kubernetes {k8s_version} (strict)")


def labels_match(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pod_spec(d: dict) -> dict:
    return ((d.get("spec") or {}).get("template") or {}).get("spec") or {}


def pod_labels(d: dict) -> dict:
    return (((d.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("labels") or {}


def cross_check(ck: Checker, docs: list[tuple[Path, dict]]) -> None:
    by_kind: dict[str, dict[str, dict]] = {}
    for _, d in docs:
        by_kind.setdefault(d.get("kind", ""), {})[(d.get("metadata") or {}).get("name", "")] = d
    workloads = [d for k, ds in by_kind.items() if k in WORKLOAD_KINDS for d in ds.values()]
    configmaps = by_kind.get("ConfigMap", {})
    services = by_kind.get("Service", {})

    for w in workloads:
        wname = f"{w['kind']}/{w['metadata']['name']}"
        spec = w.get("spec") or {}
        sel = (spec.get("selector") or {}).get("matchLabels") or {}
        ck.check(labels_match(sel, pod_labels(w)), wname, "selector.matchLabels does not match the pod template labels")
        ps = pod_spec(w)
        psc = ps.get("securityContext") or {}
        volumes = {v["name"]: v for v in ps.get("volumes") or []}
        # A StatefulSet's volume claim templates are volumes of each of its pods.
        volumes.update({(v.get("metadata") or {}).get("name"): v for v in spec.get("volumeClaimTemplates") or []})
        for c in (ps.get("initContainers") or []) + (ps.get("containers") or []):
            cname = f"{wname} container {c.get('name')}"
            res = c.get("resources") or {}
            ck.check(bool(res.get("requests")) and bool(res.get("limits")), cname, "needs resources.requests and .limits")
            csc = c.get("securityContext") or {}
            ck.check(
                psc.get("runAsNonRoot") is True or csc.get("runAsNonRoot") is True,
                cname,
                "must run as non-root (securityContext.runAsNonRoot)",
            )
            ck.check(csc.get("allowPrivilegeEscalation") is False, cname, "allowPrivilegeEscalation must be false")
            ports = {p.get("name") for p in c.get("ports") or [] if p.get("name")}
            numbers = {p.get("containerPort") for p in c.get("ports") or []}
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                pr = c.get(probe)
                if not pr:
                    continue
                port = (pr.get("httpGet") or pr.get("tcpSocket") or {}).get("port")
                if isinstance(port, str):
                    ck.check(port in ports, cname, f"{probe} port {port!r} is not a named container port")
            for m in c.get("volumeMounts") or []:
                ck.check(m.get("name") in volumes, cname, f"volumeMount {m.get('name')!r} has no volume")
            if c in (ps.get("containers") or []) and w["kind"] in ("StatefulSet", "Deployment"):
                ck.check(bool(c.get("readinessProbe")), cname, "needs a readinessProbe")
                ck.check(bool(c.get("livenessProbe")), cname, "needs a livenessProbe")
                ck.check(bool(ports) or bool(numbers), cname, "declares no ports")
        for v in volumes.values():
            cm = (v.get("configMap") or {}).get("name")
            if cm:
                ck.check(cm in configmaps, wname, f"volume {v['name']!r} refers to missing ConfigMap {cm!r}")
                for item in (v.get("configMap") or {}).get("items") or []:
                    ck.check(item.get("key") in (configmaps.get(cm, {}).get("data") or {}), wname, f"ConfigMap {cm} has no key {item.get('key')!r}")

    for w in workloads:
        ps = pod_spec(w)
        secret_volumes = {v["name"] for v in ps.get("volumes") or [] if (v.get("secret") or {}).get("secretName") == ALL_RELAY_KEYS_SECRET}
        for c in ps.get("containers") or []:
            for m in c.get("volumeMounts") or []:
                ck.check(
                    m.get("name") not in secret_volumes,
                    f"{w['kind']}/{w['metadata']['name']} container {c.get('name')}",
                    f"mounts Secret {ALL_RELAY_KEYS_SECRET} (every relay's key): only the init container may",
                )

    for sname, s in services.items():
        spec = s.get("spec") or {}
        for p in spec.get("ports") or []:
            ck.check(
                p.get("targetPort") not in ("admin", 6070) and p.get("port") != 6070,
                f"Service/{sname}",
                f"port {p.get('name')}: the admin port must not be exposed by a Service",
            )
        sel = spec.get("selector") or {}
        targets = [w for w in workloads if labels_match(sel, pod_labels(w))]
        if not ck.check(bool(targets), f"Service/{sname}", f"selector {sel} matches no pod template"):
            continue
        for p in spec.get("ports") or []:
            tp = p.get("targetPort", p.get("port"))
            proto = p.get("protocol", "TCP")
            found = False
            for w in targets:
                for c in pod_spec(w).get("containers") or []:
                    for cp in c.get("ports") or []:
                        if (cp.get("name") == tp or cp.get("containerPort") == tp) and cp.get("protocol", "TCP") == proto:
                            found = True
            ck.check(found, f"Service/{sname}", f"port {p.get('name')}: targetPort {tp!r}/{proto} is not a container port")

    for ssname, ss in by_kind.get("StatefulSet", {}).items():
        svc = services.get((ss.get("spec") or {}).get("serviceName"))
        where = f"StatefulSet/{ssname}"
        if ck.check(svc is not None, where, "serviceName is not a Service in these manifests"):
            ck.check(svc["spec"].get("clusterIP") == "None", where, "serviceName must be a headless Service (clusterIP: None)")
            ck.check(svc["spec"].get("publishNotReadyAddresses") is True, where, "headless Service should publish not-ready addresses (gossip before ready)")
        ck.check(isinstance(pod_spec(ss).get("terminationGracePeriodSeconds"), int), where, "set terminationGracePeriodSeconds for the SIGTERM drain")
        pdbs = [p for p in by_kind.get("PodDisruptionBudget", {}).values() if labels_match(((p.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}, pod_labels(ss))]
        ck.check(len(pdbs) == 1, where, "needs exactly one PodDisruptionBudget selecting its pods")


def check_relay_config(ck: Checker, docs: list[tuple[Path, dict]], relay_bin: str | None) -> None:
    cms = {d["metadata"]["name"]: d for _, d in docs if d.get("kind") == "ConfigMap"}
    sss = {d["metadata"]["name"]: d for _, d in docs if d.get("kind") == "StatefulSet"}
    cm = cms.get("xds-relay-config")
    ss = sss.get("xds-relay")
    if not ck.check(cm is not None and ss is not None, "relay", "ConfigMap xds-relay-config and StatefulSet xds-relay are required"):
        return
    data = cm.get("data") or {}
    tmpl = data.get("bootstrap.yaml.tmpl")
    rules = data.get("aggregation-rules.yaml")
    if not ck.check(bool(tmpl) and bool(rules), "ConfigMap/xds-relay-config", "needs bootstrap.yaml.tmpl and aggregation-rules.yaml"):
        return
    try:
        example_rules = yaml.safe_load((ROOT / "example/config/aggregation-rules.yaml").read_text())
        ck.check(yaml.safe_load(rules) == example_rules, "ConfigMap/xds-relay-config", "aggregation-rules.yaml differs from example/config/aggregation-rules.yaml")
    except FileNotFoundError:
        ck.notes.append("example/config/aggregation-rules.yaml not found; rules not compared")
    replicas = (ss.get("spec") or {}).get("replicas", 1)
    headless = (ss.get("spec") or {}).get("serviceName")
    accepted = 0
    pods = [f"{ss['metadata']['name']}-{i}" for i in range(replicas)]
    secrets_dir = test_secrets(pods) if relay_bin else None
    if relay_bin and secrets_dir is None:
        ck.notes.append("deploy/tls/gen-certs.sh failed (openssl?): bootstraps validated with their in-pod paths")
    rendered_dir = Path(tempfile.mkdtemp(prefix="xds-relay-k8s-"))
    (rendered_dir / "aggregation-rules.yaml").write_text(rules)
    try:
        for i in range(replicas):
            pod = f"{ss['metadata']['name']}-{i}"
            text = tmpl.replace("__POD_NAME__", pod).replace("__POD_IP__", f"10.0.0.{i + 10}")
            where = f"bootstrap of {pod}"
            ck.check("__" not in text, where, "placeholders left after rendering")
            try:
                b = yaml.safe_load(text)
            except yaml.YAMLError as e:
                ck.error(where, f"does not parse: {e}")
                continue
            for section in ("server", "origin_server", "admin", "cluster"):
                ck.check(section in b, where, f"missing section {section}")
            c = b.get("cluster") or {}
            ck.check(c.get("node_name") == pod, where, "cluster.node_name must be the pod name")
            seeds = c.get("seeds") or []
            ck.check(len(seeds) == replicas, where, f"{len(seeds)} seeds for {replicas} replicas")
            for s in seeds:
                ck.check(f".{headless}" in s and s.endswith(":7946"), where, f"seed {s!r} is not <pod>.{headless}:7946")
            ck.check(((b.get("admin") or {}).get("address") or {}).get("address") == "0.0.0.0", where, "admin must listen on 0.0.0.0 for the probes")
            ck.check(((b.get("admin") or {}).get("address") or {}).get("port_value") == 6070, where, "admin port must be 6070 (probes)")
            ck.check(c.get("insecure") is not True, where, "cluster.insecure must not be set in what ships")
            containers = pod_spec(ss).get("containers") or []
            relay = next((x for x in containers if x.get("name") == "relay"), containers[0] if containers else {})
            init = next((x for x in pod_spec(ss).get("initContainers") or [] if x.get("name") == "render-bootstrap"), None)
            for fpath, stand_in in SECURE_FIELDS.items():
                value = field(b, fpath)
                name = ".".join(fpath)
                if not ck.check(isinstance(value, str) and value.startswith("/"), where, f"{name} must be set (secure by default)"):
                    continue
                for who, cont in (("relay", relay), ("init container render-bootstrap", init)):
                    if cont is not None:
                        ck.check(
                            any(value.startswith(m) for m in mount_paths(cont)),
                            where,
                            f"{name} {value} is not under a volume the {who} mounts",
                        )
                if secrets_dir is not None:
                    text = text.replace(value, str(secrets_dir / stand_in.format(pod=pod)))
            path = rendered_dir / f"{pod}.yaml"
            path.write_text(text)
            if relay_bin:
                r = subprocess.run(
                    [relay_bin, "-m", "validate", "-c", str(path), "-a", str(rendered_dir / "aggregation-rules.yaml")],
                    capture_output=True,
                    text=True,
                )
                if ck.check(r.returncode == 0, where, f"xds-relay -m validate failed: {(r.stderr or r.stdout).strip()}"):
                    accepted += 1
        if relay_bin:
            ck.notes.append(f"xds-relay -m validate accepted {accepted} of {replicas} rendered bootstraps")
    finally:
        shutil.rmtree(rendered_dir, ignore_errors=True)
        if secrets_dir is not None:
            shutil.rmtree(secrets_dir, ignore_errors=True)


def check_kustomization(ck: Checker, docs: list[tuple[Path, dict]]) -> None:
    for f, d in docs:
        if d.get("kind") == "Kustomization":
            for r in d.get("resources") or []:
                ck.check((f.parent / r).exists(), f.name, f"resource {r} does not exist")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=str(HERE), help="manifest directory (default: this one)")
    ap.add_argument("--k8s-version", default="1.30.0", help="Kubernetes version for schema validation")
    ap.add_argument("--relay-bin", default=os.environ.get("XDS_RELAY_BIN"), help="xds-relay binary: validate the rendered bootstraps with it")
    args = ap.parse_args(argv)

    ck = Checker()
    files = sorted(p for p in Path(args.dir).iterdir() if p.suffix in (".yaml", ".yml"))
    docs = load_docs(ck, files)
    schema_validate(ck, docs, args.k8s_version)
    cross_check(ck, docs)
    check_kustomization(ck, docs)
    check_relay_config(ck, docs, args.relay_bin)

    kinds = sorted(f"{d.get('kind')}/{(d.get('metadata') or {}).get('name', '-')}" for _, d in docs)
    print(f"{len(docs)} documents in {len(files)} files: {', '.join(kinds)}")
    for n in ck.notes:
        print(f"note: {n}")
    for e in ck.errors:
        print(f"ERROR: {e}")
    print("manifests OK" if not ck.errors else f"{len(ck.errors)} problem(s)")
    return 0 if not ck.errors else 1


if __name__ == "__main__":
    sys.exit(main())

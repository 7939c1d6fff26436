"""Interop: grpcio's own xDS client (a real, independent implementation) through the relay.

Real processes on loopback: two gRPC backends (in this process), the example management
server (publishing one cluster whose endpoint rotates between the backends), the relay, and
a gRPC client process resolving `xds:///example-service` through the relay over ADS.
"""

import concurrent.futures
import datetime
import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("XDS_RELAY_BIN_DIR", ROOT / "target" / "debug"))
TIMEOUT = 30.0
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Process:
    """A child process whose output is echoed and scanned for `address=` log fields."""

    def __init__(self, name, args, env=None):
        self.name = name
        self.lines = []
        self.cond = threading.Condition()
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            line = ANSI.sub("", line.rstrip("\n"))
            print(f"[{self.name}] {line}", file=sys.stderr)
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()

    def wait_line(self, predicate, start=0, timeout=TIMEOUT):
        """Returns (index, line) of the first line from `start` matching `predicate`."""
        deadline = time.time() + timeout
        with self.cond:
            while True:
                for i in range(start, len(self.lines)):
                    if predicate(self.lines[i]):
                        return i, self.lines[i]
                left = deadline - time.time()
                if left <= 0 or self.proc.poll() is not None and start >= len(self.lines):
                    raise TimeoutError(f"{self.name}: no matching line; last: {self.lines[-5:]}")
                self.cond.wait(min(left, 0.5))

    def addresses(self, marker, count):
        found, start = [], 0
        while len(found) < count:
            start, line = self.wait_line(lambda l: marker in l and "address=" in l, start)
            found.append(re.search(r"address=(\S+)", line).group(1).strip('"'))
            start += 1
        return found

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def http(method, address, path):
    request = urllib.request.Request(f"http://{address}{path}", method=method)
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.read().decode()


def http_json(method, address, path, body):
    request = urllib.request.Request(
        f"http://{address}{path}", data=body.encode(), method=method, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.read().decode()


def backend(name):
    def say_hello(request, context):
        return name.encode()

    handler = grpc.method_handlers_generic_handler(
        "hello.Greeter", {"SayHello": grpc.unary_unary_rpc_method_handler(say_hello)}
    )
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def start_stack(tmp_path, started, pki=None, origin_extra=(), relay_extra=""):
    """Starts the backends, the origin and the relay; with `pki`, the origin requires mTLS
    and the relay serves xDS with mTLS and dials the origin with its certificate.
    `origin_extra` are more flags for the example management server, `relay_extra` more
    bootstrap sections for the relay."""
    server_a, address_a = backend("backend-a")
    server_b, address_b = backend("backend-b")
    started.extend([server_a, server_b])
    origin_args = [
        str(BIN / "example-management-server"),
        "--address", "127.0.0.1:0",
        "--stats-address", "127.0.0.1:0",
        "--interval", "600m",
        "--clusters", "1",
        "--listeners", "1",
        "--endpoints", f"{address_a},{address_b}",
        *origin_extra,
    ]
    server_tls, origin_tls = "", ""
    if pki is not None:
        origin_cert, origin_key = pki.leaf("origin")
        relay_cert, relay_key = pki.leaf("relay")
        origin_args += ["--tls-cert", origin_cert, "--tls-key", origin_key, "--tls-client-ca", pki.ca_file]
        server_tls = (
            f'  tls: {{ cert_file: "{relay_cert}", key_file: "{relay_key}", client_ca_file: "{pki.ca_file}" }}\n'
        )
        origin_tls = (
            f'  tls: {{ ca_file: "{pki.ca_file}", cert_file: "{relay_cert}", key_file: "{relay_key}", '
            "server_name: localhost }\n"
        )
    origin = Process("origin", origin_args)
    started.append(origin)
    addresses = origin.addresses("listening", 2)
    stats = next(a for a in addresses if _healthy(a))
    origin_xds = next(a for a in addresses if a != stats)
    host, port = origin_xds.rsplit(":", 1)
    bootstrap = tmp_path / "bootstrap.yaml"
    bootstrap.write_text(
        "server:\n  address: { address: \"127.0.0.1\", port_value: 0 }\n"
        f"{server_tls}"
        f"origin_server:\n  address: {{ address: \"{host}\", port_value: {port} }}\n"
        "  api_type: AGGREGATED_GRPC\n"
        f"{origin_tls}"
        "cache:\n  ttl: 60s\n"
        "admin:\n  address: { address: \"127.0.0.1\", port_value: 0 }\n"
        f"{relay_extra}"
    )
    relay = Process(
        "relay",
        [
            str(BIN / "xds-relay"),
            "-c", str(bootstrap),
            "-a", str(ROOT / "example" / "config" / "aggregation-rules.yaml"),
        ],
    )
    started.append(relay)
    relay_xds = relay.addresses("xDS server listening", 1)[0]
    relay_admin = relay.addresses("admin server listening", 1)[0]
    return {"origin_stats": stats, "relay_xds": relay_xds, "relay_admin": relay_admin, "relay": relay, "started": started}


def stop_all(started):
    for item in started:
        if isinstance(item, Process):
            item.stop()
        else:
            item.stop(None)


@pytest.fixture
def setup(tmp_path):
    started = []
    try:
        yield start_stack(tmp_path, started)
    finally:
        stop_all(started)


class Pki:
    """A test CA writing PEM files (ECDSA P-256 keys in PKCS#8) into a directory."""

    def __init__(self, directory):
        from cryptography.hazmat.primitives.asymmetric import ec

        self.dir = directory
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca_name = self._name("interop test CA")
        self.ca = self._builder(self.ca_name, self.ca_key.public_key(), days=1).add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        ).add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        ).add_extension(
            x509.SubjectKeyIdentifier.from_public_key(self.ca_key.public_key()), critical=False
        ).sign(self.ca_key, hashes.SHA256())
        self.ca_file = str(directory / "ca.pem")
        Path(self.ca_file).write_bytes(self.ca.public_bytes(serialization.Encoding.PEM))

    @staticmethod
    def _name(common_name):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def _builder(self, subject, public_key, days):
        now = datetime.datetime.now(datetime.timezone.utc)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.ca_name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
        )

    def leaf(self, name, uris=()):
        """Writes `name.pem` and `name.key` (valid for localhost and 127.0.0.1, server and
        client use); returns their paths."""
        from cryptography.hazmat.primitives.asymmetric import ec

        key = ec.generate_private_key(ec.SECP256R1())
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        names += [x509.UniformResourceIdentifier(uri) for uri in uris]
        cert = (
            self._builder(self._name(name), key.public_key(), days=1)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()), critical=False)
            .sign(self.ca_key, hashes.SHA256())
        )
        cert_file, key_file = self.dir / f"{name}.pem", self.dir / f"{name}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return str(cert_file), str(key_file)


@pytest.fixture
def tls_setup(tmp_path):
    started = []
    try:
        pki = Pki(tmp_path)
        stack = start_stack(tmp_path, started, pki)
        stack["pki"] = pki
        yield stack
    finally:
        stop_all(started)


def _healthy(address):
    try:
        http("GET", address, "/healthz")
        return True
    except Exception:
        return False


def grpc_bootstrap(relay_xds, creds=None, authority=None, default_server=None):
    """grpcio's xDS bootstrap with the relay as its server; with `authority` (gRFC A47
    federation), the relay is that authority's server, `default_server` (if given) the
    top-level one, and listener names are
    `xdstp://<authority>/envoy.config.listener.v3.Listener/<target>`."""
    creds = creds or {"type": "insecure"}

    def servers(uri):
        return [{"server_uri": uri, "channel_creds": [creds], "server_features": ["xds_v3"]}]

    bootstrap = {
        "xds_servers": servers(default_server or relay_xds),
        "node": {"id": "grpc-client-1", "cluster": "staging", "locality": {"zone": "zone-a"}},
    }
    if authority is not None:
        bootstrap["authorities"] = {authority: {"xds_servers": servers(relay_xds)}}
        bootstrap["client_default_listener_resource_name_template"] = (
            f"xdstp://{authority}/envoy.config.listener.v3.Listener/%s"
        )
    return json.dumps(bootstrap)


def start_client(
    setup,
    creds=None,
    timeout=TIMEOUT,
    name="grpc-client",
    mode="endpoints",
    env=None,
    authority=None,
    default_server=None,
):
    bootstrap = grpc_bootstrap(setup["relay_xds"], creds, authority, default_server)
    env = dict(os.environ, GRPC_XDS_BOOTSTRAP_CONFIG=bootstrap, **(env or {}))
    env.pop("GRPC_XDS_BOOTSTRAP", None)
    client = Process(
        name,
        [sys.executable, str(Path(__file__).with_name("grpc_client.py")), "example-service", str(timeout), mode],
        env,
    )
    setup["started"].append(client)
    return client


def all_acked(csds):
    types = {entry["type_url"].rsplit(".", 1)[-1] for entry in csds}
    return (
        types >= {"Listener", "RouteConfiguration", "Cluster", "ClusterLoadAssignment"}
        and all(entry["status"] == "ACKED" for entry in csds)
    ), csds


def publish_and_expect_another_backend(setup, client, phase1):
    """Publishes a new version at the origin: the client's next report comes from another
    backend, with every resource ACKed and the endpoints at the new version."""
    version = json.loads(http("POST", setup["origin_stats"], "/publish"))["version"]
    _, line = client.wait_line(lambda l: l.startswith('{"phase": 2') or l.startswith('{"error"'))
    phase2 = json.loads(line)
    assert "error" not in phase2, phase2
    assert phase2["backend"] != phase1["backend"], "the endpoint change reached the client"
    ok, csds = all_acked(phase2["csds"])
    assert ok, csds
    eds = [entry for entry in phase2["csds"] if entry["type_url"].endswith("ClusterLoadAssignment")]
    assert eds and all(entry["version"] == version for entry in eds), eds
    return phase2


def test_grpc_xds_client_through_the_relay(setup):
    client = start_client(setup)

    _, line = client.wait_line(lambda l: l.startswith("{"))
    phase1 = json.loads(line)
    assert "error" not in phase1, phase1
    assert phase1["backend"] in ("backend-a", "backend-b")
    ok, csds = all_acked(phase1["csds"])
    assert ok, csds

    publish_and_expect_another_backend(setup, client, phase1)

    keys = json.loads(http("GET", setup["relay_admin"], "/cache/keys"))["Names"]
    assert set(keys) >= {"staging_lds", "staging_rds_route_0", "staging_cds", "staging_eds"}, keys
    stats = json.loads(http("GET", setup["origin_stats"], "/stats"))
    assert stats["open_by_method"].get("StreamAggregatedResources") == 4, stats


def test_grpc_xds_client_receives_resource_errors_through_the_relay(setup):
    """gRFC A88: an origin's per-resource error reaches grpcio's xDS client through the relay
    as a data error on that resource (its CSDS view shows it), and RPCs keep working on the
    cached endpoints (the error is transient)."""
    client = start_client(setup, mode="errors", env={"GRPC_EXPERIMENTAL_XDS_DATA_ERROR_HANDLING": "true"})
    _, line = client.wait_line(lambda l: l.startswith("{"))
    phase1 = json.loads(line)
    assert "error" not in phase1, phase1
    ok, csds = all_acked(phase1["csds"])
    assert ok, csds

    body = json.dumps({"resource_errors": ["eds/cluster_0=14:origin database unavailable"]})
    http_json("POST", setup["origin_stats"], "/extras", body)
    _, line = client.wait_line(lambda l: l.startswith('{"phase": 2') or l.startswith('{"error"'))
    phase2 = json.loads(line)
    assert "error" not in phase2, phase2
    failed = [e for e in phase2["csds"] if e["error"]]
    assert [(e["name"], e["type_url"].rsplit(".", 1)[-1]) for e in failed] == [("cluster_0", "ClusterLoadAssignment")], failed
    assert "origin database unavailable" in failed[0]["error"], failed
    assert phase2["rpc_failures"] == 0 and len(phase2["after"]) == 5, phase2

    dump = json.loads(http("GET", setup["relay_admin"], "/cache/staging_eds"))
    assert dump["Cache"][0]["Resp"]["ResourceErrors"][0]["Name"] == "cluster_0", dump


def test_grpc_xds_client_over_mtls_through_the_relay(tls_setup):
    """grpcio's xDS client with `channel_creds` type `tls` and a client certificate, through a
    relay with server mTLS to an origin with mTLS: RPCs work, config updates arrive; a client
    without a certificate is refused by the relay."""
    pki = tls_setup["pki"]
    cert, key = pki.leaf("grpc-client-1", uris=["spiffe://interop/grpc-client-1"])
    creds = {
        "type": "tls",
        "config": {"ca_certificate_file": pki.ca_file, "certificate_file": cert, "private_key_file": key},
    }
    client = start_client(tls_setup, creds)
    _, line = client.wait_line(lambda l: l.startswith("{"))
    phase1 = json.loads(line)
    assert "error" not in phase1, phase1
    ok, csds = all_acked(phase1["csds"])
    assert ok, csds

    http("POST", tls_setup["origin_stats"], "/publish")
    _, line = client.wait_line(lambda l: l.startswith('{"phase": 2') or l.startswith('{"error"'))
    phase2 = json.loads(line)
    assert "error" not in phase2, phase2
    assert phase2["backend"] != phase1["backend"], "the endpoint change reached the client"

    # The relay reached the origin over mTLS (its streams are open there).
    stats = json.loads(http("GET", tls_setup["origin_stats"], "/stats"))
    assert stats["open_by_method"].get("StreamAggregatedResources") == 4, stats

    # Without a client certificate the relay refuses the handshake: no config, no RPC.
    anonymous = {"type": "tls", "config": {"ca_certificate_file": pki.ca_file}}
    refused = start_client(tls_setup, anonymous, timeout=5, name="grpc-client-without-cert")
    _, line = refused.wait_line(lambda l: l.startswith("{"))
    assert "error" in json.loads(line), line
    tls_setup["relay"].wait_line(lambda l: "TLS handshake failed" in l and 'listener="xds"' in l)


AUTHORITY = "relay.test"


@pytest.fixture
def federation_setup(tmp_path):
    started = []
    try:
        yield start_stack(tmp_path, started, origin_extra=["--xdstp-authority", AUTHORITY])
    finally:
        stop_all(started)


def xdstp(type_name, path):
    return f"xdstp://{AUTHORITY}/envoy.config.{type_name}/{path}"


def test_grpc_xds_federation_through_the_relay(federation_setup):
    """gRFC A47: grpcio's bootstrap names the relay as the server of authority `relay.test`
    and makes listener names from `client_default_listener_resource_name_template`; the
    client walks the whole chain under `xdstp://` names (API listener, route, cluster, CLA)
    through the relay, RPCs work, its CSDS view lists every xdstp name ACKED, an endpoint
    change reaches it, and the relay caches the xdstp names under the example rules' keys."""
    setup = federation_setup
    # The top-level server is a port nothing listens on: every resource must come from the
    # authority's server, the relay.
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        nowhere = "127.0.0.1:%d" % unused.getsockname()[1]
    client = start_client(setup, authority=AUTHORITY, default_server=nowhere)
    _, line = client.wait_line(lambda l: l.startswith("{"))
    phase1 = json.loads(line)
    assert "error" not in phase1, phase1
    assert phase1["backend"] in ("backend-a", "backend-b")
    ok, csds = all_acked(phase1["csds"])
    assert ok, csds
    expected = {
        ("Listener", xdstp("listener.v3.Listener", "example-service")),
        ("RouteConfiguration", xdstp("route.v3.RouteConfiguration", "fleet/route_0")),
        ("Cluster", xdstp("cluster.v3.Cluster", "fleet/cluster_0")),
        ("ClusterLoadAssignment", xdstp("endpoint.v3.ClusterLoadAssignment", "fleet/cluster_0")),
    }
    assert {(e["type_url"].rsplit(".", 1)[-1], e["name"]) for e in csds} == expected, csds

    publish_and_expect_another_backend(setup, client, phase1)

    keys = json.loads(http("GET", setup["relay_admin"], "/cache/keys"))["Names"]
    route_key = "staging_rds_" + xdstp("route.v3.RouteConfiguration", "fleet/route_0")
    assert set(keys) >= {"staging_lds", route_key, "staging_cds", "staging_eds"}, keys
    lds = http("GET", setup["relay_admin"], "/cache/staging_lds")
    assert xdstp("listener.v3.Listener", "example-service") in lds, lds
    rds = http("GET", setup["relay_admin"], "/cache/" + urllib.parse.quote(route_key, safe=""))
    assert xdstp("route.v3.RouteConfiguration", "fleet/route_0") in rds, rds
    stats = json.loads(http("GET", setup["origin_stats"], "/stats"))
    assert stats["open_by_method"].get("StreamAggregatedResources") == 4, stats


@pytest.fixture
def rollout_setup(tmp_path):
    """The stack with CDS keys in staged rollout: every client is a canary, a version bakes 1s
    and a held one stays on the canaries (an operator aborts it)."""
    started = []
    rollout = (
        "rollout:\n  policies:\n"
        '    - keys: { type_urls: ["type.googleapis.com/envoy.config.cluster.v3.Cluster"] }\n'
        "      canary: { fraction: 1.0 }\n      bake: 1s\n      rollback_canaries: false\n"
    )
    try:
        yield start_stack(tmp_path, started, relay_extra=rollout)
    finally:
        stop_all(started)


def cluster_entry(csds):
    return next(e for e in csds if e["type_url"].endswith("envoy.config.cluster.v3.Cluster"))


def test_grpc_xds_client_is_rolled_back_from_a_held_cluster_it_nacked(rollout_setup):
    """Staged rollout with grpcio's client as the canary: a cluster with lb_policy MAGLEV
    (which grpcio rejects) is NACKed and held by the relay's gate (GET /rollout shows grpcio's
    message); POST abort rolls the canary back: the relay sends the stable version's full
    state again with a new nonce, grpcio's CSDS shows that version ACKED, and RPCs succeed."""
    setup = rollout_setup
    client = start_client(setup, mode="rollback")
    _, line = client.wait_line(lambda l: l.startswith("{"))
    phase1 = json.loads(line)
    assert "error" not in phase1, phase1
    ok, csds = all_acked(phase1["csds"])
    assert ok, csds
    stable = cluster_entry(phase1["csds"])["version"]

    body = json.dumps({"bad_clusters": ["cluster_0"]})
    bad = json.loads(http_json("POST", setup["origin_stats"], "/extras", body))["version"]
    _, line = client.wait_line(lambda l: l.startswith('{"phase": 2') or l.startswith('{"error"'))
    phase2 = json.loads(line)
    assert "error" not in phase2, phase2
    nacked = cluster_entry(phase2["csds"])
    assert nacked["status"] == "NACKED" and nacked["error"], nacked

    deadline = time.time() + TIMEOUT
    while True:
        rollouts = json.loads(http("GET", setup["relay_admin"], "/rollout"))["rollouts"]
        held = [r for r in rollouts if r["key"] == "staging_cds" and r["phase"] == "held"]
        if held or time.time() > deadline:
            break
        time.sleep(0.1)
    assert held, rollouts
    assert (held[0]["candidate_version"], held[0]["stable_version"]) == (bad, stable), held
    canary = held[0]["canaries"][0]
    assert canary["node_id"] == "grpc-client-1" and canary["answer"] == "nack", canary
    assert canary["nack_message"], canary
    metrics = http("GET", setup["relay_admin"], "/metrics")
    assert 'xds_relay_rollout_held{key="staging_cds"} 1' in metrics

    http("POST", setup["relay_admin"], "/rollout/staging_cds/abort")
    _, line = client.wait_line(lambda l: l.startswith('{"phase": 3') or l.startswith('{"error"'))
    phase3 = json.loads(line)
    assert "error" not in phase3, phase3
    rolled_back = cluster_entry(phase3["csds"])
    assert (rolled_back["status"], rolled_back["version"], rolled_back["error"]) == ("ACKED", stable, ""), rolled_back
    assert phase3["rpc_failures"] == 0 and len(phase3["after"]) == 5, phase3

"""Interop: grpcio's own xDS client (a real, independent implementation) through the relay.

Real processes on loopback: two gRPC backends (in this process), the example management
server (publishing one cluster whose endpoint rotates between the backends), the relay, and
a gRPC client process resolving `xds:///example-service` through the relay over ADS.
"""

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

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


@pytest.fixture
def setup(tmp_path):
    started = []
    try:
        server_a, address_a = backend("backend-a")
        server_b, address_b = backend("backend-b")
        origin = Process(
            "origin",
            [
                str(BIN / "example-management-server"),
                "--address", "127.0.0.1:0",
                "--stats-address", "127.0.0.1:0",
                "--interval", "600m",
                "--clusters", "1",
                "--listeners", "1",
                "--endpoints", f"{address_a},{address_b}",
            ],
        )
        started.append(origin)
        addresses = origin.addresses("listening", 2)
        stats = next(a for a in addresses if _healthy(a))
        origin_xds = next(a for a in addresses if a != stats)
        host, port = origin_xds.rsplit(":", 1)
        bootstrap = tmp_path / "bootstrap.yaml"
        bootstrap.write_text(
            "server:\n  address: { address: \"127.0.0.1\", port_value: 0 }\n"
            f"origin_server:\n  address: {{ address: \"{host}\", port_value: {port} }}\n"
            "  api_type: AGGREGATED_GRPC\n"
            "cache:\n  ttl: 60s\n"
            "admin:\n  address: { address: \"127.0.0.1\", port_value: 0 }\n"
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
        yield {"origin_stats": stats, "relay_xds": relay_xds, "relay_admin": relay_admin, "started": started}
        server_a.stop(None)
        server_b.stop(None)
    finally:
        for process in started:
            process.stop()


def _healthy(address):
    try:
        http("GET", address, "/healthz")
        return True
    except Exception:
        return False


def grpc_bootstrap(relay_xds):
    return json.dumps(
        {
            "xds_servers": [
                {"server_uri": relay_xds, "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}
            ],
            "node": {"id": "grpc-client-1", "cluster": "staging", "locality": {"zone": "zone-a"}},
        }
    )


def all_acked(csds):
    types = {entry["type_url"].rsplit(".", 1)[-1] for entry in csds}
    return (
        types >= {"Listener", "RouteConfiguration", "Cluster", "ClusterLoadAssignment"}
        and all(entry["status"] == "ACKED" for entry in csds)
    ), csds


def test_grpc_xds_client_through_the_relay(setup):
    env = dict(os.environ, GRPC_XDS_BOOTSTRAP_CONFIG=grpc_bootstrap(setup["relay_xds"]))
    env.pop("GRPC_XDS_BOOTSTRAP", None)
    client = Process(
        "grpc-client", [sys.executable, str(Path(__file__).with_name("grpc_client.py")), "example-service", str(TIMEOUT)], env
    )
    setup["started"].append(client)

    _, line = client.wait_line(lambda l: l.startswith("{"))
    phase1 = json.loads(line)
    assert "error" not in phase1, phase1
    assert phase1["backend"] in ("backend-a", "backend-b")
    ok, csds = all_acked(phase1["csds"])
    assert ok, csds

    version = json.loads(http("POST", setup["origin_stats"], "/publish"))["version"]
    index, line = client.wait_line(lambda l: l.startswith('{"phase": 2') or l.startswith('{"error"'))
    phase2 = json.loads(line)
    assert "error" not in phase2, phase2
    assert phase2["backend"] != phase1["backend"], "the endpoint change reached the client"
    ok, csds = all_acked(phase2["csds"])
    assert ok, csds
    eds = [entry for entry in phase2["csds"] if entry["type_url"].endswith("ClusterLoadAssignment")]
    assert eds and all(entry["version"] == version for entry in eds), eds

    keys = json.loads(http("GET", setup["relay_admin"], "/cache/keys"))["Names"]
    assert set(keys) >= {"staging_lds", "staging_rds_route_0", "staging_cds", "staging_eds"}, keys
    stats = json.loads(http("GET", setup["origin_stats"], "/stats"))
    assert stats["open_by_method"].get("StreamAggregatedResources") == 4, stats

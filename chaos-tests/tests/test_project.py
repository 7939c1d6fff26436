"""The compose project rendering (no containers started)."""

from __future__ import annotations

import os
import tempfile
import unittest
from pathlib import Path

from chaos import docker as d
from chaos.project import CHECKED_IN_COMPOSE, Settings, backend_ip, compose_env, render_bootstrap, render_compose, write_run_dir

RULES = Path(__file__).resolve().parents[2] / "deploy/config/aggregation-rules.yaml"

try:
    import yaml  # PyYAML, when the machine has it
except ImportError:  # pragma: no cover
    yaml = None


class ProjectTest(unittest.TestCase):
    def test_checked_in_compose_is_the_rendering(self):
        self.assertEqual(CHECKED_IN_COMPOSE.read_text(), render_compose(3),
                         "regenerate: python3 run.py --render-compose > docker-compose.yml")

    def test_groups_and_nodes(self):
        s = Settings(relays=2, direct_clients=3, lb_clients=4, delta_clients=0, grpc_clients=0)
        self.assertEqual(s.client_groups(), {"client-r1": ("relay-1", 3), "client-r2": ("relay-2", 3), "client-lb": ("lb", 4)})
        self.assertEqual(s.expected_nodes()["client-lb"], ["lb-0", "lb-1", "lb-2", "lb-3"])
        self.assertEqual(s.expected_nodes()["client-r2"], ["r2-0", "r2-1", "r2-2"])
        self.assertEqual(s.total_clients(), 10)

    def test_delta_and_grpc_groups(self):
        s = Settings(relays=2, direct_clients=1, lb_clients=1, delta_clients=2, grpc_clients=3)
        self.assertEqual(s.client_groups(), {
            "client-r1": ("relay-1", 1), "client-r2": ("relay-2", 1), "client-lb": ("lb", 1), "client-delta": ("lb", 2),
            "grpc-r1": ("relay-1", 3), "grpc-r2": ("relay-2", 3), "grpc-lb": ("lb", 3)})
        self.assertEqual(s.expected_nodes()["client-delta"], ["dlb-0", "dlb-1"])
        self.assertEqual(s.expected_nodes()["grpc-r2"], ["g-r2-0", "g-r2-1", "g-r2-2"])
        self.assertEqual(s.nodes_of_kind("grpc")[:2], ["g-r1-0", "g-r1-1"])
        self.assertEqual(len(s.nodes_of_kind("grpc")), 9)
        self.assertEqual(s.total_clients(), 14)
        # grpcio clients always ask for all four types; delta progress is measured on EDS.
        t = Settings(types="cds,eds")
        self.assertEqual(t.subscribed_types("grpc"), ("cds", "eds", "lds", "rds"))
        self.assertEqual(t.subscribed_types("delta"), ("cds", "eds"))
        self.assertEqual((t.progress_types("delta"), t.progress_types("loadgen"), t.progress_types("grpc")), (("eds",), None, None))

    def test_backend_address(self):
        self.assertEqual(backend_ip("172.30.7.0/24"), "172.30.7.250")
        env = compose_env(Settings(), Path("/tmp/x"), ("172.30.7.0/24", "172.30.8.0/24"))
        self.assertEqual(env["CHAOS_BACKEND_IP"], "172.30.7.250")
        self.assertEqual(env["CHAOS_BACKEND_ENDPOINTS"], "172.30.7.250:50051,172.30.7.250:50052")
        self.assertEqual((env["CHAOS_GRPC_CLIENTS"], env["CHAOS_DELTA_CLIENTS"]), ("3", "8"))

    def test_compose_mentions_every_service(self):
        text = render_compose(4)
        for svc in ["origin", "relay-1", "relay-4", "lb", "client-r4", "client-lb"]:
            self.assertIn(f"\n  {svc}:\n", text)
        self.assertIn('XDS_RELAY_BACKENDS: "relay-1 relay-2 relay-3 relay-4"', text)
        self.assertIn("--record=/records/client-r4.jsonl", text)
        self.assertIn("--node-id-template=r4-{i}", text)
        for svc in ["backend", "client-delta", "grpc-r4", "grpc-lb"]:
            self.assertIn(f"\n  {svc}:\n", text)
        self.assertIn("--server=relay-4:9991", text)
        self.assertIn("--record-template=/records/grpc-r4-{i}.jsonl", text)
        self.assertIn("--node-id-template=g-lb-{i}", text)
        self.assertIn("--protocol=delta", text)
        self.assertIn("--endpoints=${CHAOS_BACKEND_ENDPOINTS:-", text)

    @unittest.skipIf(yaml is None, "PyYAML not installed")
    def test_bootstraps_parse(self):
        s = Settings()
        b = yaml.safe_load(render_bootstrap(s, 2))
        self.assertEqual(b["cluster"]["node_name"], "relay-2")
        self.assertEqual(b["cluster"]["advertise_host"], "relay-2-peer")
        self.assertEqual(b["cluster"]["seeds"], ["relay-1-peer:7946", "relay-2-peer:7946", "relay-3-peer:7946"])
        self.assertEqual(b["origin_server"]["address"], {"address": "origin", "port_value": 18000})
        self.assertNotIn("tracing", b)
        legacy = yaml.safe_load(render_bootstrap(Settings(cluster_mode=False), 1))
        self.assertNotIn("cluster", legacy)

    @unittest.skipIf(yaml is None, "PyYAML not installed")
    def test_compose_parses(self):
        c = yaml.safe_load(render_compose(3))
        self.assertEqual(c["services"]["relay-2"]["networks"]["cluster"]["aliases"], ["relay-2-peer"])
        self.assertEqual(c["services"]["relay-2"]["stop_grace_period"], "30s")
        self.assertEqual(set(c["networks"]), {"xds", "cluster"})
        self.assertEqual(c["services"]["backend"]["networks"]["xds"]["ipv4_address"], "${CHAOS_BACKEND_IP:-172.30.201.250}")
        self.assertEqual(c["services"]["grpc-r2"]["image"], "xds-relay-grpc-client:${XDS_RELAY_TAG:-dev}")
        self.assertIn("--cluster-template=grpc-{i}", c["services"]["grpc-r2"]["command"])
        self.assertEqual(c["services"]["client-delta"]["entrypoint"], ["/usr/local/bin/xds-loadgen"])

    def test_run_dir(self):
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp) / "run"
            self.assertEqual(write_run_dir(Settings(), run, RULES), CHECKED_IN_COMPOSE)
            self.assertTrue((run / "config/relay-3.yaml").exists())
            self.assertEqual(os.stat(run / "records").st_mode & 0o777, 0o777)
            other = write_run_dir(Settings(relays=5), Path(tmp) / "run5", RULES)
            self.assertEqual(other, Path(tmp) / "run5/docker-compose.yml")
            self.assertIn("relay-5", other.read_text())

    @unittest.skipIf(os.environ.get("CHAOS_SKIP_DOCKER") == "1" or not d.docker_available(), "no Docker")
    def test_compose_config_accepts_it(self):
        with tempfile.TemporaryDirectory() as tmp:
            s = Settings()
            env = compose_env(s, Path(tmp), ("172.30.250.0/24", "172.30.251.0/24"))
            c = d.Compose("chaos-configtest", [str(CHECKED_IN_COMPOSE)], env)
            c.config_ok()
            out = c("config").stdout
            self.assertIn("172.30.251.0/24", out)
            self.assertIn(f"{tmp}/records", out)


if __name__ == "__main__":
    unittest.main()

"""The compose project rendering (no containers started)."""

from __future__ import annotations

import os
import tempfile
import unittest
from pathlib import Path

from chaos import docker as d
from chaos.project import CHECKED_IN_COMPOSE, Settings, compose_env, render_bootstrap, render_compose, write_run_dir

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
        s = Settings(relays=2, direct_clients=3, lb_clients=4)
        self.assertEqual(s.client_groups(), {"client-r1": ("relay-1", 3), "client-r2": ("relay-2", 3), "client-lb": ("lb", 4)})
        self.assertEqual(s.expected_nodes()["client-lb"], ["lb-0", "lb-1", "lb-2", "lb-3"])
        self.assertEqual(s.expected_nodes()["client-r2"], ["r2-0", "r2-1", "r2-2"])
        self.assertEqual(s.total_clients(), 10)

    def test_compose_mentions_every_service(self):
        text = render_compose(4)
        for svc in ["origin", "relay-1", "relay-4", "lb", "client-r4", "client-lb"]:
            self.assertIn(f"\n  {svc}:\n", text)
        self.assertIn('XDS_RELAY_BACKENDS: "relay-1 relay-2 relay-3 relay-4"', text)
        self.assertIn("--record=/records/client-r4.jsonl", text)
        self.assertIn("--node-id-template=r4-{i}", text)

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

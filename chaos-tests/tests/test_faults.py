"""The fault-injection helpers (chaos/docker.py) against dummy containers: the example image's
management server as the target (it has a health check and an HTTP endpoint) and a second
container of the same image as a client.

Needs Docker and the images xds-relay-example:dev and xds-relay-chaos-tools:dev (run.py or
deploy/images/build.sh make them); skipped otherwise, or when CHAOS_SKIP_DOCKER=1. Everything
it creates is removed at the end. About 30 s.
"""

from __future__ import annotations

import os
import time
import unittest
import uuid

from chaos import docker as d

EXAMPLE = os.environ.get("CHAOS_EXAMPLE_IMAGE", "xds-relay-example:dev")


def _skip_reason() -> str | None:
    if os.environ.get("CHAOS_SKIP_DOCKER") == "1":
        return "CHAOS_SKIP_DOCKER=1"
    if not d.docker_available():
        return "Docker is not available"
    for image in (EXAMPLE, d.TOOLS_IMAGE):
        if not d.image_exists(image):
            return f"image {image} is missing (python3 chaos-tests/run.py builds it)"
    return None


SKIP = _skip_reason()


@unittest.skipIf(SKIP is not None, SKIP or "")
class FaultHelpersTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        tag = uuid.uuid4().hex[:8]
        cls.net = f"chaos-selftest-{tag}"
        cls.created: list[str] = []
        subnet = d.free_subnets(1)[0]
        d.docker("network", "create", "--subnet", subnet, "--label", "chaos-selftest=1", cls.net)
        cls.srv = d.docker(
            "run", "-d", "--name", f"chaos-selftest-srv-{tag}", "--label", "chaos-selftest=1",
            "--network", cls.net, "--network-alias", "target", "-p", "127.0.0.1::18001",
            "--health-interval", "1s", "--health-retries", "2",
            EXAMPLE, "--address", "0.0.0.0:18000", "--stats-address", "0.0.0.0:18001", "--interval", "1s",
        ).stdout.strip()
        cls.created.append(cls.srv)
        cls.cli = d.docker(
            "run", "-d", "--name", f"chaos-selftest-cli-{tag}", "--label", "chaos-selftest=1",
            "--network", cls.net, "--entrypoint", "/bin/sleep", "--no-healthcheck", EXAMPLE, "infinity",
        ).stdout.strip()
        cls.created.append(cls.cli)
        d.wait_healthy([cls.srv, cls.cli], timeout=60)

    @classmethod
    def tearDownClass(cls):
        for c in cls.created:
            d.docker("rm", "-f", "-v", c, check=False)
        d.docker("network", "rm", cls.net, check=False)

    def reachable(self, timeout: float = 3.0) -> bool:
        """Whether the client container reaches the target's HTTP port by its alias."""
        p = d.docker("exec", self.cli, "timeout", str(timeout), "/usr/local/bin/http-check", "18001", "/healthz", "target",
                     check=False, timeout=timeout + 30)
        return p.returncode == 0

    def stats(self) -> dict:
        return d.http_json("GET", f"http://127.0.0.1:{d.host_port(self.srv, 18001)}/stats")

    def test_1_baseline(self):
        self.assertEqual(d.health(self.srv), "healthy")
        self.assertTrue(self.reachable())
        self.assertIn("publishes", self.stats())
        atts = d.attachments(self.srv)
        self.assertIn(self.net, atts)
        self.assertIn("target", atts[self.net].aliases)

    def test_2_kill_and_start(self):
        d.kill(self.srv, "KILL")
        self.assertEqual(d.health(self.srv), "exited")
        self.assertFalse(self.reachable(1))
        d.start(self.srv)
        d.wait_healthy([self.srv], timeout=30)
        self.assertTrue(self.reachable())
        self.assertIn("publishes", self.stats())  # host port asked again after the restart

    def test_3_stop_is_graceful_and_timed(self):
        took = d.stop(self.srv, timeout_s=10)
        self.assertLess(took, 9, "the example server handles SIGTERM well before the kill timeout")
        self.assertEqual(inspect_exit(self.srv), 0)
        d.start(self.srv)
        d.wait_healthy([self.srv], timeout=30)

    def test_4_disconnect_reconnect_keeps_address_and_alias(self):
        before = d.attachments(self.srv)[self.net]
        att = d.disconnect(self.srv, self.net)
        self.assertEqual(att, before)
        self.assertNotIn(self.net, d.attachments(self.srv))
        self.assertFalse(self.reachable(2))
        d.reconnect(self.srv, att)
        after = d.attachments(self.srv)[self.net]
        self.assertEqual(after.ip, before.ip)
        self.assertIn("target", after.aliases)
        self.assertTrue(self.reachable())

    def test_5_degrade_and_restore(self):
        # 100% loss makes the effect observable without statistics.
        applied = d.degrade(self.srv, delay_ms=10, jitter_ms=0, loss_pct=100.0)
        try:
            self.assertTrue(applied.startswith("netem") or applied.startswith("iptables"), applied)
            shown = d.qdiscs(self.srv)
            self.assertTrue("netem" in shown or "CHAOS" in shown, shown)
            self.assertFalse(self.reachable(2))
            # The target itself still answers on its loopback (lo is never degraded).
            p = d.docker("exec", self.srv, "/usr/local/bin/http-check", "18001", "/healthz", check=False)
            self.assertEqual(p.returncode, 0, p.stdout)
        finally:
            d.restore(self.srv)
        shown = d.qdiscs(self.srv)
        self.assertNotIn("netem", shown)
        self.assertNotIn("CHAOS", shown)
        self.assertTrue(self.reachable())
        # restore is idempotent
        d.restore(self.srv)

    def test_6_free_subnets_do_not_overlap(self):
        import ipaddress

        used = [ipaddress.ip_network(s) for s in d.network_subnets() if ":" not in s]
        for s in d.free_subnets(2):
            net = ipaddress.ip_network(s)
            self.assertFalse(any(net.overlaps(u) for u in used), s)


def inspect_exit(cid: str) -> int:
    for _ in range(20):
        st = d.inspect(cid)["State"]
        if not st["Running"]:
            return st["ExitCode"]
        time.sleep(0.2)
    return -1


if __name__ == "__main__":
    unittest.main()

"""The secure chaos project without containers: the real-origin check, gossip rejection
counts from Prometheus text, the certificates gen-certs.sh makes for a run (needs openssl),
the TLS and plaintext renderings, and the rogue-node scenario's verdicts on a fake harness."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import unittest
from pathlib import Path
from unittest import mock

from chaos import invariants as inv
from chaos import scenarios, tls
from chaos.invariants import Record
from chaos.project import ROGUE_CLUSTERS, ROGUE_SERVICES, TLS_MOUNT, Settings, render_bootstrap, render_compose, render_rogue_bootstrap

try:
    import yaml  # PyYAML, when the machine has it
except ImportError:  # pragma: no cover
    yaml = None


def resp(node, t, typ, version, resources=3):
    return Record(t=t, node=node, event="response", type=typ, version=str(version), resources=resources)


class OriginCheckTest(unittest.TestCase):
    def test_real_origin_passes(self):
        recs = [resp("r1-0", 1, "cds", 1796183346543), resp("r1-0", 2, "eds", 1796183346543, resources=3),
                resp("g-r1-0", 3, "cds", 1796183346543, resources=1), resp("dlb-0", 4, "cds", 1796183346543, resources=0)]
        self.assertEqual(inv.check_origin(recs, ["r1-0", "dlb-0"], 3), [])

    def test_rogue_versions_and_cluster_counts_are_caught(self):
        recs = [resp("r1-0", 1, "cds", 100), resp("r1-0", 2, "eds", "v4711"), resp("r1-0", 3, "eds", "v4712"),
                resp("lb-0", 4, "cds", 200, resources=ROGUE_CLUSTERS),
                resp("g-r1-0", 5, "cds", 300, resources=ROGUE_CLUSTERS)]  # not a wildcard client: count not checked
        vs = inv.check_origin(recs, ["r1-0", "lb-0"], 3)
        self.assertEqual([(v.invariant, v.node) for v in vs], [("origin", "r1-0"), ("origin", "lb-0")], vs)
        self.assertIn("'v4711'", vs[0].message)
        self.assertIn(f"{ROGUE_CLUSTERS} clusters, the real origin has 3", vs[1].message)
        # Without an expected count only the versions are checked.
        self.assertEqual([v.node for v in inv.check_origin(recs)], ["r1-0"])

    def test_gossip_rejections(self):
        text = "\n".join([
            "# HELP xds_relay_gossip_rejected_total Gossip datagrams refused.",
            "# TYPE xds_relay_gossip_rejected_total counter",
            'xds_relay_gossip_rejected_total{reason="unknown_key"} 12',
            'xds_relay_gossip_rejected_total{reason="replay"} 3',
            'xds_relay_gossip_accepted_total 99',
            "gossip_rejected_total 1",
        ])
        self.assertEqual(inv.gossip_rejections(text), 16)
        self.assertIsNone(inv.gossip_rejections("xds_relay_keys 3\n"))
        self.assertEqual(inv.gossip_rejections('gossip_rejected_total{reason="a b"} 2 1700000000000\n'), 2)


class RenderingTest(unittest.TestCase):
    def test_tls_compose(self):
        text = render_compose(3)
        for n in (1, 2, 3):
            self.assertIn(f'"${{CHAOS_TLS_DIR:?set CHAOS_TLS_DIR}}/relay-{n}.key:{TLS_MOUNT}/relay.key:ro"', text)
            self.assertIn(f"--target=https://relay-{n}:9991", text)
        self.assertIn("--target=https://lb:9991", text)
        self.assertIn("--tls-client-ca=/tls/ca.pem", text)
        self.assertIn('LB_MODE: "tcp"', text)
        self.assertIn(f'"${{CHAOS_ROGUE_TLS_DIR:?set CHAOS_ROGUE_TLS_DIR}}/rogue.pem:{TLS_MOUNT}/relay.pem:ro"', text)
        # The rogue origin publishes something else.
        self.assertIn("--random-versions", text)
        self.assertIn(f"--clusters={ROGUE_CLUSTERS}", text)
        for svc in ROGUE_SERVICES:
            self.assertIn(f"\n  {svc}:\n", text)

    def test_plaintext_compose(self):
        text = render_compose(3, tls=False)
        self.assertNotIn("CHAOS_TLS_DIR", text)
        self.assertNotIn("--tls-", text)
        self.assertNotIn("https://", text)
        self.assertIn('LB_MODE: "http"', text)

    @unittest.skipIf(yaml is None, "PyYAML not installed")
    def test_bootstraps(self):
        b = yaml.safe_load(render_bootstrap(Settings(), 2))
        self.assertEqual(b["server"]["tls"]["client_ca_file"], f"{TLS_MOUNT}/ca.pem")
        self.assertEqual(b["origin_server"]["tls"]["server_name"], "origin")
        self.assertEqual(b["cluster"]["tls"]["cert_file"], f"{TLS_MOUNT}/relay.pem")
        self.assertEqual(b["cluster"]["gossip_keys_file"], f"{TLS_MOUNT}/gossip.keys")
        self.assertEqual(b["admin"]["auth_token_file"], f"{TLS_MOUNT}/admin.token")
        self.assertNotIn("insecure", b["cluster"])
        plain = yaml.safe_load(render_bootstrap(Settings(tls=False), 2))
        self.assertTrue(plain["cluster"]["insecure"])
        self.assertNotIn("tls", plain["server"])
        rogue = yaml.safe_load(render_rogue_bootstrap(Settings()))
        self.assertEqual(rogue["cluster"]["cluster_id"], b["cluster"]["cluster_id"])
        self.assertEqual(rogue["cluster"]["seeds"], b["cluster"]["seeds"])
        self.assertEqual((rogue["cluster"]["node_name"], rogue["cluster"]["advertise_host"]), ("rogue", "rogue-peer"))
        self.assertEqual(rogue["origin_server"]["address"]["address"], "rogue-origin")


def openssl_available() -> bool:
    return shutil.which("openssl") is not None


@unittest.skipUnless(openssl_available(), "openssl not installed")
class CertificatesTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = Path(self.tmp.name)

    def tearDown(self):
        self.tmp.cleanup()

    def openssl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["openssl", *args], capture_output=True, text=True)

    def test_cluster_and_rogue_secrets(self):
        real, rogue = self.dir / "tls", self.dir / "tls-rogue"
        tls.generate(real, ["relay-1", "relay-2"])
        tls.generate_rogue(rogue)
        for f in ("ca.pem", "relay-1.pem", "relay-2.key", "origin.pem", "client-loadgen.pem", "client-grpc-client.key",
                  "gossip.keys", "admin.token"):
            self.assertTrue((real / f).stat().st_size > 0, f)
        san = self.openssl("x509", "-in", str(real / "relay-2.pem"), "-noout", "-ext", "subjectAltName").stdout
        self.assertIn("URI:spiffe://xds-relay-chaos/relay/relay-2", san)
        self.assertIn("DNS:relay-2", san)
        self.assertIn("DNS:lb", san)
        self.assertEqual(self.openssl("verify", "-CAfile", str(real / "ca.pem"), str(real / "client-loadgen.pem")).returncode, 0)
        # The rogue's certificate does not chain to the cluster's CA, and its gossip key differs.
        self.assertNotEqual(self.openssl("verify", "-CAfile", str(real / "ca.pem"), str(rogue / "rogue.pem")).returncode, 0)
        self.assertNotEqual((real / "gossip.keys").read_text(), (rogue / "gossip.keys").read_text())
        # Kept on a second run.
        before = (real / "relay-1.pem").read_bytes()
        tls.generate(real, ["relay-1", "relay-2"])
        self.assertEqual((real / "relay-1.pem").read_bytes(), before)
        # A certificate of another CA among the files is refused, naming it; --force starts over.
        shutil.copy(rogue / "rogue.pem", real / "relay-2.pem")
        with self.assertRaises(tls.TlsError) as e:
            tls.generate(real, ["relay-1", "relay-2"])
        self.assertIn("relay-2.pem does not chain", str(e.exception))
        p = subprocess.run([str(tls.GEN_CERTS), "-q", "--force", "--out", str(real), "--relays", "2"], capture_output=True, text=True)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertNotEqual((real / "relay-1.pem").read_bytes(), before)
        self.assertEqual(self.openssl("verify", "-CAfile", str(real / "ca.pem"), str(real / "relay-2.pem")).returncode, 0)

    def test_args(self):
        args = tls.gen_certs_args(self.dir, ["relay-1"], origin_dns="origin", clients=("loadgen",))
        self.assertIn("--cluster-id", args)
        self.assertEqual(args[args.index("--relay-names") + 1], "relay-1")
        self.assertEqual(args[args.index("--clients") + 1], "loadgen")


class FakeHarness:
    """What RogueNode uses of a Harness."""

    def __init__(self, before, after, members=("relay-1", "relay-2")):
        self.s = Settings(relays=2)
        self.samples = [before, after]
        self.members = members
        self.violations: list[str] = []
        self.up: list[list[str]] = []
        self.removed: list[tuple] = []
        self.run_dir = Path(tempfile.mkdtemp())
        self.held = 0.0
        self.result = mock.Mock(notes=[])
        self.compose = mock.Mock()
        self.compose.up.side_effect = lambda services: self.up.append(services)
        self.compose.side_effect = self.compose_call

    def compose_call(self, *args, **kw):
        if args[0] == "logs":
            return mock.Mock(stdout="rogue-relay | started\n", stderr="")
        self.removed.append(args)
        return None

    def gossip_rejections(self):
        return self.samples.pop(0)

    def hold(self, seconds, progress=True, bound=10.0):
        self.held = seconds

    def cid(self, service):
        return f"cid-{service}"

    def cluster_view(self, relay=None):
        return {"members": [{"name": m} for m in self.members]}

    def violation(self, text):
        self.violations.append(text)


class RogueScenarioTest(unittest.TestCase):
    def run_scenario(self, h: FakeHarness) -> str:
        with mock.patch.object(scenarios.d, "inspect", return_value={"State": {"Running": True}}):
            return scenarios.RogueNode().inject_and_heal(h)

    def test_rejections_grew_on_every_relay(self):
        h = FakeHarness({"relay-1": 0, "relay-2": 4}, {"relay-1": 30, "relay-2": 41})
        fault = self.run_scenario(h)
        self.assertEqual(h.violations, [])
        self.assertEqual(h.up, [list(ROGUE_SERVICES)])
        self.assertEqual(h.removed, [("rm", "-f", "-s", *ROGUE_SERVICES)])
        self.assertEqual(h.held, 30.0)
        self.assertIn("relay-1 +30, relay-2 +37", fault)
        self.assertIn("rogue-relay | started", (h.run_dir / "rogue.log").read_text())

    def test_a_relay_that_did_not_notice_or_admitted_it(self):
        h = FakeHarness({"relay-1": 5, "relay-2": None}, {"relay-1": 5, "relay-2": None}, members=("relay-1", "relay-2", "rogue"))
        self.run_scenario(h)
        self.assertEqual(len(h.violations), 3, h.violations)
        self.assertIn("relay-1: gossip_rejected_total did not grow", h.violations[0])
        self.assertIn("relay-2 exports no gossip_rejected_total", h.violations[1])
        self.assertIn("lists the rogue node as a member", h.violations[2])
        self.assertEqual(h.removed, [("rm", "-f", "-s", *ROGUE_SERVICES)], "the rogue node is removed")

    def test_needs_tls(self):
        h = FakeHarness({}, {})
        h.s = Settings(relays=2, tls=False)
        with self.assertRaises(scenarios.HarnessError):
            self.run_scenario(h)
        self.assertEqual(h.up, [])


if __name__ == "__main__":
    unittest.main()

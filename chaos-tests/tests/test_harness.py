"""Harness bookkeeping without containers: disturbance windows, survivors, the final checks
on synthetic records, and the result table."""

from __future__ import annotations

import tempfile
import unittest
from pathlib import Path

from chaos import invariants as inv
from chaos.harness import Harness, Result
from chaos.project import Settings

RULES = Path(__file__).resolve().parents[2] / "deploy/config/aggregation-rules.yaml"


class FakeScenario:
    bound_s = 10.0


def resp(node, t, typ, version, resources=3):
    return inv.Record(t=t, node=node, event="response", type=typ, version=str(version), resources=resources)


class HarnessBookkeepingTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.s = Settings(relays=2, direct_clients=1, lb_clients=1, types="cds,eds", delta_clients=0, grpc_clients=0)
        self.h = Harness(self.s, "unit", Path(self.tmp.name) / "run", RULES, log=lambda m: None,
                         subnets=("172.30.250.0/24", "172.30.251.0/24"))
        self.h.grace_ms = 1000

    def tearDown(self):
        self.tmp.cleanup()

    def test_windows_and_survivors(self):
        self.assertEqual(sorted(self.h.survivors()), ["r1-0", "r2-0"])
        self.h.disturb("relay-2", 10_000)
        self.assertEqual(self.h.survivors(), ["r1-0"])
        self.h.close_disturbances(20_000)
        w = self.h.allowed_windows()
        self.assertEqual(w["r2-0"], [(9_000, 21_000)])
        self.assertEqual(w["r1-0"], [])
        self.assertEqual(w["lb-0"], [(9_000, 21_000)])  # LB clients may have been on relay-2

    def test_lb_disturbance_only_affects_lb_clients(self):
        self.h.disturb("lb", 5_000, 6_000)
        w = self.h.allowed_windows()
        self.assertEqual((w["r1-0"], w["r2-0"], w["lb-0"]), ([], [], [(4_000, 7_000)]))

    def test_evaluate_clean_run(self):
        recs = []
        for n in ["r1-0", "r2-0", "lb-0"]:
            recs += [inv.Record(t=0, node=n, event="connect"),
                     resp(n, 1000, "cds", 100), resp(n, 1000, "eds", 100),
                     resp(n, 5000, "cds", 200), resp(n, 5100, "eds", 200)]
        self.h.evaluate(recs, "200", fault_t=2000, heal_t=4000, end_t=9000, scenario=FakeScenario())
        self.assertEqual(self.h.result.violations, [])
        self.assertEqual(self.h.result.convergence_ms, 1100.0)

    def test_evaluate_finds_each_kind(self):
        self.h.disturb("relay-2", 2000, 3000)
        self.h.close_disturbances(3000)
        recs = [
            inv.Record(t=0, node="r1-0", event="connect"),
            resp("r1-0", 1000, "cds", 100), resp("r1-0", 1000, "eds", 100),
            inv.Record(t=2500, node="r1-0", event="disconnect", detail="UNAVAILABLE"),  # r1 was not disturbed
            resp("r1-0", 5000, "cds", 200), resp("r1-0", 5000, "eds", 200),
            inv.Record(t=0, node="r2-0", event="connect"),
            resp("r2-0", 1000, "cds", 100), resp("r2-0", 1000, "eds", 100),
            inv.Record(t=2500, node="r2-0", event="disconnect"),  # allowed: relay-2 disturbed
            resp("r2-0", 3000, "cds", 0, resources=0),  # empty CDS, and older than 100
            resp("r2-0", 5000, "cds", 200), resp("r2-0", 5000, "eds", 200),
            # lb-0 never gets eds 200
            resp("lb-0", 1000, "cds", 100), resp("lb-0", 1000, "eds", 100), resp("lb-0", 5000, "cds", 200),
        ]
        self.h.evaluate(recs, "200", fault_t=2000, heal_t=4000, end_t=9000, scenario=FakeScenario())
        kinds = sorted(v.split("]")[0].strip("[") for v in self.h.result.violations)
        self.assertEqual(kinds, ["convergence", "monotonic", "no-disconnect", "nonempty"], self.h.result.violations)

    def test_records_after_end_are_ignored(self):
        recs = []
        for n in ["r1-0", "r2-0", "lb-0"]:
            recs += [resp(n, 1000, "cds", 100), resp(n, 1000, "eds", 100), resp(n, 5000, "cds", 200), resp(n, 5000, "eds", 200),
                     inv.Record(t=9500, node=n, event="disconnect")]  # clients stopped by the harness
        self.h.evaluate(recs, "200", fault_t=2000, heal_t=4000, end_t=9000, scenario=FakeScenario())
        self.assertEqual(self.h.result.violations, [])


def ev(node, t, event, **kw):
    return inv.Record(t=t, node=node, event=event, **kw)


class GrpcAndDeltaTest(unittest.TestCase):
    """Groups of grpcio clients (g-r1-0, g-r2-0, g-lb-0) and a delta group (dlb-0)."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.s = Settings(relays=2, direct_clients=0, lb_clients=0, types="cds,eds,lds,rds", delta_clients=1, grpc_clients=1)
        self.h = Harness(self.s, "unit", Path(self.tmp.name) / "run", RULES, log=lambda m: None,
                         subnets=("172.30.250.0/24", "172.30.251.0/24"))
        self.h.grace_ms = 1000

    def tearDown(self):
        self.tmp.cleanup()

    def grpc_ok(self, node, versions=(100, 200), t0=1000):
        recs = [ev(node, 0, "connect", stream=1), ev(node, 500, "rpc_ok", detail="backend-a")]
        for k, v in enumerate(versions):
            recs += [resp(node, t0 + 4000 * k, typ, v, resources=1) for typ in ("lds", "rds", "cds", "eds")]
        return recs

    def delta_ok(self, node="dlb-0"):
        # Only EDS moves: the other types arrive once, at the first version.
        return [ev(node, 0, "connect", stream=1)] + [resp(node, 1000, t, 100) for t in ("cds", "lds", "rds")] + [
            resp(node, 1000, "eds", 100), resp(node, 5000, "eds", 200)]

    def test_nodes_and_survivors(self):
        self.assertEqual(sorted(self.h.all_nodes()), ["dlb-0", "g-lb-0", "g-r1-0", "g-r2-0"])
        self.assertEqual(sorted(self.h.survivors()), ["g-r1-0", "g-r2-0"])

    def test_steady_state(self):
        g = self.grpc_ok("g-r1-0")
        self.assertTrue(self.h.is_steady("g-r1-0", g))
        self.assertFalse(self.h.is_steady("g-r1-0", [r for r in g if r.event != "rpc_ok"]), "needs a successful RPC")
        self.assertFalse(self.h.is_steady("g-r1-0", self.grpc_ok("g-r1-0", versions=(100,))), "needs two versions")
        self.assertTrue(self.h.is_steady("dlb-0", self.delta_ok()), "delta: EDS moves, the rest arrived once")
        self.assertFalse(self.h.is_steady("dlb-0", [r for r in self.delta_ok() if r.type != "rds"]), "delta: every type once")

    def test_clean_run(self):
        recs = self.grpc_ok("g-r1-0") + self.grpc_ok("g-r2-0") + self.grpc_ok("g-lb-0") + self.delta_ok()
        self.assertEqual(self.h.pending_version(recs, "200", self.h.all_nodes()), set())
        self.h.evaluate(recs, "200", fault_t=2000, heal_t=4000, end_t=9000, scenario=FakeScenario())
        self.assertEqual(self.h.result.violations, [])
        self.assertEqual(self.h.result.convergence_ms, 1000.0)

    def test_delta_without_the_target_eds(self):
        recs = self.grpc_ok("g-r1-0") + self.grpc_ok("g-r2-0") + self.grpc_ok("g-lb-0") + self.delta_ok()[:-1]
        self.assertEqual(self.h.pending_version(recs, "200", self.h.all_nodes()), {"dlb-0"})
        self.h.evaluate(recs, "200", fault_t=2000, heal_t=4000, end_t=9000, scenario=FakeScenario())
        self.assertEqual([v.split("]")[0] for v in self.h.result.violations], ["[convergence"], self.h.result.violations)
        self.assertIn("dlb-0: eds: never received", self.h.result.violations[0])

    def test_grpc_violations(self):
        self.h.disturb("relay-2", 2000, 3000)
        self.h.close_disturbances(3000)
        recs = self.grpc_ok("g-r1-0") + self.grpc_ok("g-r2-0") + self.grpc_ok("g-lb-0") + self.delta_ok() + [
            ev("g-r1-0", 2500, "rpc_error", detail="UNAVAILABLE: no children"),  # relay-1 was not disturbed
            ev("g-r2-0", 2500, "rpc_error", detail="UNAVAILABLE"),  # allowed: relay-2 was
            ev("g-r2-0", 2600, "disconnect", stream=1, detail="UNAVAILABLE"),  # allowed
            ev("g-r2-0", 2700, "connect", stream=2),  # allowed
            ev("g-lb-0", 6000, "nack", type="cds", name="cluster_0", version="300", detail="bad"),
            ev("g-r1-0", 6000, "does_not_exist", type="rds", name="route_0"),
        ]
        self.h.evaluate(recs, "200", fault_t=2000, heal_t=4000, end_t=9000, scenario=FakeScenario())
        kinds = sorted(v.split("]")[0].strip("[") for v in self.h.result.violations)
        self.assertEqual(kinds, ["does-not-exist", "nack", "rpc"], self.h.result.violations)
        self.assertIn("1 RPC errors of grpcio clients inside their disturbance windows", " ".join(self.h.result.notes))


class TableTest(unittest.TestCase):
    def test_table(self):
        import run

        r1 = Result("kill-owner", fault="kill -9 relay-2", clients=40, versions_published=31, convergence_ms=2300, duration_s=70)
        r2 = Result("lb-restart", clients=40, error="boom")
        text = run.table([r1, r2])
        lines = text.splitlines()
        self.assertIn("versions published", lines[0])
        self.assertIn("kill -9 relay-2", lines[2])
        self.assertIn("2.3s", lines[2])
        self.assertIn("ERROR", lines[3])


if __name__ == "__main__":
    unittest.main()


class ColdRestartTest(unittest.TestCase):
    def test_unserved_since_counts_only_responses_after_the_restart(self):
        from chaos.scenarios import BY_NAME, unserved_since

        recs = [
            resp("a", 1000, "cds", 5),
            resp("b", 1000, "cds", 5),
            inv.Record(t=2500, node="b", event="connect", stream=2),
            resp("b", 3000, "cds", 5),
            inv.Record(t=3100, node="c", event="connect", stream=2),
        ]
        self.assertEqual(unserved_since(recs, {"a", "b", "c"}, 2000), {"a", "c"})
        self.assertEqual(unserved_since(recs, {"a", "b"}, 500), set())
        self.assertIn("cold-restart-origin-down", BY_NAME)

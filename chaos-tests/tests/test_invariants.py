"""Unit tests of the invariant checks on synthetic client records (no Docker needed).

    cd chaos-tests && python3 -m unittest -v
"""

from __future__ import annotations

import json
import tempfile
import unittest
from pathlib import Path

from chaos import invariants as inv
from chaos.invariants import Record


def resp(node, t, typ, version, resources=3, stream=1, seq=0):
    return Record(t=t, node=node, event="response", type=typ, version=str(version), resources=resources, stream=stream, seq=seq)


def conn(node, t, stream=1):
    return Record(t=t, node=node, event="connect", stream=stream)


def disc(node, t, detail="UNAVAILABLE", stream=1):
    return Record(t=t, node=node, event="disconnect", stream=stream, detail=detail)


class ParseTest(unittest.TestCase):
    def test_canonical_and_aliases(self):
        lines = [
            json.dumps({"t": 1000.5, "node": "r1-0", "event": "response", "type": "cds", "version": "17", "resources": 3}),
            json.dumps({"ts_ms": 1001, "node_id": "r1-0", "kind": "response",
                        "type_url": "type.googleapis.com/envoy.config.listener.v3.Listener",
                        "version_info": "18", "resource_count": 2, "stream_id": 4}),
            json.dumps({"t": 1002, "client": 3, "event": "disconnect", "code": "UNAVAILABLE"}),
            json.dumps({"t_ns": 1_003_000_000, "node": "x", "event": "reconnect"}),
            '{"t": 1004, "node": "r1-0", "ev',  # partial last line
            "",
            "[1, 2]",
        ]
        recs, bad = inv.parse_lines(lines, source="client-r1")
        self.assertEqual(bad, 2)
        self.assertEqual(len(recs), 4)
        a, b, c, d = recs
        self.assertEqual((a.t, a.node, a.event, a.type, a.version, a.resources), (1000.5, "r1-0", "response", "cds", "17", 3))
        self.assertEqual((b.type, b.version, b.resources, b.stream), ("lds", "18", 2, 4))
        self.assertEqual((c.node, c.event, c.detail), ("client-r1#3", "disconnect", "UNAVAILABLE"))
        self.assertEqual((d.t, d.event), (1003.0, "connect"))

    def test_resources_as_list_and_event_inferred(self):
        (r,), bad = inv.parse_lines([json.dumps({"t": 1, "node": "n", "type": "eds", "version": "5", "resources": ["a", "b"]})])
        self.assertEqual(bad, 0)
        self.assertEqual((r.event, r.resources), ("response", 2))

    def test_load_records_reads_files(self):
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "client-lb.jsonl"
            p.write_text(json.dumps({"t": 1, "node": "lb-0", "event": "connect"}) + "\n")
            recs, bad = inv.load_records([p, Path(d) / "missing.jsonl"])
            self.assertEqual((len(recs), bad), (1, 0))


class MonotonicTest(unittest.TestCase):
    def test_increasing_and_repeats_are_fine(self):
        recs = [resp("a", 1, "cds", 10), resp("a", 2, "cds", 10), resp("a", 3, "cds", 12), resp("a", 4, "eds", 11)]
        self.assertEqual(inv.check_monotonic(recs), [])

    def test_older_after_newer_across_reconnect(self):
        recs = [resp("a", 1, "cds", 10), resp("a", 2, "cds", 12), disc("a", 3), conn("a", 4, 2), resp("a", 5, "cds", 11, stream=2)]
        v = inv.check_monotonic(recs)
        self.assertEqual(len(v), 1)
        self.assertEqual(v[0].invariant, "monotonic")
        self.assertIn("11 after 12", v[0].message)

    def test_per_type_and_per_client(self):
        # eds at 5 after cds at 10 is fine; another client's older version is fine.
        recs = [resp("a", 1, "cds", 10), resp("a", 2, "eds", 5), resp("b", 3, "cds", 4)]
        self.assertEqual(inv.check_monotonic(recs), [])

    def test_numeric_not_lexicographic(self):
        recs = [resp("a", 1, "cds", 9), resp("a", 2, "cds", 10)]
        self.assertEqual(inv.check_monotonic(recs), [])

    def test_sorted_by_time_not_input_order(self):
        recs = [resp("a", 2, "cds", 12), resp("a", 1, "cds", 10)]
        self.assertEqual(inv.check_monotonic(recs), [])

    def test_non_numeric_version_is_reported(self):
        v = inv.check_monotonic([resp("a", 1, "cds", "v17")])
        self.assertEqual(len(v), 1)
        self.assertIn("not an integer", v[0].message)


class NonEmptyTest(unittest.TestCase):
    def test_empty_lds_cds(self):
        recs = [resp("a", 1, "cds", 1, resources=0), resp("a", 1, "lds", 1, resources=2), resp("a", 1, "eds", 1, resources=0)]
        v = inv.check_nonempty(recs)
        self.assertEqual([x.message for x in v], ["cds 1: empty response"])

    def test_missing_count_is_reported(self):
        v = inv.check_nonempty([resp("a", 1, "lds", 1, resources=None)])
        self.assertEqual(len(v), 1)


class DisconnectTest(unittest.TestCase):
    def test_initial_connect_is_fine(self):
        self.assertEqual(inv.check_no_disconnects([conn("a", 1), resp("a", 2, "cds", 1)]), [])

    def test_disconnect_and_reconnect_are_reported(self):
        recs = [conn("a", 1), disc("a", 5), conn("a", 6, 2), conn("b", 1)]
        v = inv.check_no_disconnects(recs)
        self.assertEqual([(x.node, x.message) for x in v], [("a", "stream ended (UNAVAILABLE)"), ("a", "reconnected")])

    def test_node_filter_and_time_window(self):
        recs = [conn("a", 1), disc("a", 5), conn("b", 1), disc("b", 50)]
        self.assertEqual(inv.check_no_disconnects(recs, nodes=["b"], since=0, until=40), [])
        self.assertEqual(len(inv.check_no_disconnects(recs, nodes=["b"], since=0, until=60)), 1)
        self.assertEqual(inv.check_no_disconnects(recs, since=10), [x for x in inv.check_no_disconnects(recs, since=10) if x.node == "b"])

    def test_per_type_streams_each_have_an_initial_connect(self):
        recs = [Record(t=1, node="a", event="connect", type="cds"), Record(t=1, node="a", event="connect", type="eds"),
                Record(t=9, node="a", event="connect", type="eds")]
        v = inv.check_no_disconnects(recs)
        self.assertEqual([(x.t, x.message) for x in v], [(9, "reconnected")])

    def test_allowed_windows(self):
        recs = [conn("a", 1), disc("a", 10), conn("a", 12, 2), disc("a", 30)]
        v = inv.check_no_disconnects(recs, allowed={"a": [(9, 20)]})
        self.assertEqual([x.t for x in v], [30])


class ConvergenceTest(unittest.TestCase):
    def test_all_reach_target(self):
        recs = [
            resp("a", 1000, "cds", 100), resp("a", 1500, "cds", 200), resp("a", 1600, "eds", 200),
            resp("b", 1000, "cds", 100), resp("b", 4000, "cds", 201),
        ]
        c = inv.check_convergence(recs, "200", heal_t=1000, bound_ms=5000)
        self.assertEqual(c.violations, [])
        self.assertEqual(c.per_client_ms, {"a": 600.0, "b": 3000.0})
        self.assertEqual(c.slowest_ms, 3000.0)

    def test_too_slow_and_never(self):
        recs = [resp("a", 1000, "cds", 100), resp("a", 9000, "cds", 200), resp("a", 1000, "eds", 100)]
        c = inv.check_convergence(recs, "200", heal_t=1000, bound_ms=5000)
        msgs = sorted(v.message for v in c.violations)
        self.assertEqual(len(msgs), 2)
        self.assertIn("eds: never received version >= 200", msgs)
        self.assertTrue(any("8.0s after healing" in m for m in msgs))
        self.assertNotIn("a", c.per_client_ms)

    def test_expected_client_without_records(self):
        c = inv.check_convergence([resp("a", 1, "cds", 5)], "5", heal_t=0, bound_ms=1000, nodes=["a", "ghost"])
        self.assertEqual([(v.node, v.message) for v in c.violations], [("ghost", "no responses at all")])

    def test_received_before_heal_counts_as_zero(self):
        c = inv.check_convergence([resp("a", 500, "cds", 300)], "200", heal_t=1000, bound_ms=10)
        self.assertEqual((c.violations, c.slowest_ms), ([], 0.0))

    def test_bad_target(self):
        c = inv.check_convergence([], "vX", heal_t=0, bound_ms=1)
        self.assertEqual(len(c.violations), 1)

    def test_helper_done_pending(self):
        recs = [resp("a", 1, "cds", 5), resp("a", 1, "eds", 5), resp("b", 1, "cds", 5), resp("b", 1, "eds", 4)]
        done, pending = inv.clients_with_version_at_least(recs, "5", nodes=["a", "b", "c"])
        self.assertEqual((done, pending), ({"a"}, {"b", "c"}))


class OriginStreamsTest(unittest.TestCase):
    def test_equal(self):
        self.assertEqual(inv.check_origin_streams({"streams_open": 4}, ["k1", "k2", "k3", "k4", "k1"]), [])

    def test_more_streams_than_keys(self):
        v = inv.check_origin_streams({"streams_open": 5, "open_by_type": {"cds": 2}}, ["k1", "k2", "k3", "k4"])
        self.assertEqual(len(v), 1)
        self.assertIn("5 open streams for 4 active keys", v[0].message)

    def test_independent_relays(self):
        self.assertEqual(inv.check_origin_streams({"streams_open": 12}, ["a", "b", "c", "d"], per_key_streams=3), [])

    def test_missing_field(self):
        self.assertEqual(len(inv.check_origin_streams({}, ["a"])), 1)


class ActiveTest(unittest.TestCase):
    def test_clients_active(self):
        recs = [resp("a", 1, "cds", 1), resp("a", 2, "cds", 2), conn("b", 1)]
        v = inv.check_clients_active(recs, ["a", "b"], min_responses=2)
        self.assertEqual([x.node for x in v], ["b"])

    def test_versions_seen_and_newest(self):
        recs = [resp("a", 1, "cds", 9), resp("b", 1, "cds", 10), conn("c", 1)]
        self.assertEqual(inv.versions_seen(recs), {"9", "10"})
        self.assertEqual(inv.newest_version(recs), 10)



def ev(node, t, event, **kw):
    return Record(t=t, node=node, event=event, **kw)


class GrpcRecordTest(unittest.TestCase):
    """The events the grpcio clients add (nack, does_not_exist, resource_error, rpc_ok,
    rpc_error) and the checks on them."""

    def test_parse_status_and_rpc_events(self):
        lines = [
            json.dumps({"t": 1, "node": "g-r1-0", "event": "nack", "type": "cds", "name": "cluster_0", "version": "9",
                        "accepted": "8", "message": "bad lb_policy"}),
            json.dumps({"t": 2, "node": "g-r1-0", "event": "does_not_exist", "type": "rds", "name": "route_0", "status": "DOES_NOT_EXIST"}),
            json.dumps({"t": 3, "node": "g-r1-0", "event": "rpc_error", "code": "UNAVAILABLE", "message": "no children"}),
            json.dumps({"t": 4, "node": "g-r1-0", "event": "rpc_ok", "backend": "backend-a", "failed_before": 2}),
            json.dumps({"t": 5, "node": "g-r1-0", "event": "disconnect", "stream": 1, "code": "UNAVAILABLE", "message": "relay draining"}),
        ]
        (nack, dne, err, ok, disc_), bad = inv.parse_lines(lines)
        self.assertEqual(bad, 0)
        self.assertEqual((nack.event, nack.type, nack.name, nack.version, nack.detail), ("nack", "cds", "cluster_0", "9", "bad lb_policy"))
        self.assertEqual((dne.event, dne.name, dne.detail), ("does_not_exist", "route_0", "DOES_NOT_EXIST"))
        self.assertEqual((err.event, err.detail), ("rpc_error", "UNAVAILABLE: no children"))
        self.assertEqual(ok.event, "rpc_ok")
        self.assertEqual(disc_.detail, "UNAVAILABLE: relay draining")
        # Status and RPC events are not responses: they take no part in monotonic/convergence.
        self.assertEqual(inv.check_monotonic([resp("g-r1-0", 0, "cds", 10), nack]), [])

    def test_client_status(self):
        recs = [resp("a", 0, "cds", 1),
                ev("a", 1, "nack", type="cds", name="cluster_0", version="2", detail="bad"),
                ev("b", 2, "does_not_exist", type="rds", name="route_0"),
                ev("c", 3, "resource_error", type="eds", name="cluster_0", detail="RECEIVED_ERROR")]
        vs = inv.check_client_status(recs)
        self.assertEqual([(v.invariant, v.node) for v in vs], [("nack", "a"), ("does-not-exist", "b"), ("resource-error", "c")])
        self.assertIn("NACKed cds cluster_0 version 2 (bad)", str(vs[0]))
        self.assertEqual(inv.check_client_status(recs, nodes=["b"])[0].node, "b")
        self.assertEqual(inv.check_client_status([resp("a", 0, "cds", 1)]), [])

    def test_rpcs(self):
        recs = [ev("a", 1, "rpc_ok"), ev("a", 5, "rpc_error", detail="UNAVAILABLE"), ev("a", 6, "rpc_error", detail="UNAVAILABLE"),
                ev("b", 1, "rpc_ok"), ev("b", 5, "rpc_error", detail="DEADLINE_EXCEEDED"),
                ev("c", 1, "connect")]
        allowed = {"b": [(4, 6)]}
        vs = inv.check_rpcs(recs, ["a", "b", "c"], allowed)
        self.assertEqual([(v.invariant, v.node) for v in vs], [("rpc", "a"), ("rpc", "c")])
        self.assertIn("RPC failed: UNAVAILABLE (and 1 more", str(vs[0]))
        self.assertIn("no successful RPC", str(vs[1]))
        self.assertEqual(inv.rpc_errors_in_windows(recs, ["a", "b", "c"], allowed), 1)

    def test_version_at_least_for_chosen_types(self):
        # A delta client: CDS arrived once (unchanged since), EDS moves.
        recs = [resp("d", 0, "cds", 100), resp("d", 0, "eds", 100), resp("d", 10, "eds", 200)]
        self.assertEqual(inv.clients_with_version_at_least(recs, "200", ["d"]), (set(), {"d"}))
        self.assertEqual(inv.clients_with_version_at_least(recs, "200", ["d"], types=["eds"]), ({"d"}, set()))
        conv = inv.check_convergence(recs, "200", 5, 10_000, ["d"], types=["eds"])
        self.assertEqual((conv.violations, conv.slowest_ms), ([], 5))


if __name__ == "__main__":
    unittest.main()

"""The grpcio client program's pure parts (clients/grpc_xds_client.py), without grpcio: CSDS
snapshots -> record events, C-core trace lines -> connect/disconnect, the bootstrap, and that
its events parse as chaos records."""

from __future__ import annotations

import importlib.util
import json
import unittest
from pathlib import Path

from chaos import invariants as inv

_PATH = Path(__file__).resolve().parents[1] / "clients/grpc_xds_client.py"
_spec = importlib.util.spec_from_file_location("grpc_xds_client", _PATH)
g = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(g)

LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"


def entry(type_url, name, version, status="ACKED", **kw):
    return {"type_url": type_url, "name": name, "version": version, "status": status, **kw}


class CsdsViewTest(unittest.TestCase):
    def test_responses_on_version_change_only(self):
        v = g.CsdsView()
        self.assertEqual(v.update([entry(LDS, "example-service", "", status="REQUESTED")]), [])
        self.assertEqual(v.update([entry(LDS, "example-service", "100")]),
                         [{"event": "response", "type": "lds", "version": "100", "resources": 1}])
        self.assertEqual(v.update([entry(LDS, "example-service", "100")]), [])
        out = v.update([entry(LDS, "example-service", "200"), entry(CDS, "cluster_0", "200")])
        self.assertEqual([(e["type"], e["version"]) for e in out], [("cds", "200"), ("lds", "200")])

    def test_version_is_the_newest_held_as_integer(self):
        v = g.CsdsView()
        out = v.update([entry(EDS, "a", "99"), entry(EDS, "b", "100"), entry(EDS, "c", "", status="REQUESTED")])
        self.assertEqual(out, [{"event": "response", "type": "eds", "version": "100", "resources": 2}])
        # A resource count change at the same version is recorded too.
        out = v.update([entry(EDS, "a", "100")])
        self.assertEqual(out, [{"event": "response", "type": "eds", "version": "100", "resources": 1}])

    def test_nack_recorded_once_per_rejected_version(self):
        v = g.CsdsView()
        v.update([entry(CDS, "cluster_0", "100")])
        nacked = entry(CDS, "cluster_0", "100", status="NACKED", error_version="200", error_details="bad lb_policy")
        out = v.update([nacked])
        self.assertEqual(out, [{"event": "nack", "type": "cds", "name": "cluster_0", "version": "200", "accepted": "100",
                                "message": "bad lb_policy"}])
        self.assertEqual(v.update([nacked]), [])  # still the same NACK
        again = dict(nacked, error_version="300")
        self.assertEqual([e["version"] for e in v.update([again])], ["300"])
        self.assertEqual(v.update([entry(CDS, "cluster_0", "400")])[0]["event"], "response")
        self.assertEqual([e["event"] for e in v.update([dict(nacked, version="400")])], ["nack"])  # NACKed again after recovering

    def test_does_not_exist_and_other_errors(self):
        v = g.CsdsView()
        out = v.update([entry(CDS, "cluster_0", "", status="DOES_NOT_EXIST"), entry(EDS, "cluster_0", "", status="RECEIVED_ERROR")])
        self.assertEqual([(e["event"], e["type"], e["status"]) for e in out],
                         [("does_not_exist", "cds", "DOES_NOT_EXIST"), ("resource_error", "eds", "RECEIVED_ERROR")])
        self.assertEqual(v.update([entry(CDS, "cluster_0", "", status="DOES_NOT_EXIST")]), [])

    def test_events_parse_as_chaos_records(self):
        v = g.CsdsView()
        events = v.update([entry(CDS, "cluster_0", "100")]) + v.update(
            [entry(CDS, "cluster_0", "100", status="NACKED", error_version="200", error_details="x")])
        lines = [json.dumps({"t": 1000 + i, "node": "g-r1-0", **e}) for i, e in enumerate(events)]
        recs, bad = inv.parse_lines(lines)
        self.assertEqual(bad, 0)
        self.assertEqual([(r.event, r.type, r.version) for r in recs], [("response", "cds", "100"), ("nack", "cds", "200")])
        self.assertEqual([x.invariant for x in inv.check_client_status(recs)], ["nack"])


class TraceTest(unittest.TestCase):
    START = ("I1202 03:43:02.775004      18 xds_client.cc:737] [xds_client 0x7ff5f0002c60] xds server relay-1:9991: "
             "starting ADS call (ads_call: 0x7ff5fc00d1e0, streaming_call: 0x7ff5fc00dc50)\n")
    STATUS = ("I1202 03:43:01.841369      17 xds_client.cc:1397] [xds_client 0x7ff5f0002c60] xds server relay-1:9991: "
              "ADS call status received (xds_channel=0x7ff5f00ac780, ads_call=0x7ff5f00955a0, streaming_call=0x7ff5f01a4350): "
              "UNAVAILABLE: the relay is shutting down; reconnect\n")

    def test_stream_lifecycle(self):
        f = g.TraceFollower()
        self.assertIsNone(f.line(self.STATUS), "no stream yet")
        self.assertEqual(f.line(self.START), {"event": "connect", "stream": 1})
        self.assertEqual(f.line("I1202 ... sending ADS request: type=envoy.config.listener.v3.Listener version= nonce=\n"), None)
        self.assertEqual(f.line(self.STATUS), {"event": "disconnect", "stream": 1, "code": "UNAVAILABLE",
                                               "message": "the relay is shutting down; reconnect"})
        self.assertEqual(f.line(self.START), {"event": "connect", "stream": 2})

    def test_status_without_message(self):
        f = g.TraceFollower()
        f.line(self.START)
        line = self.STATUS.replace("UNAVAILABLE: the relay is shutting down; reconnect", "OK")
        self.assertEqual(f.line(line), {"event": "disconnect", "stream": 1, "code": "OK"})

    def test_what_is_passed_on(self):
        self.assertTrue(g.passes_on("E1202 03:43:01.8 17 chttp2_transport.cc:1] boom\n"))
        self.assertTrue(g.passes_on("W1202 03:43:01.8 17 log.cc:102] Log level INFO\n"))
        self.assertTrue(g.passes_on("grpc_xds_client g-r1-0: CSDS: error\n"))
        self.assertFalse(g.passes_on(self.START))
        self.assertFalse(g.passes_on("  typed_per_filter_config={\n"))
        self.assertFalse(g.passes_on("Each line\n"))


class BootstrapTest(unittest.TestCase):
    def test_bootstrap(self):
        b = json.loads(g.bootstrap("lb:9991", "g-lb-2", "grpc-2"))
        self.assertEqual(b["xds_servers"][0]["server_uri"], "lb:9991")
        self.assertEqual(b["xds_servers"][0]["channel_creds"], [{"type": "insecure"}])
        self.assertEqual((b["node"]["id"], b["node"]["cluster"]), ("g-lb-2", "grpc-2"))

    def test_tls_bootstrap(self):
        creds = g.channel_creds("/tls/ca.pem", "/tls/client.pem", "/tls/client.key")
        b = json.loads(g.bootstrap("relay-1:9991", "g-r1-0", "grpc-0", creds))
        self.assertEqual(b["xds_servers"][0]["channel_creds"], [{"type": "tls", "config": {
            "ca_certificate_file": "/tls/ca.pem", "certificate_file": "/tls/client.pem", "private_key_file": "/tls/client.key"}}])
        # Server authentication only, without a client certificate; no CA: insecure.
        self.assertEqual(g.channel_creds("/tls/ca.pem"), [{"type": "tls", "config": {"ca_certificate_file": "/tls/ca.pem"}}])
        self.assertEqual(g.channel_creds(), [{"type": "insecure"}])
        a = g.parse_args(["--server", "lb:9991", "--record-template", "/r/x-{i}.jsonl", "--tls-ca", "/tls/ca.pem",
                          "--tls-cert", "/tls/client.pem", "--tls-key", "/tls/client.key"])
        self.assertEqual((a.tls_ca, a.tls_cert, a.tls_key), ("/tls/ca.pem", "/tls/client.pem", "/tls/client.key"))

    def test_args(self):
        a = g.parse_args(["--server", "relay-1:9991", "--processes", "3", "--record-template", "/records/x-{i}.jsonl"])
        self.assertEqual((a.server, a.processes, a.target, a.poll_interval, a.child, a.no_trace),
                         ("relay-1:9991", 3, "example-service", 0.2, None, False))


if __name__ == "__main__":
    unittest.main()

#!/usr/bin/env python3
"""Recording grpcio xDS clients for the chaos tests (image xds-relay-grpc-client).

    grpc_xds_client.py --server relay-1:9991 --processes 3 \\
        --node-id-template 'g-r1-{i}' --cluster-template 'grpc-{i}' \\
        --record-template '/records/grpc-r1-{i}.jsonl'

grpcio shares one XdsClient per process (per data-plane target), so every simulated client is
its own child process with its own bootstrap (GRPC_XDS_BOOTSTRAP_CONFIG: `server_uri` the
relay or the LB, node id and node cluster from the templates). Each child opens
`xds:///<target>` (the example origin answers any LDS name that is not one of its own
listeners with an API listener -> route_0 -> cluster_0) and:

- follows its ADS stream through C-core's own trace (GRPC_TRACE=xds_client on the child's
  stderr, read back through a pipe; other INFO lines are dropped, warnings and errors are
  passed on) and appends, in the chaos tests' JSONL record format (chaos-tests/README.md,
  "Record format"):
    connect          an ADS call started ("starting ADS call"; stream 1, 2, ...)
    disconnect       an ADS call ended ("ADS call status received"; code, message)
  (with --no-trace: one connect when the channel is created, no disconnects);
- polls its own CSDS view (`cygrpc.dump_xds_configs()`) every --poll-interval and appends
    response         when a type's version (or its resource count) changes: type cds/eds/
                     lds/rds, version (the resources' version_info), resources (how many the
                     client holds, ACKED or NACKED)
    nack             a resource turned NACKED (or its rejected version changed): version =
                     the rejected version, accepted = the version still in use, message
    does_not_exist   a resource the client subscribes to turned DOES_NOT_EXIST
    resource_error   any other error status (e.g. RECEIVED_ERROR)
- calls /hello.Greeter/SayHello every --rpc-interval (deadline --rpc-timeout) and appends
    rpc_ok           the first success (failed_before: failures until then), the first success
                     after failures, and whenever another backend answers (backend)
    rpc_error        every failure after the first success (code, message)

The parent only starts the children and forwards SIGTERM/SIGINT to them; it exits when every
child has exited. Children end with os._exit: gRPC threads would otherwise keep a process
alive. The CSDS-diff logic (`CsdsView`) is pure and unit-tested on the host without grpcio
(chaos-tests/tests/test_grpc_client.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

METHOD = "/hello.Greeter/SayHello"

# C-core's xds_client trace lines for the ADS call's lifecycle (src/core/xds/xds_client/
# xds_client.cc, grpcio 1.85): "... xds server HOST:PORT: starting ADS call (ads_call: ...)"
# and "... xds server HOST:PORT: ADS call status received (xds_channel=..., ...): CODE: msg".
TRACE_START = "starting ADS call"
TRACE_STATUS = re.compile(r"ADS call status received \([^)]*\):\s*(?P<code>[A-Z_]+)(?::\s*(?P<message>.*))?$")

TYPE_NAMES = {
    "type.googleapis.com/envoy.config.listener.v3.Listener": "lds",
    "type.googleapis.com/envoy.config.route.v3.RouteConfiguration": "rds",
    "type.googleapis.com/envoy.config.cluster.v3.Cluster": "cds",
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment": "eds",
}
# Statuses in which the client holds a resource (the version it uses is version_info).
HOLDING = ("ACKED", "NACKED")
# Statuses that are not errors.
BENIGN = ("ACKED", "REQUESTED", "UNKNOWN", "NACKED")


def short_type(type_url: str) -> str:
    return TYPE_NAMES.get(type_url, type_url)


def _version_key(v: str):
    try:
        return (1, int(v), v)
    except ValueError:
        return (0, 0, v)


class CsdsView:
    """Turns successive CSDS snapshots into record events.

    An entry is a dict with type_url, name, version (version_info), status (the
    ClientResourceStatus name) and, for NACKED resources, error_version and error_details.
    """

    def __init__(self) -> None:
        self.types: dict[str, tuple[str, int]] = {}  # type -> (version, resources) last recorded
        self.status: dict[tuple[str, str], tuple] = {}  # (type, name) -> last recorded error state

    def update(self, entries: list[dict]) -> list[dict]:
        events: list[dict] = []
        by_type: dict[str, list[dict]] = {}
        for e in entries:
            typ = short_type(e.get("type_url", ""))
            by_type.setdefault(typ, []).append(e)
            key = (typ, e.get("name", ""))
            status = e.get("status", "UNKNOWN")
            if status == "NACKED":
                state = ("NACKED", e.get("error_version", ""), e.get("error_details", ""))
                if self.status.get(key) != state:
                    events.append({"event": "nack", "type": typ, "name": key[1], "version": state[1],
                                   "accepted": e.get("version", ""), "message": state[2]})
            elif status not in BENIGN:
                state = (status,)
                if self.status.get(key) != state:
                    ev = "does_not_exist" if status == "DOES_NOT_EXIST" else "resource_error"
                    events.append({"event": ev, "type": typ, "name": key[1], "status": status,
                                   "message": e.get("error_details", "")})
            else:
                state = None
            if state is None:
                self.status.pop(key, None)
            else:
                self.status[key] = state
        for typ in sorted(by_type):
            held = [e for e in by_type[typ] if e.get("status") in HOLDING and e.get("version")]
            if not held:
                continue
            version = max((e["version"] for e in held), key=_version_key)
            now = (version, len(held))
            if self.types.get(typ) != now:
                self.types[typ] = now
                events.append({"event": "response", "type": typ, "version": version, "resources": len(held)})
        return events


class TraceFollower:
    """Turns C-core trace lines into connect/disconnect events (pure: unit-tested)."""

    def __init__(self) -> None:
        self.stream = 0

    def line(self, text: str) -> dict | None:
        if TRACE_START in text and "xds server" in text:
            self.stream += 1
            return {"event": "connect", "stream": self.stream}
        m = TRACE_STATUS.search(text.rstrip())
        if m and self.stream:
            ev = {"event": "disconnect", "stream": self.stream, "code": m.group("code")}
            if m.group("message"):
                ev["message"] = m.group("message")[:300]
            return ev
        return None


def passes_on(text: str) -> bool:
    """Whether a child's stderr line is shown: C-core warnings/errors and our own lines,
    not the trace (INFO) or its multi-line resource dumps."""
    return text[:1] in ("W", "E", "F") and text[1:2].isdigit() or text.startswith(("grpc_xds_client", "Traceback"))


def follow_stderr(rec: "Recorder") -> None:
    """Points fd 2 at a pipe and reads it back: trace lines become records, warnings and
    errors go on to the original stderr."""
    original = os.fdopen(os.dup(2), "w", buffering=1)
    r, w = os.pipe()
    os.dup2(w, 2)
    os.close(w)
    sys.stderr = original
    follower = TraceFollower()

    def pump() -> None:
        # Must never stop reading: C-core would block on a full pipe.
        with os.fdopen(r, "r", errors="replace") as f:
            for text in f:
                try:
                    ev = follower.line(text)
                    if ev is not None:
                        rec.write(ev)
                    if passes_on(text):
                        original.write(text)
                except Exception:  # noqa: BLE001
                    pass

    threading.Thread(target=pump, daemon=True).start()


def csds_entries() -> list[dict]:
    """The process's CSDS view: one dict per resource (see CsdsView)."""
    from envoy.admin.v3 import config_dump_shared_pb2
    from envoy.service.status.v3 import csds_pb2
    from grpc._cython import cygrpc

    status_name = config_dump_shared_pb2.ClientResourceStatus.Name
    response = csds_pb2.ClientStatusResponse.FromString(cygrpc.dump_xds_configs())
    out = []
    for config in response.config:
        for g in config.generic_xds_configs:
            e = {"type_url": g.type_url, "name": g.name, "version": g.version_info, "status": status_name(g.client_status)}
            if g.HasField("error_state"):
                e["error_version"] = g.error_state.version_info
                e["error_details"] = g.error_state.details
            out.append(e)
    return out


class Recorder:
    """Appends JSON lines (flushed at once) for one client node."""

    def __init__(self, path: str, node: str) -> None:
        self.node = node
        self.lock = threading.Lock()
        self.f = open(path, "a", buffering=1)

    def write(self, event: dict) -> None:
        line = json.dumps({"t": round(time.time() * 1000.0, 1), "node": self.node, **event})
        with self.lock:
            self.f.write(line + "\n")
            self.f.flush()


def channel_creds(ca: str | None = None, cert: str | None = None, key: str | None = None) -> list[dict]:
    """The bootstrap's channel_creds: `tls` (gRFC A65) when a CA is given, with the client
    certificate for mTLS when given; `insecure` otherwise."""
    if not ca:
        return [{"type": "insecure"}]
    config = {"ca_certificate_file": ca}
    if cert and key:
        config.update(certificate_file=cert, private_key_file=key)
    return [{"type": "tls", "config": config}]


def bootstrap(server: str, node: str, cluster: str, creds: list[dict] | None = None) -> str:
    return json.dumps({
        "xds_servers": [{"server_uri": server, "channel_creds": creds or channel_creds(), "server_features": ["xds_v3"]}],
        "node": {"id": node, "cluster": cluster, "locality": {"zone": "chaos"}},
    })


def rpc_loop(channel, rec: Recorder, interval: float, timeout: float, stop: threading.Event) -> None:
    import grpc

    call = channel.unary_unary(METHOD)
    succeeded = False
    failing = False
    failed_before = 0
    backend = None
    while not stop.is_set():
        try:
            got = call(b"hello", timeout=timeout).decode(errors="replace")
            if not succeeded:
                rec.write({"event": "rpc_ok", "backend": got, "failed_before": failed_before})
            elif failing or got != backend:
                rec.write({"event": "rpc_ok", "backend": got, **({"after_errors": True} if failing else {})})
            succeeded, failing, backend = True, False, got
        except grpc.RpcError as e:
            if succeeded:
                failing = True
                rec.write({"event": "rpc_error", "code": e.code().name if e.code() else "UNKNOWN",
                           "message": (e.details() or "")[:300]})
            else:
                failed_before += 1
        except Exception as e:  # noqa: BLE001 - keep calling; report
            rec.write({"event": "rpc_error", "code": "CLIENT", "message": repr(e)[:300]})
        stop.wait(interval)


def run_child(args, i: int) -> None:
    node = args.node_id_template.replace("{i}", str(i))
    rec = Recorder(args.record_template.replace("{i}", str(i)), node)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        if not args.no_trace:
            follow_stderr(rec)
        import grpc

        channel = grpc.insecure_channel(f"xds:///{args.target}")
        if args.no_trace:
            rec.write({"event": "connect", "stream": 1})
        threading.Thread(target=rpc_loop, args=(channel, rec, args.rpc_interval, args.rpc_timeout, stop), daemon=True).start()
        view = CsdsView()
        deadline = time.monotonic() + args.duration if args.duration > 0 else None
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            try:
                for ev in view.update(csds_entries()):
                    rec.write(ev)
            except Exception as e:  # noqa: BLE001 - a CSDS hiccup must not end the client
                print(f"grpc_xds_client {node}: CSDS: {e!r}", file=sys.stderr, flush=True)
            stop.wait(args.poll_interval)
    except BaseException as e:  # noqa: BLE001 - report and exit: never hang
        print(f"grpc_xds_client {node}: {e!r}", file=sys.stderr, flush=True)
        rec.f.flush()
        os._exit(1)
    rec.f.flush()
    os._exit(0)


def run_parent(args, argv: list[str]) -> int:
    children = []
    for i in range(args.processes):
        node = args.node_id_template.replace("{i}", str(i))
        cluster = args.cluster_template.replace("{i}", str(i))
        env = dict(os.environ, GRPC_XDS_BOOTSTRAP_CONFIG=bootstrap(
            args.server, node, cluster, channel_creds(args.tls_ca, args.tls_cert, args.tls_key)))
        env.pop("GRPC_XDS_BOOTSTRAP", None)
        if args.no_trace:
            env.setdefault("GRPC_VERBOSITY", "ERROR")
        else:
            env["GRPC_VERBOSITY"] = "INFO"
            env["GRPC_TRACE"] = ",".join(x for x in [env.get("GRPC_TRACE", ""), "xds_client"] if x)
        children.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", str(i), *argv], env=env))
    print(f"grpc_xds_client: {len(children)} clients of xds:///{args.target} via {args.server}", file=sys.stderr, flush=True)

    def forward(signum, _frame):
        for c in children:
            if c.poll() is None:
                c.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    worst = 0
    for i, c in enumerate(children):
        while True:
            try:
                code = c.wait()
                break
            except InterruptedError:
                continue
        if code:
            print(f"grpc_xds_client: child {i} exited with {code}", file=sys.stderr, flush=True)
            worst = worst or 1
    return worst


def parse_args(argv: list[str]):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module docstring (record events) and chaos-tests/README.md.")
    ap.add_argument("--server", required=True, help="xDS server HOST:PORT (a relay or the LB)")
    ap.add_argument("--tls-ca", help="PEM CA: talk to the xDS server over TLS (bootstrap channel_creds tls)")
    ap.add_argument("--tls-cert", help="PEM client certificate for mTLS (with --tls-key)")
    ap.add_argument("--tls-key", help="PEM private key of --tls-cert")
    ap.add_argument("--processes", type=int, default=1, help="clients, one process (and XdsClient) each")
    ap.add_argument("--target", default="example-service", help="opens xds:///TARGET")
    ap.add_argument("--node-id-template", default="grpc-{i}", help="node.id of client i")
    ap.add_argument("--cluster-template", default="grpc-{i}", help="node.cluster of client i")
    ap.add_argument("--record-template", required=True, help="JSONL record file of client i")
    ap.add_argument("--poll-interval", type=float, default=0.2, help="seconds between CSDS polls")
    ap.add_argument("--rpc-interval", type=float, default=0.2, help="seconds between RPCs")
    ap.add_argument("--rpc-timeout", type=float, default=2.0, help="RPC deadline, seconds")
    ap.add_argument("--duration", type=float, default=0, help="seconds to run (0: until SIGTERM)")
    ap.add_argument("--no-trace", action="store_true", help="do not follow the ADS stream through C-core's trace")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child is not None:
        run_child(args, args.child)
        return 0  # not reached
    return run_parent(args, argv)


if __name__ == "__main__":
    sys.exit(main())

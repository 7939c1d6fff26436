"""Invariant checks over client records and origin statistics (pure functions, stdlib only).

Client records are the JSON lines `xds-loadgen --record PATH` writes, one object per line (see
chaos-tests/README.md, "Record format"). The canonical fields:

    {"t": 1732250000123.4, "node": "r1-7", "event": "response", "type": "cds",
     "version": "1732250000100", "resources": 3, "stream": 1}
    {"t": ..., "node": "r1-7", "event": "connect", "stream": 2}
    {"t": ..., "node": "r1-7", "event": "disconnect", "stream": 1, "code": "UNAVAILABLE", "message": "..."}

`t` is the receipt (or event) time in unix milliseconds; `node` identifies the client (its
node id; `client`, the index within one loadgen process, is used when `node` is absent,
prefixed with the file name). A few aliases are accepted (see `normalize`).

Checked (each check returns a list of `Violation`):

- `check_monotonic`: per client and type, no version lower than one received before, across
  reconnects and relays. Versions are compared as integers (the example origin's versions are
  unix milliseconds); a version that is not an integer is itself a violation.
- `check_nonempty`: no LDS or CDS response with zero resources.
- `check_no_disconnects`: the given clients have no disconnect and no re-connect outside the
  windows in which their relay was disturbed.
- `check_convergence`: after healing, every client receives a version >= the target version
  for every type it subscribes to, within a bound; returns the slowest time as well.
- `check_origin_streams`: in steady state the origin's open streams equal the active keys.
- `check_clients_active`: every expected client produced responses (guards against a client
  that never connected, which would pass every other check vacuously).
- `check_client_status`: no client reports a NACK (`nack`), a resource it subscribes to as
  not existing (`does_not_exist`) or another resource error (`resource_error`); the grpcio
  clients record these from their CSDS view.
- `check_rpcs`: every grpcio client had a successful RPC, and no RPC failed after that outside
  the windows in which its relay was disturbed (the same windows as `check_no_disconnects`).
- `check_origin`: every response comes from the real origin, by its marks: a version of
  digits only (unix milliseconds; the rogue node's origin publishes "v<n>"), and, for the
  clients given, a CDS response holding exactly the real origin's number of clusters.

And on a relay's Prometheus text (`/metrics`): `gossip_rejections` sums `gossip_rejected_total`
over its labels (the datagrams the relay's gossip layer refused).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

# Short type names used in records; type URLs are mapped to them.
TYPE_URLS = {
    "type.googleapis.com/envoy.config.cluster.v3.Cluster": "cds",
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment": "eds",
    "type.googleapis.com/envoy.config.listener.v3.Listener": "lds",
    "type.googleapis.com/envoy.config.route.v3.RouteConfiguration": "rds",
}
FULL_STATE_TYPES = frozenset({"cds", "lds"})

_ALIASES = {
    "t": ("t", "ts", "ts_ms", "time_ms", "unix_ms", "received_unix_ms", "at_ms"),
    "event": ("event", "kind", "ev"),
    "type": ("type", "type_url", "xds_type"),
    "version": ("version", "version_info"),
    "resources": ("resources", "resource_count", "num_resources", "count"),
    "node": ("node", "node_id", "client_id"),
    "stream": ("stream", "stream_id", "attempt"),
}


@dataclass(frozen=True)
class Record:
    """One normalized client record."""

    t: float  # unix milliseconds
    node: str
    event: str  # response | connect | disconnect | other
    type: str | None = None
    version: str | None = None
    resources: int | None = None
    stream: int | None = None
    detail: str | None = None  # "CODE: message" of a disconnect, NACK or RPC error
    seq: int = 0  # position in its file: ties on t keep file order
    name: str | None = None  # the resource of a nack / does_not_exist / resource_error


@dataclass(frozen=True)
class Violation:
    invariant: str
    node: str | None
    message: str
    t: float | None = None

    def __str__(self) -> str:
        who = f"{self.node}: " if self.node else ""
        return f"[{self.invariant}] {who}{self.message}"


@dataclass
class Convergence:
    """Result of `check_convergence`."""

    violations: list[Violation] = field(default_factory=list)
    slowest_ms: float | None = None  # max over clients and types of (first receipt >= target) - heal
    per_client_ms: dict[str, float] = field(default_factory=dict)


def _get(obj: Mapping, name: str):
    for key in _ALIASES.get(name, (name,)):
        if key in obj and obj[key] is not None:
            return obj[key]
    return None


def normalize(obj: Mapping, source: str = "", seq: int = 0) -> Record | None:
    """Turns one decoded JSON line into a `Record`; None when it is not a client event."""
    t = _get(obj, "t")
    if t is None:
        # Seconds or nanoseconds variants.
        if obj.get("t_s") is not None:
            t = float(obj["t_s"]) * 1000.0
        elif obj.get("t_ns") is not None:
            t = float(obj["t_ns"]) / 1e6
        else:
            return None
    node = _get(obj, "node")
    if node is None:
        client = obj.get("client")
        if client is None:
            return None
        node = f"{source}#{client}" if source else str(client)
    event = str(_get(obj, "event") or ("response" if _get(obj, "version") is not None else "other")).lower()
    event = {"recv": "response", "receive": "response", "received": "response", "open": "connect",
             "opened": "connect", "reconnect": "connect", "close": "disconnect", "closed": "disconnect",
             "error": "disconnect", "end": "disconnect"}.get(event, event)
    typ = _get(obj, "type")
    if typ is not None:
        typ = TYPE_URLS.get(str(typ), str(typ).lower())
    version = _get(obj, "version")
    resources = _get(obj, "resources")
    if isinstance(resources, list):
        resources = len(resources)
    stream = _get(obj, "stream")
    parts = [str(obj[k]) for k in ("code", "status", "message", "error") if obj.get(k) not in (None, "")]
    detail = ": ".join(parts) if parts else None
    name = obj.get("name")
    return Record(
        t=float(t),
        node=str(node),
        event=event,
        type=typ,
        version=None if version is None else str(version),
        resources=None if resources is None else int(resources),
        stream=None if stream is None else int(stream),
        detail=detail,
        seq=seq,
        name=None if name is None else str(name),
    )


def parse_lines(lines: Iterable[str], source: str = "") -> tuple[list[Record], int]:
    """Parses JSON lines; returns the records and the number of lines that did not parse
    (a partially written last line is expected while a client is running)."""
    out: list[Record] = []
    bad = 0
    for i, line in enumerate(lines):
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if not isinstance(obj, dict):
            bad += 1
            continue
        rec = normalize(obj, source, i)
        if rec is not None:
            out.append(rec)
    return out, bad


def load_records(paths: Iterable[Path]) -> tuple[list[Record], int]:
    records: list[Record] = []
    bad = 0
    for p in paths:
        try:
            text = Path(p).read_text(errors="replace")
        except FileNotFoundError:
            continue
        r, b = parse_lines(text.splitlines(), Path(p).stem)
        records.extend(r)
        bad += b
    return records, bad


def by_node(records: Iterable[Record]) -> dict[str, list[Record]]:
    out: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        out[r.node].append(r)
    for rs in out.values():
        rs.sort(key=lambda r: (r.t, r.seq))
    return out


def version_int(v: str | None) -> int | None:
    if v is None:
        return None
    try:
        return int(v.strip())
    except ValueError:
        return None


def responses(records: Iterable[Record]) -> list[Record]:
    return [r for r in records if r.event == "response"]


# --- invariants -----------------------------------------------------------------------------


def check_monotonic(records: Iterable[Record]) -> list[Violation]:
    """No client receives an older version of a type after a newer one."""
    out: list[Violation] = []
    for node, rs in by_node(records).items():
        newest: dict[str, tuple[int, str]] = {}
        for r in rs:
            if r.event != "response" or r.type is None:
                continue
            v = version_int(r.version)
            if v is None:
                out.append(Violation("monotonic", node, f"{r.type}: version {r.version!r} is not an integer", r.t))
                continue
            prev = newest.get(r.type)
            if prev is not None and v < prev[0]:
                out.append(
                    Violation("monotonic", node, f"{r.type}: received version {r.version} after {prev[1]}", r.t)
                )
            if prev is None or v > prev[0]:
                newest[r.type] = (v, r.version or "")
    return out


def check_nonempty(records: Iterable[Record], types: Iterable[str] = FULL_STATE_TYPES) -> list[Violation]:
    """No LDS/CDS response is empty (the origin always has listeners and clusters)."""
    types = frozenset(types)
    out = []
    for r in records:
        if r.event == "response" and r.type in types:
            if r.resources is None:
                out.append(Violation("nonempty", r.node, f"{r.type} {r.version}: record has no resource count", r.t))
            elif r.resources == 0:
                out.append(Violation("nonempty", r.node, f"{r.type} {r.version}: empty response", r.t))
    return out


def check_origin(records: Iterable[Record], cds_clients: Iterable[str] = (), cds_resources: int | None = None) -> list[Violation]:
    """Every response carries the real origin's marks: its version is digits only (the example
    origin stamps unix milliseconds; the rogue origin, started with --random-versions,
    publishes "v<n>"); and for `cds_clients` (wildcard CDS subscribers) a CDS response holds
    exactly `cds_resources` clusters (the rogue origin serves another number; an empty
    response is `check_nonempty`'s). One violation per client (the first offending response)."""
    cds_clients = frozenset(cds_clients)
    out: dict[str, Violation] = {}
    for r in records:
        if r.event != "response" or r.node in out:
            continue
        if r.version is None or not r.version.isdigit():
            out[r.node] = Violation("origin", r.node, f"{r.type} version {r.version!r} is not the real origin's (unix ms)", r.t)
        elif cds_resources is not None and r.node in cds_clients and r.type == "cds" and r.resources \
                and r.resources != cds_resources:
            out[r.node] = Violation("origin", r.node, f"cds {r.version}: {r.resources} clusters, the real origin has {cds_resources}", r.t)
    return list(out.values())


def gossip_rejections(metrics_text: str) -> int | None:
    """The sum of `*gossip_rejected_total` samples (any prefix, any labels) in Prometheus text;
    None when the metric is absent."""
    total = None
    for line in metrics_text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition("{") if "{" in line.split(" ", 1)[0] else (line.split(" ", 1)[0], "", line.split(" ", 1)[-1])
        if not name.endswith("gossip_rejected_total"):
            continue
        value = rest.rsplit("}", 1)[-1].split() if "}" in rest else rest.split()
        try:
            total = (total or 0) + int(float(value[0]))
        except (IndexError, ValueError):
            continue
    return total


def _in_windows(t: float, windows: Sequence[tuple[float, float]]) -> bool:
    return any(a <= t <= b for a, b in windows)


def check_no_disconnects(
    records: Iterable[Record],
    nodes: Iterable[str] | None = None,
    since: float | None = None,
    until: float | None = None,
    allowed: Mapping[str, Sequence[tuple[float, float]]] | None = None,
) -> list[Violation]:
    """The given clients (all when `nodes` is None) never lost their stream between `since`
    and `until`: no disconnect event and no connect event after their first one, except inside
    `allowed[node]` windows (when their own relay was disturbed)."""
    wanted = None if nodes is None else set(nodes)
    allowed = allowed or {}
    out = []
    for node, rs in by_node(records).items():
        if wanted is not None and node not in wanted:
            continue
        connected: set[str | None] = set()
        for r in rs:
            if r.event == "connect":
                # The first connect of each stream (one per client with ADS, one per type with
                # per-type streams) is the initial one; later ones are reconnects.
                if r.type not in connected:
                    connected.add(r.type)
                    continue
            elif r.event != "disconnect":
                continue
            if since is not None and r.t < since:
                continue
            if until is not None and r.t > until:
                continue
            if _in_windows(r.t, allowed.get(node, ())):
                continue
            what = "stream ended" if r.event == "disconnect" else "reconnected"
            detail = f" ({r.detail})" if r.detail else ""
            out.append(Violation("no-disconnect", node, f"{what}{detail}", r.t))
    return out


def subscribed_types(rs: Iterable[Record]) -> set[str]:
    return {r.type for r in rs if r.event == "response" and r.type}


def check_convergence(
    records: Iterable[Record],
    target_version: str,
    heal_t: float,
    bound_ms: float,
    nodes: Iterable[str] | None = None,
    types: Iterable[str] | None = None,
) -> Convergence:
    """Every client (in `nodes`, default all that have records) receives, for every type it
    subscribes to (`types`, default: the types it ever received), a version >= `target_version`
    within `bound_ms` after `heal_t`. `target_version` is a version published at or after the
    heal (the harness publishes one), so receiving it means the client caught up."""
    target = version_int(target_version)
    res = Convergence()
    if target is None:
        res.violations.append(Violation("convergence", None, f"target version {target_version!r} is not an integer"))
        return res
    grouped = by_node(records)
    wanted = list(grouped) if nodes is None else list(nodes)
    for node in wanted:
        rs = grouped.get(node, [])
        ts = set(types) if types is not None else subscribed_types(rs)
        if not ts:
            res.violations.append(Violation("convergence", node, "no responses at all"))
            continue
        worst = 0.0
        for typ in sorted(ts):
            first = next(
                (
                    r
                    for r in rs
                    if r.event == "response" and r.type == typ and (version_int(r.version) or -1) >= target
                ),
                None,
            )
            if first is None:
                res.violations.append(
                    Violation("convergence", node, f"{typ}: never received version >= {target_version}")
                )
                worst = float("inf")
                continue
            took = max(0.0, first.t - heal_t)
            worst = max(worst, took)
            if took > bound_ms:
                res.violations.append(
                    Violation(
                        "convergence",
                        node,
                        f"{typ}: reached {first.version} {took / 1000:.1f}s after healing (bound {bound_ms / 1000:.0f}s)",
                        first.t,
                    )
                )
        if worst != float("inf"):
            res.per_client_ms[node] = worst
    if res.per_client_ms:
        res.slowest_ms = max(res.per_client_ms.values())
    return res


def check_origin_streams(origin_stats: Mapping, keys: Iterable[str], per_key_streams: int = 1) -> list[Violation]:
    """Steady state: the origin has exactly `per_key_streams` open stream(s) per active key
    (1 for a clustered relay; the number of relays for independent relays)."""
    keys = sorted(set(keys))
    open_streams = origin_stats.get("streams_open")
    if open_streams is None:
        return [Violation("origin-streams", None, "origin /stats has no streams_open")]
    expected = len(keys) * per_key_streams
    if int(open_streams) != expected:
        by_type = origin_stats.get("open_by_type") or {}
        return [
            Violation(
                "origin-streams",
                None,
                f"origin has {open_streams} open streams for {len(keys)} active keys "
                f"(expected {expected}); by type {dict(by_type)}; keys {keys}",
            )
        ]
    return []


def check_clients_active(records: Iterable[Record], expected_nodes: Iterable[str], min_responses: int = 1) -> list[Violation]:
    counts: dict[str, int] = defaultdict(int)
    for r in records:
        if r.event == "response":
            counts[r.node] += 1
    return [
        Violation("clients-active", n, f"only {counts.get(n, 0)} responses recorded (need {min_responses})")
        for n in expected_nodes
        if counts.get(n, 0) < min_responses
    ]


STATUS_EVENTS = {"nack": "nack", "does_not_exist": "does-not-exist", "resource_error": "resource-error"}


def check_client_status(records: Iterable[Record], nodes: Iterable[str] | None = None) -> list[Violation]:
    """No client NACKed a response or found a resource it subscribes to missing (the grpcio
    clients record `nack`, `does_not_exist` and `resource_error` events from CSDS)."""
    wanted = None if nodes is None else set(nodes)
    out = []
    for r in sorted(records, key=lambda r: (r.t, r.seq)):
        if r.event not in STATUS_EVENTS or (wanted is not None and r.node not in wanted):
            continue
        what = {"nack": f"NACKed {r.type} {r.name or ''} version {r.version}",
                "does_not_exist": f"{r.type} {r.name or ''} does not exist",
                "resource_error": f"{r.type} {r.name or ''} in error"}[r.event]
        detail = f" ({r.detail})" if r.detail else ""
        out.append(Violation(STATUS_EVENTS[r.event], r.node, f"{what}{detail}", r.t))
    return out


def check_rpcs(records: Iterable[Record], nodes: Iterable[str],
               allowed: Mapping[str, Sequence[tuple[float, float]]] | None = None) -> list[Violation]:
    """Every client in `nodes` had a successful RPC (`rpc_ok`), and no RPC failed
    (`rpc_error`, recorded only after the first success) outside `allowed[node]`."""
    allowed = allowed or {}
    grouped = by_node(records)
    out = []
    for node in nodes:
        rs = grouped.get(node, [])
        if not any(r.event == "rpc_ok" for r in rs):
            out.append(Violation("rpc", node, "no successful RPC"))
            continue
        errors = [r for r in rs if r.event == "rpc_error" and not _in_windows(r.t, allowed.get(node, ()))]
        if errors:
            first = errors[0]
            more = f" (and {len(errors) - 1} more until {errors[-1].t:.0f})" if len(errors) > 1 else ""
            out.append(Violation("rpc", node, f"RPC failed: {first.detail or '?'}{more}", first.t))
    return out


def rpc_errors_in_windows(records: Iterable[Record], nodes: Iterable[str],
                          allowed: Mapping[str, Sequence[tuple[float, float]]]) -> int:
    """RPC errors that `check_rpcs` tolerated because they fell in a disturbance window."""
    wanted = set(nodes)
    return sum(1 for r in records if r.event == "rpc_error" and r.node in wanted and _in_windows(r.t, allowed.get(r.node, ())))


# --- helpers for the harness ----------------------------------------------------------------


def clients_with_version_at_least(records: Iterable[Record], target_version: str, nodes: Iterable[str] | None = None,
                                  types: Iterable[str] | None = None) -> tuple[set[str], set[str]]:
    """(nodes that reached `target_version` for every type they subscribe to (or every type
    in `types`), nodes that did not)."""
    target = version_int(target_version)
    grouped = by_node(records)
    wanted = list(grouped) if nodes is None else list(nodes)
    only = None if types is None else set(types)
    done, pending = set(), set()
    for node in wanted:
        rs = grouped.get(node, [])
        types = subscribed_types(rs) if only is None else only
        newest: dict[str, int] = {}
        for r in rs:
            if r.event == "response" and r.type:
                v = version_int(r.version)
                if v is not None:
                    newest[r.type] = max(newest.get(r.type, v), v)
        if types and target is not None and all(newest.get(t, -1) >= target for t in types):
            done.add(node)
        else:
            pending.add(node)
    return done, pending


def versions_seen(records: Iterable[Record]) -> set[str]:
    return {r.version for r in records if r.event == "response" and r.version is not None}


def newest_version(records: Iterable[Record]) -> int | None:
    vs = [version_int(r.version) for r in records if r.event == "response"]
    vs = [v for v in vs if v is not None]
    return max(vs) if vs else None

#!/usr/bin/env python3
"""xds-relay benchmark suite: real processes on loopback, release builds, figures into BENCHMARKS.md.

    python3 example/bench/run.py                    # everything (about 48 minutes on 2 cores, 32 of them the soak)
    python3 example/bench/run.py --quick            # 1k streams only, fewer updates (CI smoke run)
    python3 example/bench/run.py --only fanout-1k,cold-key --no-write

Each benchmark starts the example management server (100 clusters with matching EDS, publishing
only when told to), one relay or a 3-node relay cluster, and `xds-loadgen` clients (ADS, state
of the world unless stated, CDS + EDS), then measures:

- fanout-1k / fanout-10k: one relay, N streams on one key pair. Per update: fan-out spread
  (first to last stream), end-to-end latency (origin publish stamp to receipt), relay CPU seconds;
  relay RSS per idle stream ((RSS with N idle streams - RSS before) / N).
- cluster-1k / cluster-10k: the same through 3 relays (a third of the streams on each).
- sotw-vs-delta: bytes each stream receives per update, SotW against delta, 1k streams.
- cold-key: time from opening a stream to its first response for a key nobody asked for before,
  when the relay it reaches owns the key (it subscribes to the origin) and when another node
  owns it (it follows the owner over the peer protocol); the origin straight, for reference.
- failover: 3 relays, clients on each; kill -9 the owner of the busy keys and publish: time until
  every client of the surviving relays has the new version.
- cluster-scale: the cluster crate alone at 50 and 100 members, in one process
  (cluster/examples/scale.rs: chitchat over its in-memory transport, paused tokio time): time for
  every member's ring to converge after a join, a kill and a drain, the share of 100k keys that
  changed owner, gossip bytes per member, ring memory, lookup and ownership-recompute CPU; with an
  extrapolation to 1M proxies.
- soak: one relay (cache ttl 30 s), --soak-streams clients (10k) for --soak-minutes (30); the origin
  publishes every 5 s; 1% of the clients restart each second, each onto its next node cluster (a
  new aggregation key; the key it left goes idle and expires). Every --soak-sample-seconds (60):
  relay RSS, open fds, threads, tokio tasks, cache entries, downstream streams, /metrics series,
  origin keys, and the origin's open streams; the slope per hour of each (least squares over the
  samples after the warm-up) and a verdict, flat or growing.
- key-scale: one relay, --scale-keys clients (10k), each its own node cluster and so its own key (EDS
  of 10 clusters): origin connections and streams, time until every client is served, relay RSS per
  key, relay CPU per origin update per key.

Every loop is bounded in count and time; a benchmark that cannot finish fails with a message.
Needs the release binaries (built unless --no-build) and Python 3.11 (standard library only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "example/config/aggregation-rules.yaml"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# --- processes --------------------------------------------------------------------------------


class Proc:
    """A child process with its output in a log file; killed when the suite ends."""

    live: list["Proc"] = []

    def __init__(self, name: str, cmd: list[str], workdir: Path):
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self.stderr_path = workdir / f"{name}.stderr"
        self.out = open(self.log_path, "wb")
        self.err = open(self.stderr_path, "wb")
        self.p = subprocess.Popen(cmd, stdout=self.out, stderr=self.err, stdin=subprocess.DEVNULL)
        Proc.live.append(self)

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def rss_bytes(self) -> int:
        return int(Path(f"/proc/{self.pid}/statm").read_text().split()[1]) * PAGE

    def stop(self, sig=signal.SIGTERM, timeout: float = 15) -> int | None:
        if self.alive():
            self.p.send_signal(sig)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        self.out.close()
        self.err.close()
        if self in Proc.live:
            Proc.live.remove(self)
        return self.p.returncode

    def stderr_text(self) -> str:
        self.err.flush()
        return self.stderr_path.read_text(errors="replace")

    @classmethod
    def stop_all(cls) -> None:
        for p in list(cls.live):
            p.stop(signal.SIGKILL, timeout=5)


def wait_for(what: str, check, timeout: float, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")


def http(url: str, method: str = "GET", timeout: float = 5) -> bytes:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


def http_ok(url: str) -> bool:
    try:
        http(url, timeout=1)
        return True
    except Exception:
        return False


def free_port(ip: str, kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


# --- the parts --------------------------------------------------------------------------------


@dataclass
class Origin:
    proc: Proc
    xds: str
    stats: str

    def publish(self) -> str:
        return json.loads(http(f"http://{self.stats}/publish", "POST"))["version"]

    def streams(self) -> int:
        stats = json.loads(http(f"http://{self.stats}/stats"))
        return int(stats.get("open_streams", stats.get("streams_open", 0)))


def start_origin(bins: Path, workdir: Path, ip: str = "127.0.0.20", interval: str = "1000m") -> Origin:
    """The example origin; it publishes by itself every `interval` (by default only when told to)."""
    xds, stats = f"{ip}:{free_port(ip)}", f"{ip}:{free_port(ip)}"
    cmd = [str(bins / "example-management-server"), "--address", xds, "--stats-address", stats,
           "--clusters", "100", "--listeners", "1", "--interval", interval, "--log-level", "warn"]
    origin = Origin(Proc("origin", cmd, workdir), xds, stats)
    wait_for("the origin", lambda: http_ok(f"http://{stats}/healthz"), 20)
    return origin


@dataclass
class Relay:
    name: str
    proc: Proc
    xds: str
    admin: str

    def cluster(self) -> dict:
        return json.loads(http(f"http://{self.admin}/api/cluster"))

    def metrics(self) -> dict[str, float]:
        """The /metrics samples, `name{labels}` -> value (comments left out)."""
        out = {}
        for line in http(f"http://{self.admin}/metrics").decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
        return out


def start_relays(bins: Path, workdir: Path, origin: Origin, count: int, clustered: bool,
                 tls: "Certs | None" = None, cache: str = "  ttl: 300s\n") -> list[Relay]:
    ips = [f"127.0.0.{21 + i}" for i in range(count)]
    gossip = [(ip, free_port(ip, socket.SOCK_DGRAM)) for ip in ips]
    seeds = ", ".join(f'"{ip}:{port}"' for ip, port in gossip)
    oip, oport = origin.xds.split(":")
    relays = []
    for i, ip in enumerate(ips):
        name = f"relay-{i + 1}"
        xds, admin = f"{ip}:{free_port(ip)}", f"{ip}:{free_port(ip)}"
        text = (
            f'server:\n  address: {{ address: "{ip}", port_value: {xds.split(":")[1]} }}\n'
            f'origin_server:\n  address: {{ address: "{oip}", port_value: {oport} }}\n'
            "  backoff: { initial_interval: 100ms, max_interval: 1s }\n"
            "logging:\n  level: WARN\n"
            f"cache:\n{cache}"
            f'admin:\n  address: {{ address: "{ip}", port_value: {admin.split(":")[1]} }}\n'
        )
        if tls:
            text = text.replace("\norigin_server:", (
                f"\n  tls: {{ cert_file: {tls.relay_cert}, key_file: {tls.relay_key}, client_ca_file: {tls.ca} }}"
                "\norigin_server:"), 1)
        if clustered:
            text += (
                f"cluster:\n  node_name: {name}\n  advertise_host: \"{ip}\"\n"
                f'  gossip: {{ address: "{ip}", port_value: {gossip[i][1]} }}\n'
                f'  peer: {{ address: "{ip}", port_value: {free_port(ip)} }}\n'
                f"  seeds: [{seeds}]\n  gossip_interval: 100ms\n  insecure: true\n"
            )
        path = workdir / f"{name}.yaml"
        path.write_text(text)
        cmd = [str(bins / "xds-relay"), "-c", str(path), "-a", str(RULES)]
        relays.append(Relay(name, Proc(name, cmd, workdir), xds, admin))
    for r in relays:
        wait_for(f"{r.name} ready", lambda r=r: http_ok(f"http://{r.admin}/ready"), 30)
    if clustered:
        def formed():
            for r in relays:
                members = r.cluster().get("members", [])
                live = [m for m in members if m.get("alive") and m.get("state") == "ready"]
                if len(live) != count:
                    return False
            return True
        wait_for("the cluster to form", formed, 30, 0.2)
    return relays


@dataclass
class Loadgen:
    proc: Proc
    json_path: Path
    record_path: Path | None
    streams: int

    def progress(self) -> dict:
        """The last progress line, parsed."""
        lines = [l for l in self.proc.stderr_text().splitlines() if "calls up" in l]
        if not lines:
            return {}
        m = re.search(r"calls up (\d+)/(\d+) \| ready (\d+)/(\d+) \| responses (\d+) .*errors (\d+) reconnects (\d+)", lines[-1])
        if not m:
            return {}
        up, expected, ready, streams, responses, errors, reconnects = map(int, m.groups())
        restarts = re.search(r"restarts (\d+)", lines[-1])
        return {"up": up, "ready": ready, "responses": responses, "errors": errors, "reconnects": reconnects,
                "restarts": int(restarts.group(1)) if restarts else 0}

    def finish(self) -> dict:
        self.proc.stop(signal.SIGINT, timeout=60)
        if not self.json_path.exists():
            raise BenchError(f"xds-loadgen wrote no summary: {self.proc.stderr_text()[-2000:]}")
        return json.loads(self.json_path.read_text())


def start_loadgen(bins: Path, workdir: Path, name: str, target: str, streams: int, *, protocol="sotw",
                  types="cds,eds", node="{i}", cluster="bench-{i}", record=False, duration="30m",
                  connections: int | None = None, tls: "Certs | None" = None, connect_rate: str | None = None,
                  extra: list[str] | None = None) -> Loadgen:
    json_path = workdir / f"{name}.json"
    connections = connections or max(1, min(64, streams // 100))
    cmd = [str(bins / "xds-loadgen"), "--target", f"{'https' if tls else 'http'}://{target}", "--streams", str(streams),
           "--connections", str(connections), "--protocol", protocol, "--types", types,
           "--node-id-template", f"{name}-{node}", "--cluster-template", cluster, "--duration", duration,
           "--reconnect-delay", "500ms", "--json", str(json_path)]
    if connect_rate:
        cmd += ["--connect-rate", connect_rate]
    elif streams > 2000:
        cmd += ["--connect-rate", "2500/s"]
    if tls:
        cmd += ["--tls-ca", str(tls.ca), "--tls-cert", str(tls.client_cert), "--tls-key", str(tls.client_key)]
    cmd += extra or []
    record_path = None
    if record:
        record_path = workdir / f"{name}.jsonl"
        cmd += ["--record", str(record_path)]
    return Loadgen(Proc(name, cmd, workdir), json_path, record_path, streams)


def wait_ready(loadgens: list[Loadgen], timeout: float) -> None:
    def ready():
        for lg in loadgens:
            if not lg.proc.alive():
                raise BenchError(f"{lg.proc.name} exited: {lg.proc.stderr_text()[-2000:]}")
            if lg.progress().get("ready", 0) < lg.streams:
                return False
        return True
    wait_for(f"{sum(lg.streams for lg in loadgens)} streams ready", ready, timeout, 0.5)


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * len(values) + 0.5) - 1))]


# --- benchmarks -------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    title: str
    rows: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)
    # Column headings when a result has several value columns (rows then hold "a | b | c").
    columns: list[str] = field(default_factory=list)


def fanout(args, bins: Path, workdir: Path, streams: int, relays_count: int, updates: int,
           tls: "Certs | None" = None) -> Result:
    clustered = relays_count > 1
    origin = start_origin(bins, workdir)
    relays = start_relays(bins, workdir, origin, relays_count, clustered, tls)
    time.sleep(1)
    rss0 = [r.proc.rss_bytes() for r in relays]
    per = [streams // relays_count + (1 if i < streams % relays_count else 0) for i in range(relays_count)]
    loadgens = [start_loadgen(bins, workdir, f"lg{i + 1}", r.xds, n, tls=tls) for i, (r, n) in enumerate(zip(relays, per))]
    wait_ready(loadgens, 120 + streams / 100)
    time.sleep(3)  # idle: every stream has its first responses and has ACKed them
    rss1 = [r.proc.rss_bytes() for r in relays]
    origin_streams = origin.streams()
    cpu0 = [r.proc.cpu_seconds() for r in relays]
    settle = 2.0 + streams / 2500
    published = []
    t0 = time.monotonic()
    for _ in range(updates):
        published.append(origin.publish())
        time.sleep(settle)
    wall = time.monotonic() - t0
    cpu1 = [r.proc.cpu_seconds() for r in relays]
    summaries = [lg.finish() for lg in loadgens]

    spreads, lat_p50, lat_p99, delivered = [], [], [], True
    for s in summaries:
        by_version = {(v["type"], v["version"]): v for v in s["versions"]}
        for version in published:
            v = by_version.get(("eds", version))
            if v is None or v["streams"] < s["streams"]:
                delivered = False
                continue
            spreads.append(v["spread_ms"])
        if s.get("latency_ms"):
            lat_p50.append(s["latency_ms"]["p50"])
            lat_p99.append(s["latency_ms"]["p99"])
    errors = sum(s["errors"] for s in summaries)
    reconnects = sum(s["reconnects"] for s in summaries)
    cpu_per_update = (sum(cpu1) - sum(cpu0)) / updates
    rss_per_stream = (sum(rss1) - sum(rss0)) / streams
    where = "one relay" if not clustered else f"{relays_count} relays, {per[0]} streams each"
    r = Result(f"{'cluster' if clustered else 'fanout'}-{streams // 1000}k",
               f"{streams:,} streams, {where}: a 100-cluster CDS + EDS update")
    r.rows = [
        ("streams (ADS, SotW, CDS + EDS)", f"{streams:,} ({where})"),
        ("origin streams while serving them", str(origin_streams)),
        ("updates published", f"{updates} ({settle:.1f} s apart)"),
        ("every stream received every update", "yes" if delivered else "NO"),
        ("fan-out spread per update (first to last stream), p50 / p99 / max",
         f"{quantile(spreads, 0.5):.0f} ms / {quantile(spreads, 0.99):.0f} ms / {max(spreads):.0f} ms" if spreads else "-"),
        ("end-to-end latency (origin publish to receipt), p50 / p99",
         f"{max(lat_p50):.0f} ms / {max(lat_p99):.0f} ms" if lat_p50 else "-"),
        ("relay CPU per update (all relays)", f"{cpu_per_update:.3f} s"),
        ("relay RSS per idle stream", f"{rss_per_stream / 1024:.1f} KiB"),
        ("relay RSS with every stream idle (all relays)", f"{sum(rss1) / 2**20:.0f} MiB"),
        ("stream errors / reconnects", f"{errors} / {reconnects}"),
    ]
    if clustered:
        r.notes.append("latency p50/p99 are the largest of the three load generators' own quantiles")
    r.data = {"spread_ms": spreads, "cpu_per_update_s": cpu_per_update, "rss_per_stream_bytes": rss_per_stream,
              "latency_p50_ms": max(lat_p50) if lat_p50 else None, "latency_p99_ms": max(lat_p99) if lat_p99 else None,
              "wall_s": wall, "delivered": delivered, "errors": errors, "origin_streams": origin_streams}
    if not delivered:
        r.notes.append("some stream missed an update: see the loadgen summaries in the work directory")
    Proc.stop_all()
    return r


def fleet(args, bins: Path, workdir: Path, clients: int, mode: str, updates: int) -> Result:
    """`clients` clients on one relay, each on its own HTTP/2 connection as Envoy connects: per-type
    (one CDS stream per connection) or ADS (one stream with CDS + EDS). Reports the relay's CPU per
    connection per update beside the load generator's, RSS per idle connection + stream, spread and
    end-to-end latency."""
    types = "cds" if mode == "per-type" else "cds,eds"
    watched = "cds" if mode == "per-type" else "eds"
    origin = start_origin(bins, workdir)
    relay = start_relays(bins, workdir, origin, 1, False)[0]
    time.sleep(1)
    rss0 = relay.proc.rss_bytes()
    lg = start_loadgen(bins, workdir, "lg", relay.xds, clients, types=types, connections=clients,
                       connect_rate="2000/s", extra=["--mode", mode])
    wait_ready([lg], 120 + clients / 50)
    time.sleep(3 + clients / 2000)  # idle: every stream has its first responses and has ACKed them
    rss1 = relay.proc.rss_bytes()
    cpu0, lg_cpu0 = relay.proc.cpu_seconds(), lg.proc.cpu_seconds()
    settle = 5.0
    published = []
    for _ in range(updates):
        published.append(origin.publish())
        time.sleep(settle)
    cpu1, lg_cpu1 = relay.proc.cpu_seconds(), lg.proc.cpu_seconds()
    s = lg.finish()
    by_version = {(v["type"], v["version"]): v for v in s["versions"]}
    spreads, delivered = [], True
    for version in published:
        v = by_version.get((watched, version))
        if v is None or v["streams"] < s["streams"]:
            delivered = False
            continue
        spreads.append(v["spread_ms"])
    relay_us = (cpu1 - cpu0) / updates / clients * 1e6
    lg_us = (lg_cpu1 - lg_cpu0) / updates / clients * 1e6
    rss_per = (rss1 - rss0) / clients
    what = "per-type CDS" if mode == "per-type" else "ADS CDS + EDS"
    r = Result(f"fleet-{mode}-{clients // 1000}k", f"{clients:,} clients, one connection each ({what})")
    r.data = {"clients": clients, "mode": mode, "relay_us_per_client_update": relay_us,
              "loadgen_us_per_client_update": lg_us, "rss_per_connection_bytes": rss_per, "spread_ms": spreads,
              "latency_ms": s.get("latency_ms"), "delivered": delivered, "errors": s["errors"],
              "reconnects": s["reconnects"], "updates": updates}
    lat = s.get("latency_ms") or {}
    r.rows = [
        ("relay CPU per connection per update", f"{relay_us:.1f} µs"),
        ("load generator CPU per connection per update", f"{lg_us:.1f} µs"),
        ("relay RSS per idle connection + stream", f"{rss_per / 1024:.1f} KiB"),
        ("fan-out spread p50 / p99", f"{quantile(spreads, 0.5):.0f} / {quantile(spreads, 0.99):.0f} ms" if spreads else "-"),
        ("end-to-end latency p50 / p99", f"{lat['p50']:.0f} / {lat['p99']:.0f} ms" if lat else "-"),
        ("every client received every update", "yes" if delivered else "NO"),
        ("stream errors / reconnects", f"{s['errors']} / {s['reconnects']}"),
    ]
    Proc.stop_all()
    return r


def fleet_all(args, bins: Path, workdir: Path, updates: int) -> Result:
    """Every one-connection-per-client run (`FLEET`), one column each."""
    configs = [(n, m) for n, m in FLEET if not args.quick or n == 1000]
    runs = []
    for clients, mode in configs:
        work = workdir / f"{mode}-{clients}"
        work.mkdir()
        log(f"  {clients:,} clients, {mode} ...")
        runs.append(fleet(args, bins, work, clients, mode, updates))
    t = Result("fleet", "One connection per client, as fleets connect: one relay, the example origin (100 clusters "
                        "with their EDS), a version every 5 s")
    t.columns = [f"{r.data['clients']:,} {r.data['mode']}" for r in runs]
    t.rows = [(label, " | ".join(r.rows[i][1] for r in runs)) for i, (label, _) in enumerate(runs[0].rows)]
    t.notes.append("each client is one `xds-loadgen` call on its own TCP connection (`--connections` = clients); "
                   "per-type: one CDS stream (11.5 KB responses); ADS: one stream with CDS and EDS (100 names); "
                   "every response ACKed")
    t.notes.append("CPU per connection per update: the process's user + system CPU over the update phase divided by "
                   "updates and clients; the load generator shares the 2 cores with the relay and the origin, so the "
                   "spread is bounded by the sum of both")
    t.data = {"runs": [r.data for r in runs]}
    return t


def sotw_vs_delta(args, bins: Path, workdir: Path, streams: int, updates: int) -> Result:
    origin = start_origin(bins, workdir)
    relay = start_relays(bins, workdir, origin, 1, False)[0]
    out = {}
    for protocol in ("sotw", "delta"):
        lg = start_loadgen(bins, workdir, f"{protocol}", relay.xds, streams, protocol=protocol,
                           cluster=f"{protocol}-{{i}}")
        wait_ready([lg], 120)
        time.sleep(2)
        # The initial state's bytes are left out: sampled from the progress line before the updates.
        b0 = progress_bytes(lg)
        for _ in range(updates):
            origin.publish()
            time.sleep(2.0 + streams / 2500)
        b1 = progress_bytes(lg)
        s = lg.finish()
        out[protocol] = ((b1 - b0) / (streams * updates), s)
    sotw, delta = out["sotw"][0], out["delta"][0]
    r = Result("sotw-vs-delta", f"State of the world versus delta on the wire: {streams:,} streams, a publish of the example origin")
    r.rows = [
        ("bytes per stream per update, SotW (CDS + EDS, 100 clusters)", f"{sotw:,.0f}"),
        ("bytes per stream per update, delta", f"{delta:,.0f}"),
        ("ratio", f"{sotw / delta:.1f} : 1" if delta else "-"),
    ]
    r.notes.append("a publish of the example origin changes every ClusterLoadAssignment and no cluster: SotW resends the "
                   "whole CDS, delta sends only the 100 changed assignments; for one cluster out of 1,000 changing, see "
                   "the per-update work section")
    r.data = {"sotw_bytes": sotw, "delta_bytes": delta}
    Proc.stop_all()
    return r


def progress_bytes(lg: Loadgen) -> float:
    time.sleep(1.2)  # a fresh progress line
    lines = [l for l in lg.proc.stderr_text().splitlines() if "calls up" in l]
    m = re.search(r"responses \d+ \(([\d.]+) MB\)", lines[-1]) if lines else None
    if not m:
        raise BenchError("no progress line from xds-loadgen")
    return float(m.group(1)) * 1e6


def first_response_ms(record: Path) -> dict[str, float]:
    """Per client node: first response time minus its first connect time."""
    connect, first = {}, {}
    for line in record.read_text().splitlines():
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue
        if e["event"] == "connect":
            connect.setdefault(e["node"], e["t"])
        elif e["event"] == "response":
            first.setdefault(e["node"], e["t"])
    return {n: first[n] - connect[n] for n in first if n in connect}


def first_response_unix_ms(record: Path) -> float | None:
    """The time (unix ms) of the first response in a load generator's record."""
    for line in record.read_text().splitlines():
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue
        if e.get("event") == "response":
            return e["t"]
    return None


def run_example(name: str) -> subprocess.CompletedProcess:
    """Runs the release build of `examples/<name>.rs` and returns its finished process."""
    p = subprocess.run(["cargo", "run", "--quiet", "--release", "--example", name], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise BenchError(f"{name} failed: {p.stderr[-2000:]}")
    return p


def update_cost(args, bins: Path, workdir: Path) -> Result:
    """The relay's own per-update work, in process (examples/update_cost.rs)."""
    p = run_example("update_cost")
    r = Result("update-cost", "Per-update work in the relay: one cluster out of 1,000 changes (in process)")
    lines = [l for l in p.stdout.splitlines() if l.startswith("|")]
    header = lines[0].strip("|").split("|")
    r.rows = []
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        r.rows.append((cells[0], f"SotW {cells[1]}; delta {cells[2]}"))
    r.notes.append("columns: " + ", ".join(c.strip() for c in header) + "; command `cargo run --release --example update_cost`")
    r.data = {"stdout": p.stdout}
    return r


def cold_key(args, bins: Path, workdir: Path, keys: int) -> Result:
    origin = start_origin(bins, workdir)
    relays = start_relays(bins, workdir, origin, 3, True)
    # One stream per cold key (node cluster cold<i>-x -> key cold<i>_cds), all at the first relay.
    lg = start_loadgen(bins, workdir, "cold", relays[0].xds, keys, types="cds", node="{i}", cluster="cold{i}-x",
                       record=True)
    wait_ready([lg], 60)
    lg.finish()
    times = first_response_ms(lg.record_path)
    owners = {k["key"]: k.get("owner") for k in relays[0].cluster().get("keys", [])}
    local, peer = [], []
    for i in range(keys):
        t = times.get(f"cold-{i}")
        owner = owners.get(f"cold{i}_cds")
        if t is None or owner is None:
            continue
        (local if owner == relays[0].name else peer).append(t)
    direct = start_loadgen(bins, workdir, "direct", origin.xds, keys, types="cds", node="{i}", cluster="d{i}-x",
                           record=True)
    wait_ready([direct], 60)
    direct.finish()
    straight = list(first_response_ms(direct.record_path).values())
    r = Result("cold-key", f"A cold key: first response to a new stream for a key no relay holds ({keys} keys, 3 relays)")
    fmt = lambda xs: f"{quantile(xs, 0.5):.1f} ms / {max(xs):.1f} ms (n={len(xs)})" if xs else "-"
    r.rows = [
        ("the relay reached owns the key (relay -> origin), p50 / max", fmt(local)),
        ("another node owns it (relay -> owner -> origin), p50 / max", fmt(peer)),
        ("no relay: the origin straight, p50 / max", fmt(straight)),
    ]
    r.data = {"local_ms": local, "peer_ms": peer, "origin_ms": straight}
    if not local or not peer:
        r.notes.append("the ring placed every cold key on one side; rerun with more --cold-keys")
    Proc.stop_all()
    return r


def failover(args, bins: Path, workdir: Path, streams_per_relay: int) -> Result:
    origin = start_origin(bins, workdir)
    relays = start_relays(bins, workdir, origin, 3, True)
    loadgens = [start_loadgen(bins, workdir, f"fo{i + 1}", r.xds, streams_per_relay, record=True)
                for i, r in enumerate(relays)]
    wait_ready(loadgens, 60)
    time.sleep(2)
    owners = {k["key"]: k.get("owner") for k in relays[0].cluster().get("keys", [])}
    owner = owners.get("bench_eds")
    victim = next((i for i, r in enumerate(relays) if r.name == owner), None)
    if victim is None:
        raise BenchError(f"no owner of bench_eds in /api/cluster: {owners}")
    t_kill = time.time() * 1000
    relays[victim].proc.stop(signal.SIGKILL)
    version = origin.publish()
    survivors = [lg for i, lg in enumerate(loadgens) if i != victim]

    def all_have():
        got = []
        for lg in survivors:
            seen = {}
            for line in lg.record_path.read_text().splitlines():
                try:
                    e = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if e["event"] == "response" and e.get("type") == "eds" and e.get("version") == version:
                    seen.setdefault(e["node"], e["t"])
            if len(seen) < lg.streams:
                return None
            got += seen.values()
        return got
    got = wait_for("every surviving client on the new version", all_have, 60, 0.2)
    disconnects = 0
    for lg in survivors:
        lg.finish()
        disconnects += sum(1 for l in lg.record_path.read_text().splitlines() if '"disconnect"' in l)
    r = Result("failover", f"Owner killed with kill -9: 3 relays, {streams_per_relay} streams on each")
    r.rows = [
        ("owner killed -> every surviving client on the version published at the kill",
         f"{(max(got) - t_kill) / 1000:.2f} s"),
        ("first surviving client on it", f"{(min(got) - t_kill) / 1000:.2f} s"),
        ("surviving clients disconnected", str(disconnects)),
    ]
    r.data = {"failover_s": (max(got) - t_kill) / 1000, "disconnects": disconnects}
    Proc.stop_all()
    return r


def cluster_scale(args, bins: Path, workdir: Path, sizes=(50, 100), keys: int = 100_000) -> Result:
    """The cluster crate at 50 and 100 members in simulation (cluster/examples/scale.rs): chitchat over
    its in-memory transport on paused tokio time, the crate's default config."""
    runs = {}
    for members in sizes:
        cmd = ["cargo", "run", "--quiet", "--release", "-p", "xds-relay-cluster", "--example", "scale", "--",
               "--members", str(members), "--keys", str(keys), "--json"]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
        if p.returncode != 0:
            raise BenchError(f"scale --members {members} failed: {p.stderr[-2000:]}")
        runs[members] = json.loads(p.stdout)
    (workdir / "scale.json").write_text(json.dumps(runs, indent=2))
    big = runs[max(sizes)]
    cfg = big["config"]

    def each(fmt) -> str:
        return " / ".join(fmt(runs[n]) for n in sizes)

    def event(run: dict, name: str) -> dict:
        return next(e for e in run["gossip"]["summary"] if e["event"] == name)

    def spread(stat: dict, fmt) -> str:
        return f"{fmt(stat['median'])} ({fmt(stat['min'])}-{fmt(stat['max'])})"

    def seconds(name: str) -> str:
        return each(lambda r: spread(event(r, name)["converge_s"], lambda v: f"{v:.1f}") + " s")

    def moved(name: str) -> str:
        return each(lambda r: spread(event(r, name)["moved_fraction"], lambda v: f"{v * 100:.2f}") +
                    f"% (ideal {event(r, name)['ideal_fraction']['median'] * 100:.2f}%)")

    def kb(v: float) -> str:
        return f"{v / 1000:.1f} kB"

    cycles = big["gossip"]["cycles"]
    sizes_txt = " / ".join(str(n) for n in sizes)
    r = Result("cluster-scale", f"Cluster scale in simulation: {sizes_txt} members, {keys:,} keys "
                                "(in process, paused time; values: " + " / ".join(f"{n} members" for n in sizes) + ")")
    r.rows = [
        ("all members ready -> every ring complete (simulated)", each(lambda r: f"{r['gossip']['start_converge_s']:.1f} s")),
        (f"join of member N+1 -> every ring holds it (simulated; median (min-max) of {cycles})", seconds("join")),
        ("kill (no goodbye) -> off every ring (simulated)", seconds("kill")),
        ("drain (gossips draining) -> off every ring (simulated)", seconds("drain")),
        ("keys whose owner changed: join", moved("join")),
        ("keys whose owner changed: kill", moved("kill")),
        ("keys whose owner changed: drain", moved("drain")),
        ("keys whose owner changed when the drained members then stop",
         each(lambda r: str(r["gossip"]["drained_leave_moved_keys"]))),
        ("gossip sent per member, steady: mean / busiest member (UDP payload per second)",
         each(lambda r: f"{kb(r['gossip']['steady']['bytes_per_s_per_member'])}/s, {kb(r['gossip']['steady']['max_member_sent_bytes_per_s'])}/s")),
        ("gossip received by the busiest member, steady",
         each(lambda r: f"{kb(r['gossip']['steady']['max_member_received_bytes_per_s'])}/s")),
        ("gossip datagrams per member per second, steady; mean datagram",
         each(lambda r: f"{r['gossip']['steady']['datagrams_per_s_per_member']:.1f}, {r['gossip']['steady']['mean_datagram_bytes']:.0f} B")),
        ("gossip sent per member during join / kill / drain (median)",
         each(lambda r: ", ".join(f"{kb(event(r, e)['bytes_per_s_per_member']['median'])}/s" for e in ("join", "kill", "drain")))),
        ("datagrams lost during join / kill / drain, median (full queue, or sent to a dead member)",
         each(lambda r: ", ".join(f"{event(r, e)['datagrams_lost']['median']:.0f}" for e in ("join", "kill", "drain")))),
        ("ring heap: total; per member; per virtual node",
         each(lambda r: f"{r['ring']['heap_bytes'] / 1024:.0f} KiB; {r['ring']['bytes_per_member']:.0f} B; {r['ring']['bytes_per_vnode']:.1f} B")),
        ("owner lookup: CPU per key; heap allocated per key",
         each(lambda r: f"{r['ring']['lookup_ns_per_key']:.0f} ns; {r['ring']['lookup_alloc_bytes_per_key']:.0f} B")),
        (f"recompute the owners of {keys:,} keys after a join (CPU: build ring + diff); ring build alone",
         each(lambda r: f"{r['ring']['recompute_ms']:.0f} ms; {r['ring']['build_ms']:.1f} ms")),
        ("simulation heap per member (its chitchat state of every member, views, queues)",
         each(lambda r: f"{r['gossip']['heap_bytes_per_member'] / 1024:.0f} KiB ({r['gossip']['heap_bytes_per_member_pair']:.0f} B per member known)")),
        ("simulation CPU per member per simulated second (upper bound: encodes, decodes and compares each datagram)",
         each(lambda r: f"{r['gossip']['steady_cpu_ms_per_member_per_s']:.2f} ms")),
    ]
    g = big["gossip"]
    n = max(sizes)
    relays = 1_000_000 // 10_000
    steady = g["steady"]["bytes_per_s_per_member"]
    kill = event(big, "kill")
    r.notes = [
        f"command `cargo run --release -p xds-relay-cluster --example scale -- --members N --keys {keys} --json`; "
        f"the crate's defaults: gossip every {cfg['gossip_interval_ms']} ms, phi {cfg['phi_threshold']:g}, failure-detector "
        f"prior {cfg['fd_initial_interval_ms']} ms, max sampled interval {cfg['fd_max_interval_ms']} ms, dead-node grace "
        f"{cfg['dead_node_grace_s']} s, {cfg['virtual_nodes']} virtual nodes per member; every member seeded with the first "
        f"{big['seeds']}",
        f"{cycles} cycles after {big['steady_seconds']} s (simulated) of steady gossip, each starting with N members: a new "
        "member joins; an established member that is not a seed is killed; the newest member (the one a scale-down "
        "removes) drains, then stops; one more member joins, unmeasured, to restore N. Peers are picked at random each "
        "round, so times vary by a round or two between cycles and runs",
        "times are simulated (tokio's paused clock: gossip rounds and failure-detector timeouts as if CPU were free); "
        "CPU figures are thread CPU time of the measuring thread, which time spent waiting for the shared cores does not "
        "inflate (shared caches still do: per-lookup figures moved by about a third between runs)",
        "bytes are the encoded chitchat envelopes (UDP payload; add 28 B of IPv4 + UDP header per datagram), counted by a "
        "wrapper around chitchat's ChannelTransport; its queues hold 100 datagrams per member and drop the rest, as a full "
        "socket buffer would; members keep gossiping now and then to dead members (kept listed for the grace period), "
        "which accounts for most losses",
        "per key: the ring stores members' virtual nodes, not keys; a key is hashed (FNV-1a + fmix64) and binary-searched "
        "on every lookup, which allocates nothing, so the cluster crate holds no memory per key; memory grows with "
        "members x virtual nodes (the ring) and members x members (each member's gossip state of every other)",
        "the ring build grows faster than linearly (consistent_hash_ring inserts each virtual node into a sorted Vec): "
        "each member rebuilds it on every view change",
        f"1M proxies, assuming one ADS stream per proxy and the measured 10,000 streams per relay on 2 cores (fanout-10k, "
        f"soak): {relays} relays at full load, about {relays * 5 // 4} with 25% headroom for a lost zone or a rollout. "
        f"Origin streams are one per aggregation key per cluster, not per relay: K keys cost K origin streams whatever the "
        f"relay count (about K/{relays} per relay as owner); 100,000 keys would be 100,000 origin streams, "
        f"{100_000 // relays:,} per relay. Gossip at {n} members: {kb(steady)}/s sent per member (about as much received), "
        f"{steady * n / 1e6:.1f} MB/s for the whole cluster; a member's share grows linearly with the member count (each "
        f"digest lists every member), so about {kb(steady * 1.25)}/s per member at {n * 5 // 4}, and each member's "
        f"gossip state of the others about {g['heap_bytes_per_member_pair'] * n * 1.25 / 2**20:.1f} MiB. A kill takes "
        f"{kill['converge_s']['median']:.1f} s (simulated, median) to leave every ring and moves about "
        f"{kill['moved_fraction']['median'] * 100:.1f}% of the keys; each relay spends about "
        f"{big['ring']['recompute_ms']:.0f} ms of CPU recomputing the owners of {keys:,} keys per membership change",
    ]
    r.data = {"runs": runs}
    return r


# --- soak -------------------------------------------------------------------------------------


def proc_threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def regression(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope of ys over xs and its standard error (0 when it cannot be estimated)."""
    n = len(xs)
    if n < 2:
        return 0.0, 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0, 0.0
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    if n < 3:
        return slope, 0.0
    residuals = sum((y - my - slope * (x - mx)) ** 2 for x, y in zip(xs, ys))
    return slope, (residuals / (n - 2) / sxx) ** 0.5


# A figure grows (or shrinks) when its fitted slope is both significant (beyond 3 standard
# errors) and at least this fraction of its mean per hour; anything else is flat.
SOAK_TOLERANCE_PER_HOUR = 0.02

# The figures a soak samples and fits: key, label, unit, decimals of a sample.
SOAK_FIGURES = [
    ("rss_mib", "relay RSS", " MiB", 1),
    ("fds", "relay open file descriptors (/proc/<pid>/fd)", "", 0),
    ("threads", "relay threads (/proc/<pid>/status)", "", 0),
    ("tasks", "relay tokio tasks (runtime_tasks)", "", 0),
    ("origin_streams", "origin streams open (origin /stats)", "", 0),
    ("origin_keys", "relay keys from the origin (keys{source=\"origin\"})", "", 0),
    ("cache_entries", "relay cache entries", "", 0),
    ("downstream_streams", "relay downstream streams", "", 0),
    ("metric_series", "relay /metrics series", "", 0),
]


def soak_verdict(xs: list[float], ys: list[float]) -> dict:
    """Slope per hour of a figure sampled at xs (minutes) and whether it is flat."""
    slope_min, stderr_min = regression(xs, ys)
    slope, stderr = slope_min * 60, stderr_min * 60
    mean = sum(ys) / len(ys) if ys else 0.0
    relative = slope / mean if mean else 0.0
    significant = abs(slope) > 3 * stderr if stderr > 0 else slope != 0
    moving = significant and (abs(relative) >= SOAK_TOLERANCE_PER_HOUR if mean else True)
    verdict = "flat" if not moving else ("GROWS" if slope > 0 else "shrinks")
    return {"slope_per_hour": slope, "stderr_per_hour": stderr, "mean": mean, "relative_per_hour": relative,
            "verdict": verdict}


def soak(args, bins: Path, workdir: Path, streams: int, minutes: float) -> Result:
    """`streams` clients on one relay for `minutes`: the origin publishes every 5 s, 1% of the clients
    restart every second, each onto a new node cluster (a new aggregation key, so the one it left
    goes idle and expires after the 30 s TTL); relay and origin figures sampled every interval."""
    sample_every = args.soak_sample_seconds
    warmup = min(args.soak_warmup_minutes, minutes / 3)
    per_group = 100
    groups = max(1, streams // per_group)
    restart_fraction = 0.01
    ttl = 30
    origin = start_origin(bins, workdir, interval="5s")
    relay = start_relays(bins, workdir, origin, 1, False,
                         cache=f"  ttl: {ttl}s\n  max_entries: 1000\n")[0]
    # The node cluster "soak<group>e<epoch>-x" maps to the keys soak<group>e<epoch>_cds and _eds.
    lg = start_loadgen(bins, workdir, "soak", relay.xds, streams, node="{i}", cluster="soak{group}e{epoch}-x",
                       duration=f"{int(minutes * 60 + 600)}s",
                       extra=["--groups", str(groups), "--reconnect-per-second", str(restart_fraction)])
    wait_ready([lg], 120 + streams / 100)

    def sample(t0: float) -> dict:
        for p in (relay.proc, origin.proc, lg.proc):
            if not p.alive():
                raise BenchError(f"{p.name} exited during the soak: {p.stderr_text()[-2000:]}")
        m = relay.metrics()
        def metric(name: str, **labels) -> float:
            return sum(v for k, v in m.items()
                       if k.split("{", 1)[0] == name and all(f'{l}="{lv}"' in k for l, lv in labels.items()))
        progress = lg.progress()
        return {
            "minute": (time.monotonic() - t0) / 60,
            "rss_mib": relay.proc.rss_bytes() / 2**20,
            "fds": proc_fds(relay.proc.pid),
            "threads": proc_threads(relay.proc.pid),
            "tasks": metric("xds_relay_runtime_tasks") if any(k.startswith("xds_relay_runtime_tasks") for k in m) else None,
            "origin_streams": origin.streams(),
            "origin_keys": metric("xds_relay_keys", source="origin"),
            "cache_entries": metric("xds_relay_cache_entries"),
            "downstream_streams": metric("xds_relay_downstream_streams"),
            "metric_series": len(m),
            "evicted_ttl": metric("xds_relay_cache_evictions_total", reason="ttl"),
            "evicted_lru": metric("xds_relay_cache_evictions_total", reason="max_entries"),
            "origin_rss_mib": origin.proc.rss_bytes() / 2**20,
            "calls_open": progress.get("up", 0),
            "restarts": progress.get("restarts", 0),
            "errors": progress.get("errors", 0),
            "reconnects": progress.get("reconnects", 0),
        }

    t0 = time.monotonic()
    samples = []
    count = int(minutes * 60 // sample_every)
    for k in range(count + 1):
        time.sleep(max(0.0, t0 + k * sample_every - time.monotonic()))
        samples.append(sample(t0))
        s = samples[-1]
        log(f"  soak {s['minute']:5.1f} min: RSS {s['rss_mib']:.1f} MiB, fds {s['fds']}, threads {s['threads']}, "
            f"tasks {s['tasks']}, origin streams {s['origin_streams']}, origin keys {s['origin_keys']:.0f}, "
            f"cache entries {s['cache_entries']:.0f}, downstream {s['downstream_streams']:.0f}, "
            f"series {s['metric_series']}, evicted {s['evicted_ttl']:.0f}, restarts {s['restarts']}, errors {s['errors']}")
    summary = lg.finish()
    (workdir / "soak-samples.json").write_text(json.dumps(samples, indent=1))

    steady = [s for s in samples if s["minute"] >= warmup - 1e-6]
    xs = [s["minute"] for s in steady]
    verdicts = {}
    for key, *_ in SOAK_FIGURES:
        ys = [s[key] for s in steady if s[key] is not None]
        if len(ys) == len(xs) and ys:
            verdicts[key] = soak_verdict(xs, ys)
    first, last = steady[0], steady[-1]
    pass_s = 1 / restart_fraction
    keys_with_clients = 2 * groups
    # Each group moves to a new key pair once per pass; the pair it left stays cached (with its origin
    # stream) for the TTL: about 2 * groups / pass_s keys per second, each idle for `ttl` seconds.
    idle_keys = 2 * groups / pass_s * ttl
    restarts = summary.get("restarts", last["restarts"])
    r = Result("soak", f"Soak: {streams:,} streams on one relay for {minutes:g} minutes, "
               "1% of clients restarting each second onto new keys")
    r.rows = [
        ("load", f"{streams:,} ADS SotW clients (CDS + EDS) over {max(1, min(64, streams // 100))} connections; the origin "
                 f"publishes every 5 s; 1% of the clients restart each second (round robin, every client every "
                 f"{pass_s:.0f} s), each onto its next node cluster; {groups} clusters of {per_group} clients, "
                 f"so {keys_with_clients} keys have clients at any time"),
        ("cache", f"ttl {ttl} s, max_entries 1000: keys expired during the run "
                  f"{last['evicted_ttl'] - samples[0]['evicted_ttl']:.0f} (ttl), "
                  f"{last['evicted_lru'] - samples[0]['evicted_lru']:.0f} (max_entries)"),
        ("samples", f"{len(samples)}, every {sample_every:g} s; slope fitted over the {len(steady)} after a "
                    f"{warmup:g}-minute warm-up"),
    ]
    for key, label, unit, decimals in SOAK_FIGURES:
        v = verdicts.get(key)
        if v is None:
            r.rows.append((label, "not measured (no such metric)"))
            continue
        lo, hi = min(s[key] for s in steady), max(s[key] for s in steady)
        r.rows.append((label, f"{first[key]:.{decimals}f}{unit} -> {last[key]:.{decimals}f}{unit} "
                              f"(range {lo:.{decimals}f}-{hi:.{decimals}f}); slope {v['slope_per_hour']:+.{decimals + 1}f}{unit}/h "
                              f"± {v['stderr_per_hour']:.{decimals + 1}f} ({v['relative_per_hour'] * 100:+.1f}% of the mean per hour): "
                              f"**{v['verdict']}**"))
    r.rows += [
        ("origin streams expected (keys with clients + idle keys within the TTL)",
         f"about {keys_with_clients + idle_keys:.0f} ({keys_with_clients} + {idle_keys:.0f})"),
        ("stream restarts / errors / reconnects", f"{restarts:,} / {summary['errors']} / {summary['reconnects']}"),
    ]
    grows = [label for key, label, *_ in SOAK_FIGURES if verdicts.get(key, {}).get("verdict") == "GROWS"]
    r.notes.append("verdict: " + ("every figure flat, no leak" if not grows else "grows: " + "; ".join(grows)))
    r.notes.append(f"slope: least-squares line through the samples after the warm-up, per hour; flat unless the slope "
                   f"is beyond 3 standard errors and at least {SOAK_TOLERANCE_PER_HOUR:.0%} of the figure's mean per hour")
    r.data = {"samples": samples, "verdicts": verdicts, "summary_errors": summary["errors"]}
    Proc.stop_all()
    return r


def key_scale(args, bins: Path, workdir: Path, keys: int, updates: int) -> Result:
    """`keys` clients on one relay, each its own aggregation key (so `keys` origin streams over the relay's
    pooled origin connections): RSS per key, time until every client is served, relay CPU per update per key."""
    eds_names = ",".join(f"cluster_{j}" for j in range(10))
    origin = start_origin(bins, workdir)
    relay = start_relays(bins, workdir, origin, 1, False)[0]
    time.sleep(1)
    rss0 = relay.proc.rss_bytes()
    # Node cluster "ks<i>-x" maps to the key ks<i>_eds: one key per client.
    t0 = time.monotonic()
    lg = start_loadgen(bins, workdir, "keys", relay.xds, keys, types="eds", node="{i}", cluster="ks{i}-x",
                       extra=["--eds-names", eds_names])
    wait_ready([lg], 120 + keys / 20)
    served_s = time.monotonic() - t0
    time.sleep(3)  # idle: every stream has its first response and has ACKed it
    rss1 = relay.proc.rss_bytes()
    m = relay.metrics()
    def metric(name: str) -> float:
        return sum(v for k, v in m.items() if k.split("{", 1)[0] == name)
    origin_connections = metric("xds_relay_origin_connections")
    relay_origin_streams = metric("xds_relay_origin_streams")
    streams_max = max((v for k, v in m.items() if k.startswith("xds_relay_origin_connection_streams_max")), default=0)
    origin_streams = origin.streams()

    cpu0, origin_cpu0 = relay.proc.cpu_seconds(), origin.proc.cpu_seconds()
    published, delivery_s = [], []
    t_updates = time.monotonic()
    for _ in range(updates):
        before = lg.progress().get("responses", 0)
        t = time.monotonic()
        published.append(origin.publish())
        wait_for("every key's client to get the update",
                 lambda: lg.progress().get("responses", 0) >= before + keys, 120 + keys / 100, 0.2)
        delivery_s.append(time.monotonic() - t)
        time.sleep(1.5)  # the progress line is printed every second: let the next one start clean
    wall = time.monotonic() - t_updates
    cpu = relay.proc.cpu_seconds() - cpu0
    origin_cpu = origin.proc.cpu_seconds() - origin_cpu0
    summary = lg.finish()
    by_version = {(v["type"], v["version"]): v for v in summary["versions"]}
    delivered = all(by_version.get(("eds", v), {}).get("streams", 0) >= keys for v in published)

    r = Result("key-scale", f"{keys:,} keys on one relay, one client each: {keys:,} origin streams over pooled connections")
    r.rows = [
        ("clients (ADS, SotW, EDS of 10 clusters)", f"{keys:,}, each its own node cluster, so its own key"),
        ("origin connections (relay metric) / origin streams (relay metric, origin /stats)",
         f"{origin_connections:,.0f} / {relay_origin_streams:,.0f}, {origin_streams:,}"),
        ("streams on the fullest origin connection", f"{streams_max:.0f} (origin_server.max_streams_per_connection 100)"),
        ("time from the first connect until every client is served", f"{served_s:.1f} s"),
        ("relay RSS per key (client stream, cache entry, origin stream)", f"{(rss1 - rss0) / keys / 1024:.1f} KiB"),
        ("relay RSS with every key idle", f"{rss1 / 2**20:.0f} MiB"),
        ("updates published", f"{updates}, each delivered to every client before the next"),
        ("every client received every update", "yes" if delivered else "NO"),
        ("delivery of one update to every client, p50 / max", f"{quantile(delivery_s, 0.5):.1f} s / {max(delivery_s):.1f} s"),
        ("relay CPU per update per key", f"{cpu / updates / keys * 1e6:.0f} µs ({cpu:.1f} CPU-s over {updates} updates)"),
        ("origin CPU per update per key, for reference", f"{origin_cpu / updates / keys * 1e6:.0f} µs"),
        ("stream errors / reconnects", f"{summary['errors']} / {summary['reconnects']}"),
    ]
    if keys > 2000:
        r.notes.append(f"the load generator opens at most 2,500 streams a second, so serving {keys:,} clients takes at "
                       f"least {keys / 2500:.1f} s")
    r.notes.append("delivery times are polled from the load generator's progress line (printed every second) and include "
                   "the origin's own work (it encodes one response per key), on 2 shared cores")
    r.data = {"keys": keys, "served_s": served_s, "rss_per_key_bytes": (rss1 - rss0) / keys,
              "cpu_per_update_per_key_s": cpu / updates / keys, "origin_connections": origin_connections,
              "origin_streams": origin_streams, "delivery_s": delivery_s, "delivered": delivered, "wall_s": wall}
    Proc.stop_all()
    return r


def persist_cost(args, bins: Path, workdir: Path) -> Result:
    """What persistence costs the update path, in process (examples/persist_cost.rs)."""
    p = run_example("persist_cost")
    r = Result("persist-cost", "Last-known-good persistence on the update path: apply p50 / p99 / max, without and with (in process)")
    lines = [l for l in p.stdout.splitlines() if l.startswith("|")]
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        r.rows.append((cells[0], f"{cells[1]} / {cells[2]} / {cells[3]}"))
    r.notes += [l for l in p.stdout.splitlines() if l and not l.startswith("|")]
    r.notes.append("command `cargo run --release --example persist_cost`")
    r.data = {"stdout": p.stdout}
    return r


def persist_start(args, bins: Path, workdir: Path, keys: int) -> Result:
    """Start from disk: one relay with `cache.persist_dir` serves `keys` clients, each its own
    key; it stops (SIGTERM), the origin stops, and the relay starts again with the origin down.
    Measured from the process start: ready, the first client served from disk, every client
    served from disk."""
    state = workdir / "state"
    eds_names = ",".join(f"cluster_{j}" for j in range(10))
    origin = start_origin(bins, workdir)
    relay = start_relays(bins, workdir, origin, 1, False, cache=f"  ttl: 600s\n  persist_dir: {state}\n")[0]
    fill = start_loadgen(bins, workdir, "fill", relay.xds, keys, types="eds", node="{i}", cluster="pk{i}-x",
                         extra=["--eds-names", eds_names])
    wait_ready([fill], 120 + keys / 20)
    fill.finish()
    # Every key is on disk (one record file per key) before the relay stops.
    records = lambda: list(state.glob("*.lkg"))
    wait_for(f"{keys} records on disk", lambda: len(records()) >= keys, 120, 0.5)
    disk_bytes = sum(f.stat().st_size for f in records())
    relay.proc.stop(signal.SIGTERM, timeout=60)
    origin.proc.stop(signal.SIGTERM)

    cmd = [str(bins / "xds-relay"), "-c", str(workdir / f"{relay.name}.yaml"), "-a", str(RULES)]
    started_unix_ms = time.time() * 1000.0
    t0 = time.monotonic()
    proc = Proc("restarted", cmd, workdir)
    wait_for("the restarted relay ready", lambda: http_ok(f"http://{relay.admin}/ready"), 120, 0.01)
    ready_s = time.monotonic() - t0
    rss_ready = proc.rss_bytes()
    first = start_loadgen(bins, workdir, "first", relay.xds, 1, types="eds", node="{i}", cluster="pk{i}-x",
                          record=True, extra=["--eds-names", eds_names])
    wait_ready([first], 60)
    first.finish()
    first_ms = first_response_unix_ms(first.record_path)
    every = start_loadgen(bins, workdir, "every", relay.xds, keys, types="eds", node="{i}", cluster="pk{i}-x",
                          extra=["--eds-names", eds_names])
    wait_ready([every], 120 + keys / 20)
    all_s = time.monotonic() - t0
    summary = every.finish()
    cpu_start = proc.cpu_seconds()
    proc.stop(signal.SIGTERM, timeout=60)

    r = Result("persist-start", f"Start from disk: {keys:,} keys persisted by one relay, restarted with the origin down")
    r.rows = [
        ("keys on disk (one record file each) / total size", f"{keys:,} / {disk_bytes / 2**20:.1f} MiB ({disk_bytes / keys:.0f} B per key)"),
        ("process start to ready (every record read, checked and in the cache)", f"{ready_s * 1000:.0f} ms"),
        ("process start to the first client served from disk",
         f"{first_ms - started_unix_ms:.0f} ms" if first_ms is not None else "-"),
        (f"process start to every one of the {keys:,} clients served from disk", f"{all_s:.1f} s"),
        ("relay RSS when ready", f"{rss_ready / 2**20:.0f} MiB"),
        ("stream errors / reconnects while served from disk", f"{summary['errors']} / {summary['reconnects']}"),
    ]
    if keys > 2000:
        r.notes.append(f"the load generator opens at most 2,500 streams a second, so serving {keys:,} clients takes at "
                       f"least {keys / 2500:.1f} s of the last figure")
    r.data = {"keys": keys, "disk_bytes": disk_bytes, "ready_s": ready_s,
              "first_ms_after_start": (first_ms - started_unix_ms) if first_ms is not None else None,
              "all_served_s": all_s, "cpu_until_all_served_s": cpu_start}
    Proc.stop_all()
    return r


# --- report -----------------------------------------------------------------------------------


# --- TLS ------------------------------------------------------------------------------------------


@dataclass
class Certs:
    """A test PKI made with the openssl CLI: a CA, the relay's server certificate, a client's."""
    ca: Path
    relay_cert: Path
    relay_key: Path
    client_cert: Path
    client_key: Path


def make_certs(workdir: Path) -> Certs:
    d = workdir / "pki"
    d.mkdir(exist_ok=True)

    def run(*cmd: str) -> None:
        p = subprocess.run(cmd, cwd=d, capture_output=True, text=True)
        if p.returncode != 0:
            raise BenchError(f"{' '.join(cmd)}: {p.stderr[-500:]}")

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    run("openssl", "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=bench CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, san in (("relay", "DNS:localhost,IP:127.0.0.21,IP:127.0.0.1"), ("client", "DNS:bench-client")):
        run("openssl", "req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\nextendedKeyUsage=serverAuth,clientAuth\n"
                                       "keyUsage=critical,digitalSignature\nbasicConstraints=critical,CA:FALSE\n")
        run("openssl", "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext")
    return Certs(d / "ca.pem", d / "relay.pem", d / "relay.key", d / "client.pem", d / "client.key")


def handshakes(bins: Path, workdir: Path, clients: int, tls: Certs | None) -> dict:
    """`clients` clients, one connection each, opened at once: how fast the relay takes them."""
    origin = start_origin(bins, workdir)
    relay = start_relays(bins, workdir, origin, 1, False, tls)[0]
    time.sleep(1)
    rss0, cpu0 = relay.proc.rss_bytes(), relay.proc.cpu_seconds()
    t0 = time.monotonic()
    lg = start_loadgen(bins, workdir, f"hs-{'tls' if tls else 'plain'}", relay.xds, clients, types="cds",
                       connections=clients, tls=tls, connect_rate="100000/s")
    wait_ready([lg], 120 + clients / 50)
    took = time.monotonic() - t0
    cpu = relay.proc.cpu_seconds() - cpu0
    time.sleep(2)
    rss = relay.proc.rss_bytes() - rss0
    s = lg.finish()
    Proc.stop_all()
    return {"seconds": took, "rate": clients / took, "relay_cpu_per_client_ms": cpu * 1000 / clients,
            "rss_per_connection": rss / clients, "errors": s["errors"]}


def tls_cost(args, bins: Path, workdir: Path, streams: int, clients: int, updates: int) -> Result:
    certs = make_certs(workdir)
    hs = {}
    fan = {}
    for mode, tls in (("plaintext", None), ("mTLS", certs)):
        sub = workdir / mode
        sub.mkdir()
        hs[mode] = handshakes(bins, sub, clients, tls)
        fan[mode] = fanout(args, bins, sub, streams, 1, updates, tls).data
    r = Result("tls", f"mTLS versus plaintext: {clients:,} clients connecting at once (one connection each), "
               f"then {streams:,} streams on one relay")
    p, t = "plaintext", "mTLS"
    r.rows = [
        (f"{clients:,} clients, one connection each: connected and served (first response), clients per second",
         f"plaintext {hs[p]['rate']:.0f}/s; mTLS {hs[t]['rate']:.0f}/s"),
        ("relay CPU per connecting client (TCP + TLS handshake + first response)",
         f"plaintext {hs[p]['relay_cpu_per_client_ms']:.2f} ms; mTLS {hs[t]['relay_cpu_per_client_ms']:.2f} ms"),
        ("relay RSS per idle connection + stream",
         f"plaintext {hs[p]['rss_per_connection'] / 1024:.1f} KiB; mTLS {hs[t]['rss_per_connection'] / 1024:.1f} KiB"),
        (f"{streams:,} streams: relay CPU per update",
         f"plaintext {fan[p]['cpu_per_update_s']:.3f} s; mTLS {fan[t]['cpu_per_update_s']:.3f} s"),
        (f"{streams:,} streams: relay RSS per idle stream",
         f"plaintext {fan[p]['rss_per_stream_bytes'] / 1024:.1f} KiB; mTLS {fan[t]['rss_per_stream_bytes'] / 1024:.1f} KiB"),
        (f"{streams:,} streams: fan-out spread p99",
         f"plaintext {quantile(fan[p]['spread_ms'], 0.99):.0f} ms; mTLS {quantile(fan[t]['spread_ms'], 0.99):.0f} ms"
         if fan[p]["spread_ms"] and fan[t]["spread_ms"] else "-"),
        ("errors (handshake runs, fan-out runs)",
         f"{hs[p]['errors'] + hs[t]['errors']}, {fan[p]['errors'] + fan[t]['errors']}"),
    ]
    r.notes.append("ECDSA P-256 certificates, TLS 1.3 with client certificates (rustls, ring); the load generator "
                   "verifies the relay and presents its own certificate; "
                   f"the {streams:,} streams share {max(1, min(64, streams // 100))} connections as in the fan-out runs")
    r.notes.append("the load generator makes its own handshakes on the same cores, so clients per second is a floor of "
                   "what the relay accepts; relay CPU per connecting client is the relay's own")
    r.data = {"handshakes": hs, "fanout": fan}
    return r


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip() or "rustc ?"
    return (f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, {platform.system()} {platform.release()}, {rustc}; "
            "release builds; origin, relays and load generators share the cores, all on loopback")


def render_result(r: Result, stamp: str | None = None) -> list[str]:
    out = [f"<!-- result:{r.name} -->", f"### {r.title}", ""]
    if stamp:
        out += [stamp, ""]
    columns = r.columns or ["value"]
    out += ["| figure | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    out += [f"| {k} | {v} |" for k, v in r.rows]
    out += [""] + [f"- {n}" for n in r.notes] + ([""] if r.notes else [])
    return out


def render(results: list[Result], command: str) -> str:
    out = [BEGIN, "", f"Command: `{command}` ({time.strftime('%Y-%m-%d')}). Machine: {machine()}.", ""]
    for r in results:
        out += render_result(r)
    out.append(END)
    return "\n".join(out)


def write_benchmarks(section: str, path: Path) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip() + "\n\n## Suite\n\n" + section + "\n"
    path.write_text(text)


def merge_benchmarks(results: list[Result], command: str, path: Path) -> None:
    """A partial run (--only) replaces only its own results in the generated section, each stamped
    with its command and date; the others keep the figures of the run that made them."""
    text = path.read_text()
    if BEGIN not in text or END not in text:
        write_benchmarks(render(results, command), path)
        return
    head, rest = text.split(BEGIN, 1)
    body, tail = rest.split(END, 1)
    marker = "<!-- result:"
    parts = body.split(marker)
    preamble, blocks = parts[0], {}
    order = []
    for part in parts[1:]:
        name = part.split(" -->", 1)[0]
        blocks[name] = marker + part
        order.append(name)
    stamp = f"Measured with `{command}` ({time.strftime('%Y-%m-%d')}); machine as above."
    for r in results:
        if r.name not in blocks:
            order.append(r.name)
        blocks[r.name] = "\n".join(render_result(r, stamp)) + "\n"
    body = preamble + "".join(blocks[n] for n in order)
    path.write_text(head + BEGIN + body.rstrip("\n") + "\n" + END + tail)


# The one-connection-per-client runs: (clients, mode).
FLEET = [(n, m) for m in ("per-type", "ads") for n in (1000, 3000, 10000)]
BENCHMARKS = ["fleet", "update-cost", "fanout-1k", "fanout-10k", "cluster-1k", "cluster-10k", "sotw-vs-delta", "cold-key",
              "failover", "tls", "soak", "cluster-scale", "key-scale", "persist-cost",
              "persist-start"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated subset of: " + ",".join(BENCHMARKS))
    ap.add_argument("--quick", action="store_true", help="1k streams only and fewer updates")
    ap.add_argument("--updates", type=int, default=10)
    ap.add_argument("--cold-keys", type=int, default=30)
    ap.add_argument("--soak-minutes", type=float, default=30, help="how long the soak runs (default 30)")
    ap.add_argument("--soak-streams", type=int, default=10000, help="clients in the soak (default 10000)")
    ap.add_argument("--soak-sample-seconds", type=float, default=60, help="soak sampling interval (default 60)")
    ap.add_argument("--soak-warmup-minutes", type=float, default=5,
                    help="soak samples left out of the slope (default 5, at most a third of the run)")
    ap.add_argument("--scale-keys", type=int, default=10000, help="keys in key-scale (default 10000)")
    ap.add_argument("--bin-dir", help="the release binaries (default target/release, built first)")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--no-write", action="store_true", help="print the section instead of updating BENCHMARKS.md")
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = ap.parse_args(argv)

    names = args.only.split(",") if args.only else list(BENCHMARKS)
    if args.quick and not args.only:
        names = ["fleet", "update-cost", "fanout-1k", "cluster-1k", "sotw-vs-delta", "cold-key", "failover", "tls"]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmarks {unknown}")
    updates = 3 if args.quick else args.updates
    bins = Path(args.bin_dir) if args.bin_dir else ROOT / "target/release"
    if not args.bin_dir and not args.no_build:
        log("cargo build --release --bins -p xds-relay -p xds-relay-example")
        subprocess.run(["cargo", "build", "--release", "--bins", "-p", "xds-relay", "-p", "xds-relay-example"],
                       cwd=ROOT, check=True)
    for b in ("xds-relay", "example-management-server", "xds-loadgen"):
        if not (bins / b).exists():
            raise SystemExit(f"{bins / b} not found: build it or pass --bin-dir")

    results = []
    workroot = Path(tempfile.mkdtemp(prefix="xds-relay-bench-"))
    log(f"work directory {workroot}")
    plan = {
        "fleet": lambda w: fleet_all(args, bins, w, updates),
        "update-cost": lambda w: update_cost(args, bins, w),
        "fanout-1k": lambda w: fanout(args, bins, w, 1000, 1, updates),
        "fanout-10k": lambda w: fanout(args, bins, w, 10000, 1, updates),
        "cluster-1k": lambda w: fanout(args, bins, w, 1000, 3, updates),
        "cluster-10k": lambda w: fanout(args, bins, w, 10000, 3, updates),
        "sotw-vs-delta": lambda w: sotw_vs_delta(args, bins, w, 1000, updates),
        "cold-key": lambda w: cold_key(args, bins, w, args.cold_keys),
        "failover": lambda w: failover(args, bins, w, 100),
        "tls": lambda w: tls_cost(args, bins, w, 1000 if args.quick else 10000, 500 if args.quick else 2000, updates),
        "soak": lambda w: soak(args, bins, w, args.soak_streams, args.soak_minutes),
        "cluster-scale": lambda w: cluster_scale(args, bins, w),
        "key-scale": lambda w: key_scale(args, bins, w, 1000 if args.quick else args.scale_keys, updates),
        "persist-cost": lambda w: persist_cost(args, bins, w),
        "persist-start": lambda w: persist_start(args, bins, w, 1000 if args.quick else 10000),
    }
    failed = 0
    try:
        for name in names:
            work = workroot / name
            work.mkdir()
            log(f"{name} ...")
            t0 = time.monotonic()
            try:
                r = plan[name](work)
                results.append(r)
                log(f"{name}: done in {time.monotonic() - t0:.0f}s")
                for k, v in r.rows:
                    log(f"  {k}: {v}")
            except BenchError as e:
                failed += 1
                log(f"{name}: FAILED: {e}")
            finally:
                Proc.stop_all()
    finally:
        Proc.stop_all()
    command = "python3 example/bench/run.py" + (" --quick" if args.quick else "") + \
        (f" --only {args.only}" if args.only else "")
    if "soak" in names:
        for flag, value, default in (("--soak-minutes", args.soak_minutes, 30), ("--soak-streams", args.soak_streams, 10000),
                                     ("--soak-sample-seconds", args.soak_sample_seconds, 60),
                                     ("--soak-warmup-minutes", args.soak_warmup_minutes, 5)):
            if value != default:
                command += f" {flag} {value:g}"
    if "key-scale" in names and args.scale_keys != 10000:
        command += f" --scale-keys {args.scale_keys}"
    section = render(results, "make bench" if command == "python3 example/bench/run.py" else command)
    (workroot / "results.json").write_text(json.dumps([r.__dict__ for r in results], indent=2))
    if args.no_write:
        print(section)
    elif results and args.only:
        merge_benchmarks(results, command, args.out)
        log(f"updated {args.out}")
    elif results:
        write_benchmarks(section, args.out)
        log(f"wrote {args.out}")
    print(f"{len(results)} passed, {failed} failed")
    if failed == 0:
        shutil.rmtree(workroot, ignore_errors=True)
    else:
        log(f"logs kept in {workroot}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

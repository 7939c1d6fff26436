"""One scenario run: bring the project up, reach steady state, let the scenario inject and heal
its fault, wait for convergence, check the invariants, tear down.

The timeline of a run (all times unix ms, host clock = container clock):

    up ── relays healthy (+ cluster formed) ── clients start ── steady state
       ── origin streams == keys? ── fault_t: scenario injects, holds (survivors must keep
       getting new versions), heals ── heal_t: publish target version ── every client has it
       (convergence) ── origin streams == keys again? ── end_t ── clients stopped, checks, down
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import docker as d
from . import invariants as inv
from . import tls
from .project import Settings, compose_env, tls_dirs, write_run_dir


def now_ms() -> float:
    return time.time() * 1000.0


class HarnessError(RuntimeError):
    """The run could not be carried out (as opposed to an invariant violation)."""


@dataclass
class Result:
    scenario: str
    fault: str = ""
    clients: int = 0
    versions_published: int = 0
    convergence_ms: float | None = None
    failover_ms: float | None = None
    violations: list[str] = field(default_factory=list)
    error: str | None = None
    duration_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def ok(self) -> bool:
        return not self.violations and self.error is None


class Harness:
    def __init__(self, settings: Settings, scenario: str, run_dir: Path, rules: Path, log: Callable[[str], None] = print,
                 steady_timeout: float = 60, keep: bool = False, subnets: tuple[str, str] | None = None):
        self.s = settings
        self.scenario = scenario
        self.run_dir = run_dir
        self.log = lambda msg: log(f"[{scenario}] {msg}")
        self.steady_timeout = steady_timeout
        self.keep = keep
        self.compose_file = write_run_dir(settings, run_dir, rules)
        subnets = subnets or tuple(d.free_subnets(2))
        self.compose = d.Compose(f"chaos-{scenario}", [str(self.compose_file)], compose_env(settings, run_dir, subnets))
        self.result = Result(scenario, clients=settings.total_clients())
        # relay or "lb" -> windows in which its clients may lose their streams
        self.disturbed: dict[str, list[list[float]]] = defaultdict(list)
        self.grace_ms = 15000.0
        self._pub_offset = 0
        self._pub_last = 0
        self._pub_start = 0
        self.nodes_by_group = settings.expected_nodes()
        self.kind_of = {n: g.kind for g in settings.groups() for n in g.nodes()}

    # --- addresses --------------------------------------------------------------------------

    def cid(self, service: str) -> str:
        return self.compose.container(service)

    def admin(self, relay: str) -> str:
        return f"http://127.0.0.1:{d.host_port(self.cid(relay), 6070)}"

    def origin(self) -> str:
        return f"http://127.0.0.1:{d.host_port(self.cid('origin'), 18001)}"

    def metrics(self, relay: str) -> str:
        """The relay's Prometheus text (GET /metrics on its admin port: GETs need no token)."""
        status, body = d.http("GET", self.admin(relay) + "/metrics")
        if status != 200:
            raise d.DockerError(f"GET {relay} /metrics: HTTP {status}")
        return body.decode(errors="replace")

    def gossip_rejections(self) -> dict[str, int | None]:
        """Per live relay: its gossip_rejected_total (summed over reasons); None when the
        relay does not export it."""
        return {r: inv.gossip_rejections(self.metrics(r)) for r in self.live_relays()}

    def live_relays(self) -> list[str]:
        out = []
        for r in self.s.relay_names():
            try:
                if d.health(self.cid(r)) == "healthy":
                    out.append(r)
            except d.DockerError:
                pass
        return out

    # --- origin -----------------------------------------------------------------------------

    def origin_stats(self) -> dict:
        return d.http_json("GET", self.origin() + "/stats")

    def sample_publishes(self) -> int:
        """Publishes so far, across origin restarts (its counter restarts at 0)."""
        try:
            p = int(self.origin_stats().get("publishes", 0))
        except (d.DockerError, OSError, ValueError):
            return self._pub_offset + self._pub_last
        if p < self._pub_last:
            self._pub_offset += self._pub_last
        self._pub_last = p
        return self._pub_offset + p

    def publish(self) -> str:
        reply = d.http_json("POST", self.origin() + "/publish")
        self.sample_publishes()
        return str(reply["version"])

    # --- cluster view -----------------------------------------------------------------------

    def cluster_view(self, relay: str | None = None) -> dict | None:
        for r in [relay] if relay else self.live_relays():
            try:
                return d.http_json("GET", self.admin(r) + "/api/cluster")
            except (d.DockerError, OSError, ValueError):
                continue
        return None

    def active_keys(self) -> tuple[list[str], int]:
        """(active keys, origin streams expected per key). Cluster mode: the keys of the merged
        cluster view, one stream each. Independent relays: every relay's own keys."""
        if self.s.cluster_mode:
            view = self.cluster_view()
            if view is None:
                raise HarnessError("no relay answers /api/cluster")
            return [k["key"] for k in view.get("keys", [])], 1
        keys: list[str] = []
        for r in self.live_relays():
            names = d.http_json("GET", self.admin(r) + "/cache/keys").get("Names") or []
            keys += [f"{r}/{k}" for k in names]
        return keys, 1

    def busiest_owner(self) -> tuple[str, str]:
        """(relay owning the key with the most clients, that key). Without a cluster view
        (independent relays), relay-1 and its busiest key."""
        if not self.s.cluster_mode:
            return self.s.relay_names()[0], "?"
        view = self.cluster_view()
        if not view or not view.get("keys"):
            raise HarnessError("no active keys in /api/cluster: cannot pick the busiest key's owner")
        if view.get("keys"):
            key = max(view["keys"], key=lambda k: (k.get("local_clients") or 0, k["key"]))
            owner = key.get("owner")
            if owner in self.s.relay_names():
                return owner, key["key"]
            raise HarnessError(f"owner {owner!r} of {key['key']} is not a relay service name")
        raise HarnessError("unreachable")

    def wait_cluster_formed(self, timeout: float = 45) -> None:
        if not self.s.cluster_mode:
            return
        want = set(self.s.relay_names())
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            ok = True
            for r in self.s.relay_names():
                view = self.cluster_view(r)
                members = {m.get("name") for m in (view or {}).get("members", []) if m.get("alive", True) and m.get("state", "ready") in ("ready", "Ready")}
                last = (r, sorted(members))
                if not want <= members:
                    ok = False
                    break
            if ok:
                return
            time.sleep(0.5)
        raise HarnessError(f"cluster did not form within {timeout:.0f}s (last view {last})")

    # --- records ----------------------------------------------------------------------------

    def records(self) -> list[inv.Record]:
        recs, _ = inv.load_records(sorted((self.run_dir / "records").glob("*.jsonl")))
        return recs

    def all_nodes(self) -> list[str]:
        return [n for ns in self.nodes_by_group.values() for n in ns]

    def by_progress_types(self, nodes: list[str]) -> list[tuple[tuple[str, ...] | None, list[str]]]:
        """`nodes` split by the types whose version must reach a new publish (None: every
        type they receive; delta clients: EDS only, see Settings.progress_types)."""
        out: dict[tuple[str, ...] | None, list[str]] = defaultdict(list)
        for n in nodes:
            out[self.s.progress_types(self.kind_of.get(n, "loadgen"))].append(n)
        return list(out.items())

    def pending_version(self, records: list[inv.Record], version: str, nodes: list[str]) -> set[str]:
        pending: set[str] = set()
        for types, ns in self.by_progress_types(nodes):
            pending |= inv.clients_with_version_at_least(records, version, ns, types)[1]
        return pending

    def convergence(self, records: list[inv.Record], version: str, t0: float, bound_ms: float, nodes: list[str]) -> inv.Convergence:
        out = inv.Convergence()
        for types, ns in self.by_progress_types(nodes):
            c = inv.check_convergence(records, version, t0, bound_ms, ns, types)
            out.violations += c.violations
            out.per_client_ms.update(c.per_client_ms)
        if out.per_client_ms:
            out.slowest_ms = max(out.per_client_ms.values())
        return out

    def wait_clients_reach(self, version: str, nodes: list[str], timeout: float) -> tuple[bool, set[str]]:
        deadline = time.monotonic() + timeout
        pending: set[str] = set(nodes)
        while time.monotonic() < deadline:
            pending = self.pending_version(self.records(), version, nodes)
            if not pending:
                return True, set()
            time.sleep(0.5)
        return False, pending

    def is_steady(self, node: str, rs: list[inv.Record]) -> bool:
        """A client is steady when it has received every type it subscribes to and at least
        two versions of each type that moves with every publish (delta: EDS only); a grpcio
        client also needs a successful RPC."""
        kind = self.kind_of.get(node, "loadgen")
        vs: dict[str, set] = defaultdict(set)
        for r in rs:
            if r.event == "response" and r.type:
                vs[r.type].add(r.version)
        want = self.s.subscribed_types(kind)
        if not all(vs.get(t) for t in want):
            return False
        progress = self.s.progress_types(kind)
        if not all(len(vs[t]) >= 2 for t in (progress if progress is not None else want)):
            return False
        return kind != "grpc" or any(r.event == "rpc_ok" for r in rs)

    def wait_steady(self) -> None:
        """Every client is steady (`is_steady`)."""
        deadline = time.monotonic() + self.steady_timeout
        nodes = self.all_nodes()
        not_ready = nodes
        while time.monotonic() < deadline:
            grouped = inv.by_node(self.records())
            not_ready = [n for n in nodes if not self.is_steady(n, grouped.get(n, []))]
            if not not_ready:
                return
            time.sleep(0.5)
        files = {p.name: p.stat().st_size for p in (self.run_dir / "records").glob("*.jsonl")}
        raise HarnessError(f"clients not in steady state after {self.steady_timeout:.0f}s ({len(nodes) - len(not_ready)}/{len(nodes)} ready; "
                           f"not ready e.g. {not_ready[:5]}; record files {files})")

    # --- invariant helpers used during the run -----------------------------------------------

    def violation(self, text: str) -> None:
        self.log(f"VIOLATION {text}")
        self.result.violations.append(text)

    def check_origin_streams(self, phase: str, timeout: float = 30) -> None:
        """Polls until origin streams == active keys (ownership changes settle); a violation if
        they never match within `timeout`."""
        deadline = time.monotonic() + timeout
        last: list[inv.Violation] = []
        keys: list[str] = []
        while True:
            try:
                keys, per_key = self.active_keys()
                last = inv.check_origin_streams(self.origin_stats(), keys, per_key) if keys else [
                    inv.Violation("origin-streams", None, "no active keys")]
            except (d.DockerError, OSError, HarnessError, ValueError) as e:
                last = [inv.Violation("origin-streams", None, f"cannot read: {e}")]
            if not last or time.monotonic() > deadline:
                break
            time.sleep(1)
        if not last:
            self.log(f"{phase}: origin streams = {len(keys)} active keys")
        for v in last:
            self.violation(f"{phase}: {v}")

    def disturb(self, target: str, t0: float, t1: float | None = None) -> None:
        """Marks [t0, t1 + grace] as a window in which clients of `target` (a relay or "lb")
        may lose their streams. t1=None: until healed (closed by `close_disturbances`)."""
        self.disturbed[target].append([t0 - 1000, (t1 + self.grace_ms) if t1 is not None else None])

    def close_disturbances(self, t: float) -> None:
        for windows in self.disturbed.values():
            for w in windows:
                if w[1] is None:
                    w[1] = t + self.grace_ms

    def allowed_windows(self) -> dict[str, list[tuple[float, float]]]:
        """Per client node: when it may disconnect. Direct clients of relay-N: when relay-N was
        disturbed. LB clients: whenever any relay or the LB was (their relay is unknown)."""
        out: dict[str, list[tuple[float, float]]] = defaultdict(list)
        all_windows = [tuple(w) for ws in self.disturbed.values() for w in ws if w[1] is not None]
        for group, nodes in self.nodes_by_group.items():
            target = self.s.client_groups()[group][0]
            windows = all_windows if target == "lb" else [tuple(w) for w in self.disturbed.get(target, []) if w[1] is not None]
            for n in nodes:
                out[n] = list(windows)
        return out

    def survivors(self) -> list[str]:
        """Direct clients of relays not disturbed so far."""
        return [n for g, ns in self.nodes_by_group.items()
                if (t := self.s.client_groups()[g][0]) != "lb" and t not in self.disturbed for n in ns]

    def hold(self, seconds: float, progress: bool = True, bound: float = 10.0) -> None:
        """Keeps the fault for `seconds`. With progress: publishes a version right away and
        requires the clients of undisturbed relays to receive it within `bound` seconds (the
        failover time), while the fault lasts."""
        t0 = time.monotonic()
        if progress and self.survivors():
            v = self.publish()
            t_pub = now_ms()
            ok, pending = self.wait_clients_reach(v, self.survivors(), min(bound, seconds))
            if ok:
                conv = self.convergence(self.records(), v, t_pub, bound * 1000.0, self.survivors())
                self.result.failover_ms = conv.slowest_ms
            else:
                self.violation(f"during the fault: {len(pending)} clients of undisturbed relays did not receive version {v} within {bound:.0f}s (e.g. {sorted(pending)[:5]})")
        rest = seconds - (time.monotonic() - t0)
        if rest > 0:
            time.sleep(rest)

    # --- the run ----------------------------------------------------------------------------

    def run(self, scenario) -> Result:
        t_start = time.monotonic()
        self.grace_ms = scenario.bound_s * 1000.0
        try:
            self._run(scenario)
        except (HarnessError, d.DockerError) as e:
            self.result.error = str(e)
            self.log(f"ERROR {e}")
        except Exception as e:  # noqa: BLE001 - a harness bug must not skip the teardown or the other scenarios
            self.result.error = f"{type(e).__name__}: {e}"
            self.log(f"ERROR {self.result.error}")
        except KeyboardInterrupt:
            self.result.error = "interrupted"
            raise
        finally:
            try:
                (self.run_dir / "compose.log").write_text(self.compose.logs())
            except Exception as e:  # noqa: BLE001 - best effort
                self.log(f"could not save logs: {e}")
            if not self.keep:
                self.compose.down()
            self.result.duration_s = time.monotonic() - t_start
            (self.run_dir / "result.json").write_text(json.dumps(self.result.__dict__, indent=2, default=str))
        return self.result

    def _run(self, scenario) -> None:
        s = self.s
        if s.tls:
            tls_dir, rogue_dir = tls_dirs(self.run_dir)
            try:
                tls.generate(tls_dir, s.relay_names())
                tls.generate_rogue(rogue_dir)
            except (tls.TlsError, OSError) as e:
                raise HarnessError(f"cannot make the run's certificates: {e}") from e
        self.compose.down()  # leftovers of an interrupted run
        self.log(f"up: origin, {s.relays} relays, lb ({self.compose_file.name})")
        infra = ["origin", "backend", *s.relay_names(), "lb"]
        self.compose.up(infra)
        d.wait_healthy([self.cid(x) for x in infra], timeout=90)
        self.wait_cluster_formed()
        kinds = defaultdict(int)
        for g in s.groups():
            kinds[g.kind] += g.count
        self.log(f"clients: {s.total_clients()} in {len(s.client_groups())} groups ({', '.join(f'{n} {k}' for k, n in kinds.items())})")
        self._pub_start = self.sample_publishes()
        self.compose.up(list(s.client_groups()))
        self.wait_steady()
        self.check_origin_streams("steady state before the fault")
        fault_t = now_ms()
        self.log(f"fault: {scenario.summary}")
        self.result.fault = scenario.inject_and_heal(self) or scenario.summary
        heal_t = now_ms()
        self.close_disturbances(heal_t)
        target = self.publish()
        self.log(f"healed after {(heal_t - fault_t) / 1000:.1f}s; target version {target}")
        self.wait_clients_reach(target, self.all_nodes(), scenario.bound_s + 5)
        self.check_origin_streams("steady state after healing", timeout=scenario.settle_s)
        end_t = now_ms()
        self.result.versions_published = self.sample_publishes() - self._pub_start
        time.sleep(0.5)
        self.compose("stop", "-t", "2", *s.client_groups(), check=False)
        records = self.records()
        self.evaluate(records, target, fault_t, heal_t, end_t, scenario)

    def evaluate(self, records: list[inv.Record], target: str, fault_t: float, heal_t: float, end_t: float, scenario) -> None:
        window = [r for r in records if r.t <= end_t]
        nodes = self.all_nodes()
        found: list[inv.Violation] = []
        found += inv.check_clients_active(window, nodes, min_responses=2)
        found += inv.check_monotonic(window)
        found += inv.check_nonempty(window, [t for t in ("cds", "lds") if t in self.s.types.split(",")])
        allowed = self.allowed_windows()
        found += inv.check_no_disconnects(window, nodes, until=end_t, allowed=allowed)
        found += inv.check_client_status(window, nodes)
        found += inv.check_origin(window, self.s.nodes_of_kind("loadgen", "delta"), self.s.origin_clusters)
        grpc_nodes = self.s.nodes_of_kind("grpc")
        if grpc_nodes:
            found += inv.check_rpcs(window, grpc_nodes, allowed=allowed)
            tolerated = inv.rpc_errors_in_windows(window, grpc_nodes, allowed)
            if tolerated:
                self.result.notes.append(f"{tolerated} RPC errors of grpcio clients inside their disturbance windows (allowed)")
        conv = self.convergence(window, target, heal_t, scenario.bound_s * 1000.0, nodes)
        found += conv.violations
        self.result.convergence_ms = conv.slowest_ms
        for v in found:
            self.violation(str(v))

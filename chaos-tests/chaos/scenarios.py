"""The fault scenarios. Each injects its fault, holds it, heals it, and says which relays' (or
the LB's) clients may lose their streams meanwhile (`h.disturb`); every other client must keep
its stream. `hold` also requires the clients of undisturbed relays to keep receiving new
versions during the fault.

| name            | fault                                                             | may disconnect             |
|-----------------|-------------------------------------------------------------------|----------------------------|
| kill-owner      | SIGKILL the owner of the busiest key, 10 s, start it again        | its clients, LB clients    |
| drain           | SIGTERM (docker stop -t 30) the owner of the busiest key, restart | its clients, LB clients    |
| rolling-restart | docker stop -t 30 / start every relay in turn, waiting for health | each relay's own clients   |
| partition       | cut the busiest key's owner off the peer network for 15 s         | nobody                     |
| isolate         | cut the busiest key's owner off every network for 15 s            | its clients, LB clients    |
| origin-outage   | stop the origin for 30 s                                          | nobody                     |
| lb-restart      | docker restart the LB                                             | LB clients                 |
| netem           | 200±50 ms latency and 5% loss on the busiest key's owner, 20 s    | LB clients (see Netem)     |
| rogue-node      | a node with another gossip key, another CA and its own origin     | nobody                     |
|                 | tries to join (seeds = the real relays) for 30 s                  |                            |
| cold-restart-   | stop the origin, stop every relay, start them again: the clients  | every relay's, LB clients  |
|   origin-down   | get last-known-good from disk; start the origin after 20 s        |                            |
"""

from __future__ import annotations

import time

from . import docker as d
from .harness import Harness, HarnessError, now_ms
from .project import ROGUE_SERVICES


class Scenario:
    name = ""
    summary = ""
    bound_s = 15.0  # every client has the target version this long after healing
    settle_s = 30.0  # origin streams == keys again within this long after convergence

    def inject_and_heal(self, h: Harness) -> str:
        raise NotImplementedError


class KillOwner(Scenario):
    name = "kill-owner"
    summary = "kill -9 the owner of the busiest key for 10s, then start it"

    def inject_and_heal(self, h: Harness) -> str:
        owner, key = h.busiest_owner()
        cid = h.cid(owner)
        t0 = now_ms()
        h.disturb(owner, t0)
        d.kill(cid, "KILL")
        h.hold(10)
        d.start(cid)
        d.wait_healthy([cid], timeout=60)
        h.wait_cluster_formed()
        return f"kill -9 {owner} (owner of {key}) 10s"


class Drain(Scenario):
    name = "drain"
    summary = "SIGTERM the owner of the busiest key (drain), restart it after 5s"

    def inject_and_heal(self, h: Harness) -> str:
        owner, key = h.busiest_owner()
        cid = h.cid(owner)
        t0 = now_ms()
        h.disturb(owner, t0)
        took = d.stop(cid, timeout_s=30)
        h.result.notes.append(f"{owner} stopped {took:.1f}s after SIGTERM")
        if took > 25:
            h.violation(f"{owner} needed {took:.0f}s to drain (SIGKILL at 30s)")
        h.hold(5)
        d.start(cid)
        d.wait_healthy([cid], timeout=60)
        h.wait_cluster_formed()
        return f"SIGTERM {owner} (owner of {key}), drained in {took:.1f}s"


class RollingRestart(Scenario):
    name = "rolling-restart"
    summary = "docker stop -t 30 / start every relay in turn"
    bound_s = 20.0

    def inject_and_heal(self, h: Harness) -> str:
        took = []
        for r in h.s.relay_names():
            cid = h.cid(r)
            t0 = now_ms()
            took.append(d.stop(cid, timeout_s=30))
            d.start(cid)
            d.wait_healthy([cid], timeout=60)
            h.wait_cluster_formed()
            h.disturb(r, t0, now_ms())
            time.sleep(3)
        return f"rolling restart of {len(took)} relays (drains {', '.join(f'{t:.1f}s' for t in took)})"


def _network(h: Harness, name: str) -> str:
    """The full name of a project network (compose prefixes it with the project)."""
    for net in d.attachments(h.cid("origin")).keys() | d.attachments(h.cid("relay-1")).keys():
        if net.endswith("_" + name) or net.endswith("-" + name) or net == name:
            return net
    raise HarnessError(f"network {name} not found")


class Partition(Scenario):
    name = "partition"
    summary = "cut the busiest key's owner off the peer network (gossip + peer) for 15s"

    def inject_and_heal(self, h: Harness) -> str:
        owner, key = h.busiest_owner()
        cid = h.cid(owner)
        net = _network(h, "cluster")
        att = d.disconnect(cid, net)
        h.hold(15)
        d.reconnect(cid, att)
        h.wait_cluster_formed(timeout=60)
        return f"{owner} (owner of {key}) cut off from its peers 15s"


class Isolate(Scenario):
    name = "isolate"
    summary = "cut the busiest key's owner off every network for 15s"
    # Measured 2.6-2.9 s. A relay that kept its half-open origin connection until keepalive
    # noticed took ~11 s (its own keys stayed old that long): 8 s catches that regression.
    bound_s = 8.0

    def inject_and_heal(self, h: Harness) -> str:
        owner, key = h.busiest_owner()
        cid = h.cid(owner)
        h.disturb(owner, now_ms())
        atts = [d.disconnect(cid, n) for n in (_network(h, "cluster"), _network(h, "xds"))]
        h.hold(15)
        for att in atts:
            d.reconnect(cid, att)
        d.wait_healthy([cid], timeout=60)
        h.wait_cluster_formed(timeout=60)
        return f"{owner} (owner of {key}) isolated 15s"


class OriginOutage(Scenario):
    name = "origin-outage"
    summary = "stop the origin for 30s"
    bound_s = 15.0

    def inject_and_heal(self, h: Harness) -> str:
        cid = h.cid("origin")
        h.sample_publishes()
        d.stop(cid, timeout_s=2)
        h.hold(30, progress=False)
        d.start(cid)
        d.wait_healthy([cid], timeout=60)
        return "origin stopped 30s"


class LbRestart(Scenario):
    name = "lb-restart"
    summary = "restart the load balancer"

    def inject_and_heal(self, h: Harness) -> str:
        cid = h.cid("lb")
        h.disturb("lb", now_ms())
        t0 = time.monotonic()
        d.restart(cid, timeout_s=2)
        d.wait_healthy([cid], timeout=60)
        h.hold(2)
        return f"LB restarted ({time.monotonic() - t0:.1f}s)"


class Netem(Scenario):
    name = "netem"
    summary = "latency and loss on the busiest key's owner for 20s"
    bound_s = 20.0

    def inject_and_heal(self, h: Harness) -> str:
        owner, key = h.busiest_owner()
        cid = h.cid(owner)
        # The loss also hits the LB's health checks of the owner (TCP connect, 500 ms timeout,
        # every 500 ms): two lost in a row and HAProxy marks it DOWN and cuts the streams it
        # holds (on-marked-down shutdown-sessions), as it must for a relay that looks dead.
        # So the LB's clients may lose their streams; the owner's direct clients may not.
        h.disturb("lb", now_ms())
        applied = d.degrade(cid, delay_ms=200, jitter_ms=50, loss_pct=5.0)
        if "no latency" in applied:
            h.result.notes.append("kernel without sch_netem: loss only, via iptables")
        try:
            h.hold(20, bound=15)
        finally:
            d.restore(cid)
        return f"{owner} (owner of {key}): {applied}, 20s"


class RogueNode(Scenario):
    """A node that is not one of ours joins the network: the rogue relay (same cluster_id,
    the real relays as seeds, another gossip key, a certificate of another CA) relaying from
    its own origin (other versions, other clusters). Nothing may change for the clients: no
    disconnects, versions keep coming, and every response carries the real origin's marks
    (the `origin` check, always on). The relays must show it: each real relay's
    gossip_rejected_total grows, and no relay lists it as a member. Its logs go to
    <run>/rogue.log."""

    name = "rogue-node"
    summary = "a node with another gossip key, another CA and its own origin tries to join for 30s"
    hold_s = 30.0

    def inject_and_heal(self, h: Harness) -> str:
        if not h.s.tls:
            raise HarnessError("rogue-node needs TLS and gossip keys (run without --insecure)")
        if not h.s.cluster_mode:
            raise HarnessError("rogue-node needs cluster mode")
        before = h.gossip_rejections()
        h.compose.up(list(ROGUE_SERVICES))
        try:
            h.hold(self.hold_s)
            rogue = h.cid("rogue-relay")
            running = d.inspect(rogue).get("State", {}).get("Running")
            if not running:
                h.result.notes.append("the rogue relay was not running at the end of the hold (see compose.log)")
            after = h.gossip_rejections()
            members = {m.get("name") for r in h.s.relay_names() for m in (h.cluster_view(r) or {}).get("members", [])}
        finally:
            # Its logs, then it goes (compose.log is collected after the rogue node is gone).
            logs = h.compose("logs", "--no-color", "-t", *ROGUE_SERVICES, check=False)
            if logs is not None:
                (h.run_dir / "rogue.log").write_text(logs.stdout + logs.stderr)
            h.compose("rm", "-f", "-s", *ROGUE_SERVICES, check=False)
        grew = rogue_rejections(before, after)
        for relay, (b, a) in grew.items():
            if a is None:
                h.violation(f"{relay} exports no gossip_rejected_total")
            elif a <= (b or 0):
                h.violation(f"{relay}: gossip_rejected_total did not grow while the rogue node gossiped ({b} -> {a})")
        if "rogue" in members:
            h.violation("a relay lists the rogue node as a member of the cluster")
        counts = ", ".join(f"{r} +{(a or 0) - (b or 0)}" for r, (b, a) in grew.items())
        return f"rogue node (other gossip key, other CA, own origin) {self.hold_s:.0f}s: gossip_rejected_total {counts}"


class ColdRestartOriginDown(Scenario):
    """The control plane is down and the whole relay tier restarts (a cold start during an
    outage). Every relay serves what it persisted (`cache.persist_dir`): every client must get
    its config again from the restarted relays while the origin is still down, at the version
    it had (the monotonic check catches an older one); when the origin returns, every client
    moves to the current version on the stream it has."""

    name = "cold-restart-origin-down"
    summary = "stop the origin, restart every relay, serve from disk 20s, start the origin"
    bound_s = 20.0
    # Reconnected clients must have their config from disk within this long of the relays
    # being back in the cluster.
    served_s = 20.0

    def inject_and_heal(self, h: Harness) -> str:
        origin = h.cid("origin")
        h.sample_publishes()
        d.stop(origin, timeout_s=2)
        relays = h.s.relay_names()
        cids = [h.cid(r) for r in relays]
        t0 = now_ms()
        for r in relays:
            h.disturb(r, t0)
        h.disturb("lb", t0)
        stops = [d.stop(cid, timeout_s=30) for cid in cids]
        # Every relay is down: a response recorded from now on came from a restarted relay.
        down = now_ms()
        for cid in cids:
            d.start(cid)
        d.wait_healthy(cids, timeout=60)
        h.wait_cluster_formed(timeout=60)
        # The recording xDS clients log every response; grpcio's client logs a version only
        # when it changes (CSDS), and keeps serving RPCs from what it holds (check_rpcs).
        nodes = h.s.nodes_of_kind("loadgen", "delta")
        deadline = time.monotonic() + self.served_s
        unserved = set(nodes)
        while unserved and time.monotonic() < deadline:
            unserved = unserved_since(h.records(), unserved, down)
            if unserved:
                time.sleep(0.5)
        if unserved:
            h.violation(f"with the origin down, {len(unserved)} of {len(nodes)} clients got no config from the restarted relays "
                        f"within {self.served_s:.0f}s (e.g. {sorted(unserved)[:5]})")
        served_in = (now_ms() - down) / 1000.0
        h.hold(max(0.0, 20.0 - served_in), progress=False)
        d.start(origin)
        d.wait_healthy([origin], timeout=60)
        return (f"origin down, {len(relays)} relays restarted (stops {', '.join(f'{s:.1f}s' for s in stops)}); "
                f"{len(nodes) - len(unserved)}/{len(nodes)} clients served from disk {served_in:.1f}s after every relay was down")


def unserved_since(records: list, nodes: set[str], t: float) -> set[str]:
    """The clients among `nodes` with no response recorded after `t` (unix ms)."""
    served = {r.node for r in records if r.event == "response" and r.t >= t}
    return {n for n in nodes if n not in served}


def rogue_rejections(before: dict[str, int | None], after: dict[str, int | None]) -> dict[str, tuple[int | None, int | None]]:
    """relay -> (rejections before, after), for the relays sampled both times."""
    return {r: (before[r], after[r]) for r in sorted(before) if r in after}


ALL = [KillOwner(), Drain(), RollingRestart(), Partition(), Isolate(), OriginOutage(), LbRestart(), Netem(), RogueNode(),
       ColdRestartOriginDown()]
BY_NAME = {s.name: s for s in ALL}

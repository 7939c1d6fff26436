#!/usr/bin/env python3
"""Serve the relay's ring page with a made-up cluster, for developing the page without a cluster.

    python3 tests/browser/serve_sample.py [--port 8070] [--members 3] [--dead relay-3] [--keys 40]

Routes (like the relay's admin server):
    GET /ring         src/admin/ring.html, read from disk on every request (edit and reload)
    GET /api/cluster  a sample cluster view in the exact schema the relay serves
    GET /             redirect to /ring

The sample is deterministic for a given --seed: members relay-1..relay-N (relay-1 answers), the
ring built from --vnodes virtual nodes per live member (consecutive virtual nodes of one owner
merged into one token, like `Ring::tokens`), keys placed by a hash and owned by the first token
at or after their position. Ages grow with wall time. `--json FILE` serves a fixed file instead
(e.g. one captured from a real relay with `curl`), `--fail-after N` answers 503 after N
successful /api/cluster responses (to see the page's error banner).

On start it prints one line, `serving http://HOST:PORT/ring`, and flushes stdout (the self-test
of check_ring_page.py reads it to learn the port when started with --port 0).
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import random
import socketserver
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_PAGE = HERE.parent.parent / "src" / "admin" / "ring.html"

TYPE = "type.googleapis.com/"
TYPES = {
    "cds": TYPE + "envoy.config.cluster.v3.Cluster",
    "lds": TYPE + "envoy.config.listener.v3.Listener",
    "rds": TYPE + "envoy.config.route.v3.RouteConfiguration",
    "eds": TYPE + "envoy.config.endpoint.v3.ClusterLoadAssignment",
    "sds": TYPE + "envoy.extensions.transport_sockets.tls.v3.Secret",
    "rtds": TYPE + "envoy.service.runtime.v3.Runtime",
    "custom": TYPE + "example.acme.v1.RateLimitPolicy",
}


def fraction(text: str) -> float:
    """A stable position in [0, 1) for a string (the relay uses FNV-1a; any hash will do here)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2.0**64


def key_names(count: int) -> list[tuple[str, str]]:
    envs = ["prod", "staging", "canary", "dev", "perf"]
    services = ["checkout", "payments", "search", "catalog", "auth", "cart", "reviews", "inventory", "shipping"]
    names: list[tuple[str, str]] = []
    for env in envs:
        names += [(f"{env}_cds", "cds"), (f"{env}_lds", "lds")]
    i = 0
    while len(names) < count:
        env, svc = envs[i % len(envs)], services[(i // len(envs)) % len(services)]
        kind = ["eds", "rds", "eds", "sds", "eds", "rtds", "custom"][i % 7]
        suffix = "" if i < len(envs) * len(services) else f"_{i // (len(envs) * len(services))}"
        names.append((f"{env}_{kind}_{svc}{suffix}", kind))
        i += 1
    return names[:count]


class Sample:
    def __init__(self, members: int, dead: set[str], keys: int, vnodes: int, seed: int):
        self.started = time.time()
        self.seed = seed
        self.vnodes = vnodes
        self.names = [f"relay-{i}" for i in range(1, members + 1)]
        self.dead = dead
        rnd = random.Random(seed)
        base_gen = 1763800000000
        self.members = []
        for i, name in enumerate(self.names):
            state = "ready"
            if members >= 5 and i == members - 2:
                state = "draining"
            if members >= 6 and i == members - 3:
                state = "joining"
            self.members.append({
                "name": name,
                "generation": base_gen + i * 1117,
                "gossip_addr": f"127.0.0.1:{7946 + i}",
                "peer_addr": f"127.0.0.1:{9992 + i * 10}",
                "admin_addr": f"127.0.0.1:{6070 + i * 10}",
                "state": state,
                "alive": name not in dead,
                "is_self": i == 0,
                "hb_base": (45_000 + rnd.randint(0, 5000)) if name in dead else None,
            })
        live = [m["name"] for m in self.members if m["alive"]]
        vtokens = sorted((fraction(f"{name}#{v}"), name) for name in live for v in range(vnodes))
        # Merge consecutive virtual nodes of one owner: keep the token ending each run.
        self.tokens: list[tuple[float, str]] = []
        for i, (pos, owner) in enumerate(vtokens):
            if i + 1 < len(vtokens) and vtokens[i + 1][1] == owner:
                continue
            self.tokens.append((pos, owner))
        self.keys = []
        for i, (key, kind) in enumerate(key_names(keys)):
            pos = fraction(key)
            owner = self.owner(pos)
            others = [n for n in live if n != owner]
            followers = sorted(rnd.sample(others, rnd.randint(0, len(others)))) if others else []
            self.keys.append({
                "key": key, "kind": kind, "position": pos, "owner": owner, "followers": followers,
                "clients": {n: rnd.randint(0 if n == owner else 1, 12) for n in ([owner] if owner else []) + followers},
                "updated": self.started - rnd.uniform(0.5, 900),
                "nacks": {n: (rnd.randint(1, 3) if rnd.random() < 0.06 else 0) for n in ([owner] if owner else []) + followers},
                "period": rnd.choice([0, 0, 0, 15, 30, 60]),
            })

    def owner(self, pos: float) -> str | None:
        if not self.tokens:
            return None
        for tpos, owner in self.tokens:
            if tpos >= pos:
                return owner
        return self.tokens[0][1]

    def view(self) -> dict:
        now = time.time()
        elapsed = now - self.started
        members = []
        for m in self.members:
            out = {k: v for k, v in m.items() if k != "hb_base"}
            if m["alive"]:
                out["last_heartbeat_age_ms"] = int(random.uniform(20, 950))
            else:
                out["last_heartbeat_age_ms"] = int(m["hb_base"] + elapsed * 1000)
            members.append(out)
        keys = []
        for k in self.keys:
            updated = k["updated"]
            if k["period"]:
                updated = max(updated, self.started + (elapsed // k["period"]) * k["period"])
            version = str(int(updated * 1000))
            age = now - updated
            nodes = []
            for n, clients in k["clients"].items():
                source = "origin" if n == k["owner"] else f"peer:{k['owner']}"
                nodes.append({"node": n, "source": source, "local_clients": clients, "version": version,
                              "age_seconds": round(age + (0 if n == k["owner"] else 0.01), 3), "nacks": k["nacks"][n]})
            keys.append({
                "key": k["key"], "type_url": TYPES[k["kind"]], "position": k["position"], "owner": k["owner"],
                "followers": k["followers"], "version": version, "age_seconds": round(age, 3),
                "local_clients": sum(k["clients"].values()), "nacks": sum(k["nacks"].values()), "nodes": nodes,
            })
        keys.sort(key=lambda k: k["key"])
        return {
            "node": self.names[0],
            "cluster_id": "xds-relay",
            "view_version": 12 + int(elapsed // 10),
            "members": members,
            "ring": {"virtual_nodes": self.vnodes, "tokens": [{"position": p, "owner": o} for p, o in self.tokens]},
            "keys": keys,
            "errors": [f"{name}: unreachable: connection refused" for name in self.names if name in self.dead],
        }


def make_handler(page: Path, sample: Sample | None, fixed: Path | None, fail_after: int | None, quiet: bool):
    served = {"ok": 0}
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "serve_sample/1"

        def log_message(self, fmt, *args):  # noqa: N802 (stdlib name)
            if not quiet:
                sys.stderr.write("serve_sample: " + (fmt % args) + "\n")

        def send(self, status: int, body: bytes, ctype: str, extra: dict | None = None):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_HEAD(self):  # noqa: N802
            self.do_GET()

        def do_GET(self):  # noqa: N802
            path = self.path.split("?", 1)[0]
            if path == "/":
                self.send(302, b"", "text/plain", {"Location": "/ring"})
            elif path == "/ring":
                try:
                    body = page.read_bytes()
                except OSError as e:
                    self.send(500, f"cannot read {page}: {e}\n".encode(), "text/plain; charset=utf-8")
                    return
                self.send(200, body, "text/html; charset=utf-8")
            elif path == "/api/cluster":
                with lock:
                    if fail_after is not None and served["ok"] >= fail_after:
                        self.send(503, b"sample: failing on purpose (--fail-after)\n", "text/plain; charset=utf-8")
                        return
                    served["ok"] += 1
                body = fixed.read_bytes() if fixed else json.dumps(sample.view(), indent=2).encode()
                self.send(200, body, "application/json")
            else:
                self.send(404, b"not found\n", "text/plain; charset=utf-8")

    return Handler


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8070, help="0 picks a free port (default 8070)")
    ap.add_argument("--page", type=Path, default=DEFAULT_PAGE, help="the HTML to serve at /ring")
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--dead", default=None, help="comma-separated dead members (default: the last one)")
    ap.add_argument("--keys", type=int, default=40)
    ap.add_argument("--vnodes", type=int, default=128)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", type=Path, help="serve this file at /api/cluster instead of the generated sample")
    ap.add_argument("--fail-after", type=int, help="answer 503 after this many successful /api/cluster responses")
    ap.add_argument("--quiet", action="store_true", help="no request log on stderr")
    args = ap.parse_args(argv)

    if args.members < 1:
        ap.error("--members must be at least 1")
    dead = {f"relay-{args.members}"} if args.dead is None else {d.strip() for d in args.dead.split(",") if d.strip()}
    sample = None if args.json else Sample(args.members, dead, args.keys, args.vnodes, args.seed)
    handler = make_handler(args.page, sample, args.json, args.fail_after, args.quiet)
    with Server((args.host, args.port), handler) as httpd:
        host, port = httpd.server_address[:2]
        print(f"serving http://{host}:{port}/ring", flush=True)
        try:
            httpd.serve_forever()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

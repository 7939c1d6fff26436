"""The compose project of one chaos scenario: compose file, relay bootstraps, client groups.

The compose file depends only on the number of relays; everything else comes from the
environment that run.py sets (see `compose_env`). chaos-tests/docker-compose.yml is the
rendering for three relays (run.py uses it as is; other relay counts are rendered into the run
directory); a unit test keeps the two identical.

Networks:
  xds      origin, relays, LB and clients (xDS traffic, admin, origin)
  cluster  relays only: gossip (UDP 7946) and the peer protocol (TCP 9992). Each relay is
           reachable there as relay-N-peer, its advertise_host, so cutting a relay off this
           network partitions it from its peers while its clients and the origin still reach it.
Both networks get fixed subnets so a disconnected relay can be reconnected with the same
address (`docker network connect --ip` needs a configured subnet).

Clients, one container per group, each writing its records to $CHAOS_RUN_DIR/records/:
  client-rN     xds-loadgen (ADS, SotW) straight to relay-N: node ids rN-<i>. These tell
                whether a client of a relay that was not disturbed kept its stream.
  client-lb     xds-loadgen (ADS, SotW) through the LB: node ids lb-<i>.
  client-delta  xds-loadgen (ADS, delta) through the LB: node ids dlb-<i>.
  grpc-rN       grpcio xDS clients (xds-relay-grpc-client, one process = one XdsClient each)
                straight to relay-N: node ids g-rN-<i>, records grpc-rN-<i>.jsonl.
  grpc-lb       grpcio xDS clients through the LB: node ids g-lb-<i>.
The loadgen clients use node cluster "chaos-<i>", so SotW and delta clients share the keys
chaos_cds, chaos_eds, chaos_lds and chaos_rds_<route> (example aggregation rules); the grpcio
clients use "grpc-<i>" (keys grpc_lds, grpc_rds_route_0, grpc_cds, grpc_eds: they subscribe to
names, not the wildcard, so they must not share the loadgen's keys).

The grpcio clients open xds:///example-service; the origin answers with an API listener ->
route_0 -> cluster_0 whose endpoint is one of two greeter backends (service `backend`, a fixed
address of the xds network, ports 50051 and 50052: the origin's --endpoints takes IP:port, not
host names), moving to the other backend on every publish. So their RPCs go where the EDS
pushed through the relays says.

Security (`Settings.tls`, the default): every link is mTLS and gossip is sealed, with the
secrets deploy/tls/gen-certs.sh makes into $CHAOS_TLS_DIR (chaos/tls.py): each relay mounts its
own relay-N.pem/.key, ca.pem, gossip.keys and admin.token at /etc/xds-relay/tls/; the origin
serves xDS over mTLS (origin.pem, client CA ca.pem); the loadgen clients dial https:// with
client-loadgen.pem, the grpcio clients use bootstrap channel_creds `tls` with
client-grpc-client.pem. The relays' certificates carry their service names and `lb` (the LB
passes TLS through), so every client verifies the name it dials. Without TLS the bootstraps
say `cluster.insecure: true` and the rendering has no TLS mounts (rendered into the run
directory, like other relay counts).

Rogue node (services `rogue-origin` and `rogue-relay`, started only by the rogue-node
scenario): a relay with its own secrets from another CA ($CHAOS_ROGUE_TLS_DIR: another gossip
key, certificates of another CA), the real cluster_id and the real relays as seeds, on both
networks (`rogue-peer` on the cluster network), relaying from its own origin, which publishes
something else (random "v<n>" versions, ROGUE_CLUSTERS clusters).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent  # chaos-tests/
CHECKED_IN_COMPOSE = HERE / "docker-compose.yml"
DEFAULT_RELAYS = 3
# The loadgen's SotW streams see every type's version move on every publish; a delta client
# gets a response only when a resource changes, and the example origin changes only the
# ClusterLoadAssignments (they carry the version) on a publish.
ALL_TYPES = ("cds", "eds", "lds", "rds")
DELTA_PROGRESS_TYPES = ("eds",)
BACKEND_PORTS = (50051, 50052)
# Where the relays find their secrets (mounted file by file from $CHAOS_TLS_DIR).
TLS_MOUNT = "/etc/xds-relay/tls"
CLUSTER_ID = "xds-relay-chaos"
# The rogue origin's snapshot differs from the real one (3 clusters) in size and versions.
ROGUE_CLUSTERS = 9
ROGUE_SERVICES = ("rogue-origin", "rogue-relay")


@dataclass(frozen=True)
class Group:
    """One client container."""

    name: str  # compose service
    target: str  # relay service name or "lb"
    count: int  # streams (loadgen) or processes (grpc)
    kind: str  # "loadgen" | "delta" | "grpc"
    prefix: str  # node ids are <prefix>-<i>

    def nodes(self) -> list[str]:
        return [f"{self.prefix}-{i}" for i in range(self.count)]


@dataclass
class Settings:
    relays: int = DEFAULT_RELAYS
    direct_clients: int = 8  # streams per client-rN container
    lb_clients: int = 16  # streams of the client-lb container
    types: str = "cds,eds,lds,rds"
    origin_interval: str = "2s"
    origin_clusters: int = 3
    origin_listeners: int = 2
    cluster_mode: bool = True  # False: bootstraps without `cluster:` (independent relays)
    tag: str = "dev"
    gossip_interval: str = "200ms"
    loadgen_protocol: str = "sotw"
    loadgen_mode: str = "ads"
    delta_clients: int = 8  # streams of the client-delta container (through the LB); 0: none
    grpc_clients: int = 3  # processes per grpc-rN / grpc-lb container; 0: none
    tls: bool = True  # mTLS on every link and sealed gossip; False: plaintext, cluster.insecure

    def relay_names(self) -> list[str]:
        return [f"relay-{i}" for i in range(1, self.relays + 1)]

    def groups(self) -> list[Group]:
        """Every client container, in start order. Groups with a count of 0 are left out (the
        compose file still has their service; the harness does not start it)."""
        out = [Group(f"client-r{i}", f"relay-{i}", self.direct_clients, "loadgen", f"r{i}") for i in range(1, self.relays + 1)]
        out.append(Group("client-lb", "lb", self.lb_clients, "loadgen", "lb"))
        out.append(Group("client-delta", "lb", self.delta_clients, "delta", "dlb"))
        out += [Group(f"grpc-r{i}", f"relay-{i}", self.grpc_clients, "grpc", f"g-r{i}") for i in range(1, self.relays + 1)]
        out.append(Group("grpc-lb", "lb", self.grpc_clients, "grpc", "g-lb"))
        return [g for g in out if g.count > 0]

    def client_groups(self) -> dict[str, tuple[str, int]]:
        """group name -> (target relay or 'lb', streams or processes)."""
        return {g.name: (g.target, g.count) for g in self.groups()}

    def expected_nodes(self) -> dict[str, list[str]]:
        """group -> the node ids its clients use."""
        return {g.name: g.nodes() for g in self.groups()}

    def nodes_of_kind(self, *kinds: str) -> list[str]:
        return [n for g in self.groups() if g.kind in kinds for n in g.nodes()]

    def subscribed_types(self, kind: str) -> tuple[str, ...]:
        """The types a client of this kind receives (grpcio always asks for all four)."""
        return ALL_TYPES if kind == "grpc" else tuple(t for t in ALL_TYPES if t in self.types.split(","))

    def progress_types(self, kind: str) -> tuple[str, ...] | None:
        """The types whose version must move with every publish (steady state, failover,
        convergence); None: every type the client subscribes to."""
        if kind == "delta":
            return tuple(t for t in DELTA_PROGRESS_TYPES if t in self.subscribed_types(kind))
        return None

    def total_clients(self) -> int:
        return sum(g.count for g in self.groups())


def backend_ip(xds_subnet: str) -> str:
    """The greeter backend's fixed address: the .250 of the xds network (Docker hands out
    dynamic addresses from the bottom of the range)."""
    net = ipaddress.ip_network(xds_subnet)
    return str(net.network_address + min(250, net.num_addresses - 2))


def render_compose(relays: int, tls: bool = True) -> str:
    names = [f"relay-{i}" for i in range(1, relays + 1)]
    run = "${CHAOS_RUN_DIR:?set CHAOS_RUN_DIR}"
    certs = "${CHAOS_TLS_DIR:?set CHAOS_TLS_DIR}"
    rogue = "${CHAOS_ROGUE_TLS_DIR:?set CHAOS_ROGUE_TLS_DIR}"

    def relay_volumes(own: str, tls_dir: str, config: str = "config") -> list[str]:
        out = ["    volumes:", f'      - "{run}/{config}:/etc/xds-relay/config:ro"']
        if tls:
            out += [f'      - "{tls_dir}/{src}:{TLS_MOUNT}/{dst}:ro"' for src, dst in (
                (f"{own}.pem", "relay.pem"), (f"{own}.key", "relay.key"), ("ca.pem", "ca.pem"),
                ("gossip.keys", "gossip.keys"), ("admin.token", "admin.token"))]
        return out

    def client_tls_volumes(client: str) -> list[str]:
        if not tls:
            return []
        return [f'    - "{certs}/{src}:/tls/{dst}:ro"' for src, dst in (
            ("ca.pem", "ca.pem"), (f"client-{client}.pem", "client.pem"), (f"client-{client}.key", "client.key"))]

    def origin_tls(tls_dir: str) -> tuple[list[str], list[str]]:
        if not tls:
            return [], []
        args = ["      - --tls-cert=/tls/origin.pem", "      - --tls-key=/tls/origin.key", "      - --tls-client-ca=/tls/ca.pem"]
        vols = ["    volumes:"] + [f'      - "{tls_dir}/{f}:/tls/{f}:ro"' for f in ("origin.pem", "origin.key", "ca.pem")]
        return args, vols

    scheme = "https" if tls else "http"
    out = [
        "# Chaos-test project: origin, relays, LB and recording clients. Generated by",
        "# chaos-tests/chaos/project.py for %d relays%s; run.py sets the environment (CHAOS_*)." % (
            relays, ", mTLS on every link" if tls else ", plaintext"),
        "# Regenerate with `python3 run.py --render-compose > docker-compose.yml`.",
        "",
        "x-relay: &relay",
        "  image: xds-relay:${XDS_RELAY_TAG:-dev}",
        '  restart: "no"',
        "  stop_grace_period: 30s",
        "  healthcheck:",
        '    test: ["CMD", "/usr/local/bin/http-check", "6070", "/ready"]',
        "    interval: 1s",
        "    timeout: 2s",
        "    retries: 2",
        "    start_period: 5s",
        "",
        "x-client: &client",
        "  image: xds-relay-example:${XDS_RELAY_TAG:-dev}",
        '  entrypoint: ["/usr/local/bin/xds-loadgen"]',
        '  restart: "no"',
        "  healthcheck:",
        "    disable: true",
        "  volumes:",
        f'    - "{run}/records:/records"',
        *client_tls_volumes("loadgen"),
        "  networks: [xds]",
        "",
        "x-grpc-client: &grpc-client",
        "  image: xds-relay-grpc-client:${XDS_RELAY_TAG:-dev}",
        '  restart: "no"',
        "  stop_grace_period: 5s",
        "  volumes:",
        f'    - "{run}/records:/records"',
        *client_tls_volumes("grpc-client"),
        "  networks: [xds]",
        "",
        "services:",
        "  origin:",
        "    image: xds-relay-example:${XDS_RELAY_TAG:-dev}",
        '    restart: "no"',
        "    command:",
        "      - --address=0.0.0.0:18000",
        "      - --stats-address=0.0.0.0:18001",
        "      - --interval=${CHAOS_ORIGIN_INTERVAL:-2s}",
        "      - --clusters=${CHAOS_ORIGIN_CLUSTERS:-3}",
        "      - --listeners=${CHAOS_ORIGIN_LISTENERS:-2}",
        "      - --endpoints=${CHAOS_BACKEND_ENDPOINTS:-172.30.201.250:50051,172.30.201.250:50052}",
        *origin_tls(certs)[0],
        *origin_tls(certs)[1],
        "    ports:",
        '      - "127.0.0.1::18001"',
        "    healthcheck:",
        '      test: ["CMD", "/usr/local/bin/http-check", "18001", "/healthz"]',
        "      interval: 1s",
        "      timeout: 2s",
        "      retries: 2",
        "    networks: [xds]",
        "",
        "  backend:",
        "    <<: *grpc-client",
        '    entrypoint: ["/usr/local/bin/greeter_server.py"]',
        "    command:",
        *[f"      - --listen=0.0.0.0:{p}=backend-{c}" for p, c in zip(BACKEND_PORTS, "ab")],
        "    volumes: []",
        "    healthcheck:",
        '      test: ["CMD", "python3", "-c", "import socket; socket.create_connection((\'127.0.0.1\', %d), 1)"]' % BACKEND_PORTS[0],
        "      interval: 1s",
        "      timeout: 2s",
        "      retries: 2",
        "    networks:",
        "      xds:",
        "        ipv4_address: ${CHAOS_BACKEND_IP:-172.30.201.250}",
        "",
    ]
    for n in names:
        out += [
            f"  {n}:",
            "    <<: *relay",
            f"    hostname: {n}",
            f'    command: ["-c", "/etc/xds-relay/config/{n}.yaml", "-a", "/etc/xds-relay/config/aggregation-rules.yaml"]',
            *relay_volumes(n, certs),
            "    ports:",
            '      - "127.0.0.1::6070"',
            "    networks:",
            "      xds:",
            f"        aliases: [{n}]",
            "      cluster:",
            f"        aliases: [{n}-peer]",
            "",
        ]
    out += [
        "  lb:",
        "    image: xds-relay-lb:${XDS_RELAY_TAG:-dev}",
        '    restart: "no"',
        "    environment:",
        f'      XDS_RELAY_BACKENDS: "{" ".join(names)}"',
        '      LB_CHECK_INTERVAL: "500ms"',
        # Layer 4 passes TLS through (the relays see the clients' certificates); in plaintext
        # each gRPC stream is balanced on its own.
        f'      LB_MODE: "{"tcp" if tls else "http"}"',
        "    ports:",
        '      - "127.0.0.1::8404"',
        "    healthcheck:",
        '      test: ["CMD", "/usr/local/bin/http-check", "8404", "/healthz"]',
        "      interval: 1s",
        "      timeout: 2s",
        "      retries: 2",
        "    networks: [xds]",
        "",
    ]
    targets = [(f"client-r{i}", f"relay-{i}", f"r{i}", "${CHAOS_DIRECT_CLIENTS:-8}", "${CHAOS_LOADGEN_PROTOCOL:-sotw}")
               for i in range(1, relays + 1)]
    targets.append(("client-lb", "lb", "lb", "${CHAOS_LB_CLIENTS:-16}", "${CHAOS_LOADGEN_PROTOCOL:-sotw}"))
    targets.append(("client-delta", "lb", "dlb", "${CHAOS_DELTA_CLIENTS:-8}", "delta"))
    loadgen_tls = ["      - --tls-ca=/tls/ca.pem", "      - --tls-cert=/tls/client.pem", "      - --tls-key=/tls/client.key"] if tls else []
    for group, target, prefix, streams, protocol in targets:
        out += [
            f"  {group}:",
            "    <<: *client",
            "    command:",
            f"      - --target={scheme}://{target}:9991",
            *loadgen_tls,
            f"      - --streams={streams}",
            "      - --connections=2",
            f"      - --protocol={protocol}",
            "      - --mode=${CHAOS_LOADGEN_MODE:-ads}",
            "      - --types=${CHAOS_TYPES:-cds,eds,lds,rds}",
            "      - --cluster-template=chaos-{i}",
            f"      - --node-id-template={prefix}-{{i}}",
            "      - --duration=120m",
            "      - --reconnect-delay=250ms",
            f"      - --record=/records/{group}.jsonl",
            "",
        ]
    grpc = [(f"grpc-r{i}", f"relay-{i}", f"g-r{i}") for i in range(1, relays + 1)] + [("grpc-lb", "lb", "g-lb")]
    grpc_tls = ["      - --tls-ca=/tls/ca.pem", "      - --tls-cert=/tls/client.pem", "      - --tls-key=/tls/client.key"] if tls else []
    for group, target, prefix in grpc:
        out += [
            f"  {group}:",
            "    <<: *grpc-client",
            "    command:",
            f"      - --server={target}:9991",
            *grpc_tls,
            "      - --processes=${CHAOS_GRPC_CLIENTS:-3}",
            "      - --target=example-service",
            f"      - --node-id-template={prefix}-{{i}}",
            "      - --cluster-template=grpc-{i}",
            f"      - --record-template=/records/{group}-{{i}}.jsonl",
            "",
        ]
    # The rogue node of the rogue-node scenario: started only when named (`up rogue-origin
    # rogue-relay`); secrets of another CA and another gossip key; its own origin.
    rogue_origin_tls = origin_tls(rogue)
    out += [
        "  rogue-origin:",
        "    image: xds-relay-example:${XDS_RELAY_TAG:-dev}",
        '    restart: "no"',
        "    command:",
        "      - --address=0.0.0.0:18000",
        "      - --stats-address=0.0.0.0:18001",
        "      - --interval=1s",
        f"      - --clusters={ROGUE_CLUSTERS}",
        "      - --random-versions",
        *rogue_origin_tls[0],
        *rogue_origin_tls[1],
        "    networks: [xds]",
        "",
        "  rogue-relay:",
        "    <<: *relay",
        "    hostname: rogue",
        '    command: ["-c", "/etc/xds-relay/config/rogue.yaml", "-a", "/etc/xds-relay/config/aggregation-rules.yaml"]',
        *relay_volumes("rogue", rogue),
        "    healthcheck:",
        "      disable: true",
        "    networks:",
        "      xds:",
        "        aliases: [rogue]",
        "      cluster:",
        "        aliases: [rogue-peer]",
        "",
    ]
    out += [
        "networks:",
        "  xds:",
        "    ipam:",
        '      config: [{ subnet: "${CHAOS_XDS_SUBNET:-172.30.201.0/24}" }]',
        "  cluster:",
        "    ipam:",
        '      config: [{ subnet: "${CHAOS_CLUSTER_SUBNET:-172.30.202.0/24}" }]',
        "",
    ]
    return "\n".join(out)


def tls_dirs(run_dir: Path) -> tuple[Path, Path]:
    """Where a run's secrets go: (the cluster's, the rogue node's)."""
    return run_dir / "tls", run_dir / "tls-rogue"


def compose_env(s: Settings, run_dir: Path, subnets: tuple[str, str]) -> dict[str, str]:
    tls_dir, rogue_dir = tls_dirs(run_dir)
    return {
        "CHAOS_RUN_DIR": str(run_dir),
        "CHAOS_TLS_DIR": str(tls_dir),
        "CHAOS_ROGUE_TLS_DIR": str(rogue_dir),
        "XDS_RELAY_TAG": s.tag,
        "CHAOS_ORIGIN_INTERVAL": s.origin_interval,
        "CHAOS_ORIGIN_CLUSTERS": str(s.origin_clusters),
        "CHAOS_ORIGIN_LISTENERS": str(s.origin_listeners),
        "CHAOS_DIRECT_CLIENTS": str(s.direct_clients),
        "CHAOS_LB_CLIENTS": str(s.lb_clients),
        "CHAOS_TYPES": s.types,
        "CHAOS_LOADGEN_PROTOCOL": s.loadgen_protocol,
        "CHAOS_LOADGEN_MODE": s.loadgen_mode,
        "CHAOS_DELTA_CLIENTS": str(s.delta_clients),
        "CHAOS_GRPC_CLIENTS": str(s.grpc_clients),
        "CHAOS_BACKEND_IP": backend_ip(subnets[0]),
        "CHAOS_BACKEND_ENDPOINTS": ",".join(f"{backend_ip(subnets[0])}:{p}" for p in BACKEND_PORTS),
        "CHAOS_XDS_SUBNET": subnets[0],
        "CHAOS_CLUSTER_SUBNET": subnets[1],
    }


def _tls_block(indent: str, *, server_name: str | None = None, client_ca: bool = False, ca: bool = True) -> str:
    lines = [f"{indent}tls:"]
    if ca:
        lines.append(f"{indent}  ca_file: {TLS_MOUNT}/ca.pem")
    lines += [f"{indent}  cert_file: {TLS_MOUNT}/relay.pem", f"{indent}  key_file: {TLS_MOUNT}/relay.key"]
    if client_ca:
        lines.append(f"{indent}  client_ca_file: {TLS_MOUNT}/ca.pem")
    if server_name:
        lines.append(f"{indent}  server_name: {server_name}")
    return "\n".join(lines) + "\n"


def _bootstrap(s: Settings, name: str, origin: str, seeds: list[str], comment: str) -> str:
    server_tls = _tls_block("  ", client_ca=True, ca=False) if s.tls else ""
    origin_tls = _tls_block("  ", server_name=origin) if s.tls else ""
    admin_token = f"  auth_token_file: {TLS_MOUNT}/admin.token\n" if s.tls else ""
    text = f"""# {comment} (generated by chaos-tests/chaos/project.py).
server:
  address: {{ address: "0.0.0.0", port_value: 9991 }}
{server_tls}origin_server:
  address: {{ address: "{origin}", port_value: 18000 }}
  api_type: GRPC
  keep_alive_time: 10s
  connect_timeout: 2s
  backoff: {{ initial_interval: 200ms, max_interval: 2s }}
  request_node_metadata: "{name}"
{origin_tls}logging:
  level: INFO
cache:
  ttl: 120s
  max_entries: 1000
  persist_dir: /var/lib/xds-relay/state
admin:
  address: {{ address: "0.0.0.0", port_value: 6070 }}
{admin_token}"""
    if s.cluster_mode:
        security = (_tls_block("  ") + f"  gossip_keys_file: {TLS_MOUNT}/gossip.keys\n") if s.tls else "  insecure: true\n"
        text += f"""cluster:
  node_name: {name}
  cluster_id: {CLUSTER_ID}
  advertise_host: {name}-peer
  gossip: {{ address: "0.0.0.0", port_value: 7946 }}
  peer: {{ address: "0.0.0.0", port_value: 9992 }}
  seeds: [{", ".join(f'"{x}"' for x in seeds)}]
  gossip_interval: {s.gossip_interval}
{security}"""
    return text


def render_bootstrap(s: Settings, index: int) -> str:
    """Bootstrap of relay-<index>: origin `origin:18000`, fast backoff, mTLS everywhere (with
    `s.tls`), and (in cluster mode) the cluster section with the peer-network aliases. No
    tracing section: no Jaeger here."""
    name = f"relay-{index}"
    return _bootstrap(s, name, "origin", [f"{n}-peer:7946" for n in s.relay_names()], f"{name} of a chaos-test project")


def render_rogue_bootstrap(s: Settings) -> str:
    """Bootstrap of the rogue node: the real cluster_id and the real relays as seeds, its own
    origin, and (mounted by the compose file) secrets of another CA and another gossip key."""
    return _bootstrap(s, "rogue", "rogue-origin", [f"{n}-peer:7946" for n in s.relay_names()],
                      "the rogue node of the rogue-node scenario")


def write_run_dir(s: Settings, run_dir: Path, rules: Path) -> Path:
    """Creates run_dir/{config,records} with the bootstraps (the relays' and the rogue node's)
    and rules; returns the compose file to use (the checked-in one for the default relay count
    with TLS). The secrets are chaos/tls.py's (tls_dirs)."""
    config = run_dir / "config"
    records = run_dir / "records"
    config.mkdir(parents=True, exist_ok=True)
    records.mkdir(parents=True, exist_ok=True)
    # Clients run as uid 10001 and write here.
    records.chmod(0o777)
    for i in range(1, s.relays + 1):
        (config / f"relay-{i}.yaml").write_text(render_bootstrap(s, i))
    (config / "rogue.yaml").write_text(render_rogue_bootstrap(s))
    (config / "aggregation-rules.yaml").write_text(rules.read_text())
    if s.relays == DEFAULT_RELAYS and s.tls and CHECKED_IN_COMPOSE.exists():
        return CHECKED_IN_COMPOSE
    path = run_dir / "docker-compose.yml"
    path.write_text(render_compose(s.relays, tls=s.tls))
    return path

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


def render_compose(relays: int) -> str:
    names = [f"relay-{i}" for i in range(1, relays + 1)]
    out = [
        "# Chaos-test project: origin, relays, LB and recording clients. Generated by",
        "# chaos-tests/chaos/project.py for %d relays; run.py sets the environment (CHAOS_*)." % relays,
        "# Regenerate with `python3 run.py --render-compose > docker-compose.yml`.",
        "",
        "x-relay: &relay",
        "  image: xds-relay:${XDS_RELAY_TAG:-dev}",
        '  restart: "no"',
        "  stop_grace_period: 30s",
        "  volumes:",
        '    - "${CHAOS_RUN_DIR:?set CHAOS_RUN_DIR}/config:/etc/xds-relay:ro"',
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
        '    - "${CHAOS_RUN_DIR:?set CHAOS_RUN_DIR}/records:/records"',
        "  networks: [xds]",
        "",
        "x-grpc-client: &grpc-client",
        "  image: xds-relay-grpc-client:${XDS_RELAY_TAG:-dev}",
        '  restart: "no"',
        "  stop_grace_period: 5s",
        "  volumes:",
        '    - "${CHAOS_RUN_DIR:?set CHAOS_RUN_DIR}/records:/records"',
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
            f'    command: ["-c", "/etc/xds-relay/{n}.yaml", "-a", "/etc/xds-relay/aggregation-rules.yaml"]',
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
    for group, target, prefix, streams, protocol in targets:
        out += [
            f"  {group}:",
            "    <<: *client",
            "    command:",
            f"      - --target=http://{target}:9991",
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
    for group, target, prefix in grpc:
        out += [
            f"  {group}:",
            "    <<: *grpc-client",
            "    command:",
            f"      - --server={target}:9991",
            "      - --processes=${CHAOS_GRPC_CLIENTS:-3}",
            "      - --target=example-service",
            f"      - --node-id-template={prefix}-{{i}}",
            "      - --cluster-template=grpc-{i}",
            f"      - --record-template=/records/{group}-{{i}}.jsonl",
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


def compose_env(s: Settings, run_dir: Path, subnets: tuple[str, str]) -> dict[str, str]:
    return {
        "CHAOS_RUN_DIR": str(run_dir),
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


def render_bootstrap(s: Settings, index: int) -> str:
    """Bootstrap of relay-<index>: origin `origin:18000`, fast backoff, and (in cluster mode)
    the cluster section with the peer-network aliases. No tracing section: no Jaeger here."""
    name = f"relay-{index}"
    text = f"""# {name} of a chaos-test project (generated by chaos-tests/chaos/project.py).
server:
  address: {{ address: "0.0.0.0", port_value: 9991 }}
origin_server:
  address: {{ address: "origin", port_value: 18000 }}
  api_type: GRPC
  keep_alive_time: 10s
  connect_timeout: 2s
  backoff: {{ initial_interval: 200ms, max_interval: 2s }}
  request_node_metadata: "{name}"
logging:
  level: INFO
cache:
  ttl: 120s
  max_entries: 1000
admin:
  address: {{ address: "0.0.0.0", port_value: 6070 }}
"""
    if s.cluster_mode:
        seeds = ", ".join(f'"{n}-peer:7946"' for n in s.relay_names())
        text += f"""cluster:
  node_name: {name}
  cluster_id: xds-relay-chaos
  advertise_host: {name}-peer
  gossip: {{ address: "0.0.0.0", port_value: 7946 }}
  peer: {{ address: "0.0.0.0", port_value: 9992 }}
  seeds: [{seeds}]
  gossip_interval: {s.gossip_interval}
  insecure: true
"""
    return text


def write_run_dir(s: Settings, run_dir: Path, rules: Path) -> Path:
    """Creates run_dir/{config,records} with the bootstraps and rules; returns the compose file
    to use (the checked-in one for the default relay count)."""
    config = run_dir / "config"
    records = run_dir / "records"
    config.mkdir(parents=True, exist_ok=True)
    records.mkdir(parents=True, exist_ok=True)
    # Clients run as uid 10001 and write here.
    records.chmod(0o777)
    for i in range(1, s.relays + 1):
        (config / f"relay-{i}.yaml").write_text(render_bootstrap(s, i))
    (config / "aggregation-rules.yaml").write_text(rules.read_text())
    if s.relays == DEFAULT_RELAYS and CHECKED_IN_COMPOSE.exists():
        return CHECKED_IN_COMPOSE
    path = run_dir / "docker-compose.yml"
    path.write_text(render_compose(s.relays))
    return path

"""Thin wrappers over the docker and compose command lines, and the fault primitives.

Everything goes through the CLIs (no Docker SDK), so the harness needs only the standard
library. Works with the compose v2 plugin (`docker compose`) and the v1 binary
(`docker-compose` >= 1.28); `CHAOS_COMPOSE` overrides the choice (e.g. "docker-compose").
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Iterable, Sequence

DOCKER = os.environ.get("DOCKER", "docker")
TOOLS_IMAGE = os.environ.get("CHAOS_TOOLS_IMAGE", "xds-relay-chaos-tools:dev")


class DockerError(RuntimeError):
    pass


def run(cmd: Sequence[str], *, check: bool = True, timeout: float = 120, env: dict | None = None,
        cwd: str | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    """Runs a command, capturing output; raises DockerError with stderr when it fails."""
    try:
        p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd, input=input)
    except subprocess.TimeoutExpired as e:
        raise DockerError(f"timed out after {timeout}s: {shlex.join(cmd)}") from e
    if check and p.returncode != 0:
        raise DockerError(f"{shlex.join(cmd)} exited {p.returncode}: {(p.stderr or p.stdout).strip()[-2000:]}")
    return p


def docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    return run([DOCKER, *args], check=check, timeout=timeout)


def docker_available() -> bool:
    if not shutil.which(DOCKER):
        return False
    try:
        return run([DOCKER, "info", "--format", "{{.ServerVersion}}"], check=False, timeout=20).returncode == 0
    except DockerError:
        return False


def image_exists(image: str) -> bool:
    return docker("image", "inspect", image, check=False).returncode == 0


_compose_cmd: list[str] | None = None


def compose_command() -> list[str]:
    """`docker compose` when the v2 plugin is there, else `docker-compose`."""
    global _compose_cmd
    if _compose_cmd is None:
        override = os.environ.get("CHAOS_COMPOSE")
        if override:
            _compose_cmd = shlex.split(override)
        elif run([DOCKER, "compose", "version"], check=False, timeout=30).returncode == 0:
            _compose_cmd = [DOCKER, "compose"]
        elif shutil.which("docker-compose"):
            _compose_cmd = ["docker-compose"]
        else:
            raise DockerError("neither `docker compose` nor `docker-compose` is installed")
    return list(_compose_cmd)


class Compose:
    """One compose project: `compose -p NAME -f FILE ...` with a fixed environment."""

    def __init__(self, project: str, files: Sequence[str], env: dict[str, str] | None = None, cwd: str | None = None):
        self.project = project
        self.files = list(files)
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self._ids: dict[str, str] = {}

    def cmd(self, *args: str) -> list[str]:
        out = compose_command() + ["-p", self.project]
        for f in self.files:
            out += ["-f", f]
        return out + list(args)

    def __call__(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        return run(self.cmd(*args), check=check, timeout=timeout, env=self.env, cwd=self.cwd)

    def up(self, services: Iterable[str] = ()) -> None:
        self("up", "-d", "--no-build", *services)
        for s in services:
            self._ids.pop(s, None)

    def down(self, timeout_s: int = 10) -> None:
        self("down", "-v", "--remove-orphans", "-t", str(timeout_s), check=False, timeout=300)

    def logs(self) -> str:
        p = self("logs", "--no-color", "-t", check=False, timeout=120)
        return p.stdout + p.stderr

    def config_ok(self) -> None:
        self("config", "-q")

    def container(self, service: str) -> str:
        """The container id of a service (one container per service). Cached: the harness never
        recreates containers, it stops and starts them, which keeps their ids."""
        cid = self._ids.get(service)
        if not cid:
            p = self("ps", "-q", service, check=False)
            ids = [x for x in p.stdout.split() if x]
            if not ids:
                # v2 hides stopped containers from `ps` without -a.
                p = self("ps", "-a", "-q", service, check=False)
                ids = [x for x in p.stdout.split() if x]
            if not ids:
                raise DockerError(f"service {service} has no container in project {self.project}")
            cid = ids[0]
            self._ids[service] = cid
        return cid


# --- containers -------------------------------------------------------------------------------


def inspect(cid: str) -> dict:
    return json.loads(docker("inspect", cid).stdout)[0]


def health(cid: str) -> str:
    """healthy | unhealthy | starting | running (no health check) | exited | ..."""
    st = inspect(cid)["State"]
    if not st.get("Running"):
        return st.get("Status", "exited")
    h = st.get("Health")
    return h["Status"] if h else "running"


def wait_healthy(cids: Iterable[str], timeout: float = 60, interval: float = 0.5) -> None:
    cids = list(cids)
    deadline = time.monotonic() + timeout
    pending = {c: "?" for c in cids}
    while pending and time.monotonic() < deadline:
        for c in list(pending):
            s = health(c)
            if s in ("healthy", "running"):
                pending.pop(c)
            else:
                pending[c] = s
        if pending:
            time.sleep(interval)
    if pending:
        names = ", ".join(f"{name_of(c)}={s}" for c, s in pending.items())
        raise DockerError(f"not healthy after {timeout:.0f}s: {names}")


def name_of(cid: str) -> str:
    try:
        return inspect(cid)["Name"].lstrip("/")
    except Exception:
        return cid[:12]


def kill(cid: str, signal: str = "KILL") -> None:
    docker("kill", "-s", signal, cid)


def stop(cid: str, timeout_s: int = 30) -> float:
    """`docker stop` (SIGTERM, then SIGKILL after timeout_s); returns how long it took."""
    t0 = time.monotonic()
    docker("stop", "-t", str(timeout_s), cid, timeout=timeout_s + 60)
    return time.monotonic() - t0


def start(cid: str) -> None:
    docker("start", cid)


def restart(cid: str, timeout_s: int = 5) -> None:
    docker("restart", "-t", str(timeout_s), cid, timeout=timeout_s + 60)


def host_port(cid: str, port: int, proto: str = "tcp") -> int:
    """The loopback host port published for a container port (changes when a container with
    an ephemeral mapping restarts, so ask again after every restart)."""
    out = docker("port", cid, f"{port}/{proto}").stdout.split()
    for line in out:
        if ":" in line:
            return int(line.rsplit(":", 1)[1])
    raise DockerError(f"{name_of(cid)}: port {port}/{proto} is not published")


@dataclass(frozen=True)
class Attachment:
    network: str
    ip: str
    aliases: tuple[str, ...]


def attachments(cid: str) -> dict[str, Attachment]:
    info = inspect(cid)
    short = info["Id"][:12]
    out = {}
    for net, s in (info["NetworkSettings"].get("Networks") or {}).items():
        aliases = tuple(a for a in (s.get("Aliases") or []) if a != short and a != info["Id"])
        ip = s.get("IPAddress") or ((s.get("IPAMConfig") or {}).get("IPv4Address") or "")
        out[net] = Attachment(net, ip, aliases)
    return out


def disconnect(cid: str, network: str) -> Attachment:
    """Cuts a container off a network; returns what `reconnect` needs to restore it with the
    same address and aliases (the network must have a configured subnet for that)."""
    att = attachments(cid)[network]
    docker("network", "disconnect", "-f", network, cid)
    return att


def reconnect(cid: str, att: Attachment) -> None:
    args = ["network", "connect"]
    if att.ip:
        args += ["--ip", att.ip]
    for a in att.aliases:
        args += ["--alias", a]
    docker(*args, att.network, cid)


def network_subnets() -> list[str]:
    ids = docker("network", "ls", "-q").stdout.split()
    if not ids:
        return []
    nets = json.loads(docker("network", "inspect", *ids).stdout)
    out = []
    for n in nets:
        for c in ((n.get("IPAM") or {}).get("Config") or []):
            if c.get("Subnet"):
                out.append(c["Subnet"])
    return out


def free_subnets(count: int, prefix: str = "172.30", avoid: Iterable[str] = ()) -> list[str]:
    """`count` /24 subnets under prefix.0.0/16 that no Docker network uses."""
    import ipaddress

    used = [ipaddress.ip_network(s, strict=False) for s in list(network_subnets()) + list(avoid) if ":" not in s]
    out = []
    for third in range(10, 250):
        cand = ipaddress.ip_network(f"{prefix}.{third}.0/24")
        if not any(cand.overlaps(u) for u in used):
            out.append(str(cand))
            used.append(cand)
            if len(out) == count:
                return out
    raise DockerError(f"no free /24 under {prefix}.0.0/16 for the chaos networks")


# --- network degradation through a tools container sharing the target's network namespace ---


def _tools(cid: str, script: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return docker(
        "run", "--rm", "--network", f"container:{cid}", "--cap-add", "NET_ADMIN", "--user", "0",
        "--entrypoint", "/bin/bash", TOOLS_IMAGE, "-ec", script, timeout=timeout,
    )


def netem_supported(cid: str) -> bool:
    """Whether the kernel has sch_netem: tries a netem qdisc on the container's loopback."""
    p = docker(
        "run", "--rm", "--network", f"container:{cid}", "--cap-add", "NET_ADMIN", "--user", "0",
        "--entrypoint", "/bin/bash", TOOLS_IMAGE, "-c",
        "tc qdisc add dev lo root netem delay 1ms && tc qdisc del dev lo root",
        check=False,
    )
    return p.returncode == 0


def degrade(cid: str, delay_ms: int = 200, jitter_ms: int = 50, loss_pct: float = 5.0) -> str:
    """Adds latency and loss to every interface but lo of a container, without giving the
    container NET_ADMIN itself: a tools container joins its network namespace. Uses tc netem
    when the kernel has it; otherwise (netem is a kernel module some kernels lack) random
    loss with iptables' statistic match and no added latency. Returns what was applied."""
    if netem_supported(cid):
        _tools(cid, f"""
for dev in $(ls /sys/class/net); do
  [ "$dev" = lo ] && continue
  tc qdisc replace dev "$dev" root netem delay {delay_ms}ms {jitter_ms}ms loss {loss_pct}%
done""")
        return f"netem delay {delay_ms}±{jitter_ms}ms loss {loss_pct:g}%"
    prob = loss_pct / 100.0
    _tools(cid, f"""
iptables -N CHAOS 2>/dev/null || iptables -F CHAOS
iptables -C INPUT -j CHAOS 2>/dev/null || iptables -I INPUT -j CHAOS
iptables -C OUTPUT -j CHAOS 2>/dev/null || iptables -I OUTPUT -j CHAOS
iptables -A CHAOS -o lo -j RETURN
iptables -A CHAOS -i lo -j RETURN
iptables -A CHAOS -m statistic --mode random --probability {prob} -j DROP""")
    return f"iptables loss {loss_pct:g}% (kernel has no sch_netem: no latency added)"


def restore(cid: str) -> None:
    """Removes what `degrade` added (both variants; missing pieces are ignored)."""
    _tools(cid, """
for dev in $(ls /sys/class/net); do
  [ "$dev" = lo ] && continue
  tc qdisc del dev "$dev" root 2>/dev/null || true
done
if iptables -L CHAOS -n >/dev/null 2>&1; then
  iptables -D INPUT -j CHAOS 2>/dev/null || true
  iptables -D OUTPUT -j CHAOS 2>/dev/null || true
  iptables -F CHAOS && iptables -X CHAOS
fi""")


def qdiscs(cid: str) -> str:
    return _tools(cid, "tc qdisc show; iptables -S 2>/dev/null || true").stdout


# --- HTTP to published loopback ports ---------------------------------------------------------


def http(method: str, url: str, timeout: float = 3.0, body: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, method=method, data=body)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def http_json(method: str, url: str, timeout: float = 3.0):
    status, body = http(method, url, timeout=timeout)
    if status != 200:
        raise DockerError(f"{method} {url}: HTTP {status}: {body[:300]!r}")
    return json.loads(body)

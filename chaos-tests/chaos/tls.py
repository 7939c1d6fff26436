"""The secrets of a chaos run, made by deploy/tls/gen-certs.sh (openssl).

Two independent sets per run directory (project.tls_dirs):

  tls/        the cluster's: a CA, relay-1..N (SAN URI spiffe://xds-relay-chaos/relay/relay-N,
              DNS relay-N and lb: clients dial a relay by its service name or through the LB,
              which passes TLS through), the origin (DNS origin), the clients (loadgen,
              grpc-client), gossip.keys, admin.token
  tls-rogue/  the rogue node's: another CA, a certificate for node "rogue" claiming the same
              cluster_id, its origin (DNS rogue-origin), another gossip key

The containers run as uid 10001. As root the files are handed to that uid (gen-certs.sh
--owner); otherwise the keys are made readable by everyone: they are throwaway test secrets in
the run directory, nothing else.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .project import CLUSTER_ID

ROOT = Path(__file__).resolve().parents[2]
GEN_CERTS = ROOT / "deploy/tls/gen-certs.sh"
CONTAINER_UID = 10001
CLIENTS = ("loadgen", "grpc-client")


class TlsError(RuntimeError):
    """gen-certs.sh failed."""


def gen_certs_args(out: Path, relay_names: list[str], *, origin_dns: str, clients: tuple[str, ...]) -> list[str]:
    """The gen-certs.sh command line for one set (pure, for tests)."""
    args = [str(GEN_CERTS), "-q", "--out", str(out), "--cluster-id", CLUSTER_ID,
            "--relay-names", ",".join(relay_names), "--relay-dns", "lb",
            "--origin-dns", origin_dns, "--clients", ",".join(clients)]
    if os.geteuid() == 0:
        args += ["--owner", f"{CONTAINER_UID}:{CONTAINER_UID}"]
    return args


def _run(args: list[str], out: Path) -> None:
    p = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise TlsError(f"{' '.join(args)} failed ({p.returncode}): {(p.stderr or p.stdout).strip()[:500]}")
    if os.geteuid() != 0:
        out.chmod(0o755)
        for f in out.iterdir():
            if f.name != "ca.key":
                f.chmod(0o644)


def generate(tls_dir: Path, relay_names: list[str]) -> None:
    """The cluster's secrets into tls_dir (kept when they exist)."""
    _run(gen_certs_args(tls_dir, relay_names, origin_dns="origin,localhost", clients=CLIENTS), tls_dir)


def generate_rogue(rogue_dir: Path) -> None:
    """The rogue node's secrets (another CA, another gossip key) into rogue_dir."""
    _run(gen_certs_args(rogue_dir, ["rogue"], origin_dns="rogue-origin", clients=()), rogue_dir)

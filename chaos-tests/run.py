#!/usr/bin/env python3
"""xds-relay chaos tests: each scenario in a fresh docker compose project (relays, LB, origin,
greeter backend, recording clients: xds-loadgen SotW and delta, grpcio's xDS client), one
fault, and invariant checks on what the clients received.

    python3 chaos-tests/run.py                       # build images, run every scenario
    python3 chaos-tests/run.py --no-build -s kill-owner,drain
    python3 chaos-tests/run.py --list
    python3 chaos-tests/run.py --render-compose > chaos-tests/docker-compose.yml

Exit status: 0 when every scenario ran without violations, 1 on any violation or error, 2 when
the prerequisites are missing (Docker, images, loadgen --record, cluster mode). See
chaos-tests/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from chaos import docker as d  # noqa: E402
from chaos.harness import Harness, Result  # noqa: E402
from chaos import tls  # noqa: E402
from chaos.project import TLS_MOUNT, Settings, render_bootstrap, render_compose  # noqa: E402
from chaos.scenarios import ALL, BY_NAME  # noqa: E402

RULES = ROOT / "deploy/config/aggregation-rules.yaml"


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def build_images(args) -> None:
    cmd = [str(ROOT / "deploy/images/build.sh"), "--tag", args.tag, "-q"]
    if args.bin_dir:
        cmd += ["--bin-dir", args.bin_dir]
    log("building images: " + " ".join(cmd))
    subprocess.run(cmd, check=True)
    build_tools_image(args.tag, force=True)


def build_tools_image(tag: str, force: bool = False) -> None:
    image = d.TOOLS_IMAGE
    if not force and d.image_exists(image):
        return
    base = "xds-relay-base:bookworm" if d.image_exists("xds-relay-base:bookworm") else "debian:bookworm-slim"
    with tempfile.TemporaryDirectory() as ctx:
        (Path(ctx) / "Dockerfile").write_text((HERE / "Dockerfile.tools").read_text())
        env = dict(os.environ)
        if d.run([d.DOCKER, "buildx", "version"], check=False).returncode != 0:
            env.setdefault("DOCKER_BUILDKIT", "0")
        log(f"building {image} FROM {base}")
        subprocess.run([d.DOCKER, "build", "-q", "--build-arg", f"BASE_IMAGE={base}", "-t", image, ctx],
                       check=True, env=env, stdout=subprocess.DEVNULL)


def preflight(s: Settings) -> list[str]:
    """What is missing for a run; empty when everything is there."""
    problems = []
    if not d.docker_available():
        return ["the Docker daemon is not reachable"]
    try:
        log("compose: " + " ".join(d.compose_command()))
    except d.DockerError as e:
        problems.append(str(e))
    images = [f"xds-relay:{s.tag}", f"xds-relay-example:{s.tag}", f"xds-relay-lb:{s.tag}", f"xds-relay-grpc-client:{s.tag}", d.TOOLS_IMAGE]
    missing = [i for i in images if not d.image_exists(i)]
    if missing:
        return problems + [f"missing images {missing}: run without --no-build (deploy/images/build.sh)"]
    # The clients need xds-loadgen --record PATH.
    p = d.docker("run", "--rm", "--entrypoint", "/usr/local/bin/xds-loadgen", f"xds-relay-example:{s.tag}", "--help", check=False)
    if p.returncode != 0:
        problems.append(f"xds-loadgen is not in xds-relay-example:{s.tag}: {(p.stderr or p.stdout).strip()[:200]}")
    elif "--record" not in p.stdout:
        problems.append("xds-loadgen in the image has no --record flag: the image is older than the load generator; rebuild it (run without --no-build)")
    elif s.tls and "--tls-ca" not in p.stdout:
        problems.append("xds-loadgen in the image has no --tls-ca flag: the image is older than TLS; rebuild it (run without --no-build), "
                        "or run with --insecure")
    # The relays need the cluster section (and, with TLS, the TLS sections, with real files).
    if s.cluster_mode or s.tls:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = Path(tmp) / "cfg"
            cfg.mkdir()
            os.chmod(tmp, 0o755)
            os.chmod(cfg, 0o755)
            (cfg / "relay-1.yaml").write_text(render_bootstrap(s, 1))
            (cfg / "rules.yaml").write_text(RULES.read_text())
            for f in cfg.iterdir():
                f.chmod(0o644)
            mounts = ["-v", f"{cfg}:/cfg:ro"]
            if s.tls:
                try:
                    tls.generate(Path(tmp) / "tls", s.relay_names())
                except (tls.TlsError, OSError) as e:
                    return problems + [f"cannot make certificates with deploy/tls/gen-certs.sh: {e}"]
                for src, dst in (("relay-1.pem", "relay.pem"), ("relay-1.key", "relay.key"), ("ca.pem", "ca.pem"),
                                 ("gossip.keys", "gossip.keys"), ("admin.token", "admin.token")):
                    mounts += ["-v", f"{Path(tmp) / 'tls' / src}:{TLS_MOUNT}/{dst}:ro"]
            p = d.docker("run", "--rm", *mounts, f"xds-relay:{s.tag}",
                         "-m", "validate", "-c", "/cfg/relay-1.yaml", "-a", "/cfg/rules.yaml", check=False)
            if p.returncode != 0:
                what = "the cluster section" if s.cluster_mode else "the bootstrap"
                if s.tls:
                    what += " with mTLS, gossip keys and an admin token (an image older than TLS? rebuild it, or run with --insecure)"
                problems.append(f"the relay rejects {what}; or run with --no-cluster: {(p.stderr or p.stdout).strip()[:300]}")
    return problems


def fmt_ms(ms: float | None) -> str:
    return "-" if ms is None else f"{ms / 1000:.1f}s"


def table(results: list[Result]) -> str:
    head = ["scenario", "fault", "clients", "versions published", "convergence", "failover", "violations", "time"]
    rows = []
    for r in results:
        viol = "ERROR" if r.error else str(len(r.violations))
        rows.append([r.scenario, r.fault or "-", str(r.clients), str(r.versions_published),
                     fmt_ms(r.convergence_ms), fmt_ms(r.failover_ms), viol, f"{r.duration_s:.0f}s"])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = "+".join("-" * (w + 2) for w in widths)
    out = [" | ".join(h.ljust(w) for h, w in zip(head, widths)), line]
    out += [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="xds-relay chaos tests", formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="scenarios:\n" + "\n".join(f"  {s.name:16} {s.summary}" for s in ALL))
    ap.add_argument("-s", "--scenarios", default="all", help="comma-separated scenario names (default: all)")
    ap.add_argument("--list", action="store_true", help="list the scenarios and exit")
    ap.add_argument("--no-build", action="store_true", help="use the existing images")
    ap.add_argument("--bin-dir", help="prebuilt binaries for build.sh (skips cargo)")
    ap.add_argument("--tag", default="dev", help="image tag (default dev)")
    ap.add_argument("--relays", type=int, default=3)
    ap.add_argument("--direct-clients", type=int, default=8, help="streams per relay-pinned client group")
    ap.add_argument("--lb-clients", type=int, default=16, help="streams of the client group behind the LB")
    ap.add_argument("--delta-clients", type=int, default=8, help="streams of the delta client group behind the LB (0: none)")
    ap.add_argument("--grpc-clients", type=int, default=3,
                    help="grpcio xDS client processes per grpc group (one per relay, one behind the LB; 0: none)")
    ap.add_argument("--types", default="cds,eds,lds,rds", help="types of the xds-loadgen clients (grpcio clients ask for all four)")
    ap.add_argument("--origin-interval", default="2s")
    ap.add_argument("--insecure", action="store_true",
                    help="plaintext everywhere (cluster.insecure: true, no TLS, no gossip keys, LB in h2c mode); "
                         "the default is mTLS on every link with certificates from deploy/tls/gen-certs.sh")
    ap.add_argument("--no-cluster", action="store_true",
                    help="bootstraps without the cluster section: independent relays (harness smoke test)")
    ap.add_argument("--out", default=os.environ.get("CHAOS_OUT") or str(Path(tempfile.gettempdir()) / "xds-relay-chaos"),
                    help="where each run's configs, records, logs and results go")
    ap.add_argument("--keep", action="store_true", help="leave the compose projects up (debugging)")
    ap.add_argument("--steady-timeout", type=float, default=60)
    ap.add_argument("--render-compose", action="store_true", help="print the compose file for --relays and exit")
    args = ap.parse_args(argv)

    if args.list:
        for s in ALL:
            print(f"{s.name:16} {s.summary} (convergence bound {s.bound_s:.0f}s)")
        return 0
    if args.render_compose:
        sys.stdout.write(render_compose(args.relays, tls=not args.insecure))
        return 0
    names = [s.name for s in ALL] if args.scenarios == "all" else [x.strip() for x in args.scenarios.split(",") if x.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        ap.error(f"unknown scenarios {unknown}; see --list")

    settings = Settings(relays=args.relays, direct_clients=args.direct_clients, lb_clients=args.lb_clients,
                        delta_clients=args.delta_clients, grpc_clients=args.grpc_clients, types=args.types, origin_interval=args.origin_interval, cluster_mode=not args.no_cluster, tag=args.tag, tls=not args.insecure)
    if not args.no_build:
        build_images(args)
    else:
        build_tools_image(args.tag)
    problems = preflight(settings)
    if problems:
        for p in problems:
            log(f"cannot run: {p}")
        return 2

    out_root = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    out_root.mkdir(parents=True, exist_ok=True)
    log(f"runs in {out_root}")
    results: list[Result] = []
    t0 = time.monotonic()
    try:
        for n in names:
            h = Harness(settings, n, out_root / n, RULES, log=log, steady_timeout=args.steady_timeout, keep=args.keep)
            r = h.run(BY_NAME[n])
            results.append(r)
            log(f"{n}: {'ok' if r.ok() else 'FAILED'} in {r.duration_s:.0f}s")
    except KeyboardInterrupt:
        log("interrupted")
    print()
    print(table(results))
    print(f"\n{len(results)} scenarios in {(time.monotonic() - t0) / 60:.1f} min; records and logs in {out_root}")
    for r in results:
        if r.error:
            print(f"\n{r.scenario}: ERROR {r.error}")
        if r.violations:
            print(f"\n{r.scenario}: {len(r.violations)} violations")
            for v in r.violations[:15]:
                print(f"  {v}")
            if len(r.violations) > 15:
                print(f"  ... {len(r.violations) - 15} more in {out_root / r.scenario / 'result.json'}")
        for note in r.notes:
            print(f"  note ({r.scenario}): {note}")
    (out_root / "summary.json").write_text(json.dumps([r.__dict__ for r in results], indent=2, default=str))
    failed = sum(not r.ok() for r in results)
    print(f"\n{len(results) - failed} passed, {failed} failed")
    return 0 if results and failed == 0 and len(results) == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())

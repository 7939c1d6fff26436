#!/usr/bin/env python3
"""The chaos tests' gRPC backend: `/hello.Greeter/SayHello` on one or more ports.

    greeter_server.py --listen 0.0.0.0:50051=backend-a --listen 0.0.0.0:50052=backend-b

Each port answers every SayHello with its own name (raw bytes, no .proto needed), so a client
can tell which backend the origin's EDS sent it to. The example origin (`--endpoints
IP:50051,IP:50052`) moves every cluster to the other backend on each publish, so the grpcio
xDS clients' RPCs follow the EDS updates that came through the relay. Runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import signal
import sys
import threading

SERVICE = "hello.Greeter"


def serve(listens: list[tuple[str, str]]):
    import grpc

    servers = []
    for address, name in listens:
        def say_hello(request, context, name=name):
            return name.encode()

        handler = grpc.method_handlers_generic_handler(
            SERVICE, {"SayHello": grpc.unary_unary_rpc_method_handler(say_hello)}
        )
        server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=8))
        server.add_generic_rpc_handlers((handler,))
        if server.add_insecure_port(address) == 0:
            raise SystemExit(f"greeter_server: cannot listen on {address}")
        server.start()
        servers.append(server)
        print(f"greeter_server: {name} listening on {address}", file=sys.stderr, flush=True)
    return servers


def parse_listen(text: str) -> tuple[str, str]:
    address, _, name = text.partition("=")
    return address, name or address


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", action="append", type=parse_listen, required=True,
                    help="ADDRESS:PORT[=NAME]; repeat for several backends")
    args = ap.parse_args(argv)
    servers = serve(args.listen)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    for s in servers:
        s.stop(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A proxyless gRPC xDS client, run as its own process by test_grpc_xds.py.

It opens `xds:///<target>` (its xDS bootstrap comes from GRPC_XDS_BOOTSTRAP_CONFIG), calls
the backend until an RPC succeeds, prints one JSON line with the backend that answered and
the client's CSDS view, then waits until another backend answers (after the test publishes
new endpoints) and prints a second line. With a third argument `errors`, the second phase
instead keeps calling until its CSDS view shows a resource error, and prints that view with
the number of RPCs that failed meanwhile. With `rollback`, the second phase waits until its
CSDS view shows the cluster NACKED (the test published a cluster gRPC rejects), and a third
until the cluster is ACKED again without error (the relay rolled it back), then calls five
times. It always ends with os._exit: gRPC threads would
otherwise keep a failed process alive.
"""

import json
import os
import sys
import time

import grpc
from envoy.admin.v3 import config_dump_shared_pb2
from envoy.service.status.v3 import csds_pb2

METHOD = "/hello.Greeter/SayHello"


def call(channel):
    return channel.unary_unary(METHOD)(b"hello", timeout=2).decode()


def csds():
    """The client's own view of every xDS resource: type, name, version and status."""
    from grpc._cython import cygrpc

    response = csds_pb2.ClientStatusResponse.FromString(cygrpc.dump_xds_configs())
    return [
        {
            "type_url": generic.type_url,
            "name": generic.name,
            "version": generic.version_info,
            "status": config_dump_shared_pb2.ClientResourceStatus.Name(generic.client_status),
            "error": generic.error_state.details,
        }
        for config in response.config
        for generic in config.generic_xds_configs
    ]


def wait_for_backend(channel, timeout, unlike=None):
    """Calls until a backend other than `unlike` answers; returns its name."""
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            got = call(channel)
            if got != unlike:
                return got
            last = f"still {got}"
        except grpc.RpcError as e:
            last = f"{e.code()}: {e.details()}"
        time.sleep(0.05)
    raise TimeoutError(last)


def wait_for_view(channel, timeout, accept, what):
    """Calls until the CSDS view satisfies `accept`; returns the view and the number of RPCs
    that failed meanwhile."""
    deadline = time.time() + timeout
    failures = 0
    while time.time() < deadline:
        try:
            call(channel)
        except grpc.RpcError:
            failures += 1
        view = csds()
        if accept(view):
            return view, failures
        time.sleep(0.05)
    raise TimeoutError(f"{what}: {csds()}")


def wait_for_resource_error(channel, timeout):
    """Calls until the CSDS view shows a resource error (see `wait_for_view`)."""
    return wait_for_view(channel, timeout, lambda view: any(entry["error"] for entry in view),
                         "no resource error in the CSDS view")


def cluster_status(view):
    """The status and error of the Cluster resource in a CSDS view."""
    for entry in view:
        if entry["type_url"].endswith("envoy.config.cluster.v3.Cluster"):
            return entry["status"], entry["error"]
    return None, None


def wait_for_cluster(channel, timeout, predicate):
    """Calls until the Cluster's (status, error) satisfies `predicate` (see `wait_for_view`)."""
    return wait_for_view(channel, timeout, lambda view: predicate(*cluster_status(view)),
                         "the cluster never reached the expected status")


def main():
    target, timeout = sys.argv[1], float(sys.argv[2])
    mode = sys.argv[3] if len(sys.argv) > 3 else "endpoints"
    channel = grpc.insecure_channel(f"xds:///{target}")
    try:
        first = wait_for_backend(channel, timeout)
        print(json.dumps({"phase": 1, "backend": first, "csds": csds()}), flush=True)
        if mode == "errors":
            view, failures = wait_for_resource_error(channel, timeout)
            after = [call(channel) for _ in range(5)]
            print(json.dumps({"phase": 2, "csds": view, "rpc_failures": failures, "after": after}), flush=True)
            return
        if mode == "rollback":
            view, failures = wait_for_cluster(channel, timeout, lambda status, error: status == "NACKED")
            print(json.dumps({"phase": 2, "csds": view, "rpc_failures": failures}), flush=True)
            view, failures = wait_for_cluster(
                channel, timeout, lambda status, error: status == "ACKED" and not error
            )
            after = [call(channel) for _ in range(5)]
            print(json.dumps({"phase": 3, "csds": view, "rpc_failures": failures, "after": after}), flush=True)
            return
        second = wait_for_backend(channel, timeout, unlike=first)
        print(json.dumps({"phase": 2, "backend": second, "csds": csds()}), flush=True)
    except Exception as e:  # report and exit: never hang
        print(json.dumps({"error": repr(e)}), flush=True)
    finally:
        os._exit(0)


if __name__ == "__main__":
    main()

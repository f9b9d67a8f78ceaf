"""Local Ray heads that tests start in their own process group, and tear down with it."""

import os
import shutil
import signal
import socket
import subprocess


def free_ports(n: int) -> list[int]:
    """n distinct ports that nothing listens on right now (held open together while picked,
    so two calls in a row cannot hand out the same one)."""
    socks = [socket.socket() for _ in range(n)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in socks]
    for sock in socks:
        sock.close()
    return ports


def free_port() -> int:
    return free_ports(1)[0]


# Every port of a node but the head's own: its `ray start` flag and its RayParams keyword
# (ray.cluster_utils.Cluster.add_node); the agent's gRPC port is metrics_agent_port there.
NODE_PORTS = (
    ("--node-manager-port", "node_manager_port"),
    ("--object-manager-port", "object_manager_port"),
    ("--dashboard-agent-listen-port", "dashboard_agent_listen_port"),
    ("--dashboard-agent-grpc-port", "metrics_agent_port"),
    ("--runtime-env-agent-port", "runtime_env_agent_port"),
    ("--metrics-export-port", "metrics_export_port"),
)


def node_ports(head: bool = False) -> list[str]:
    """`ray start` flags giving a node every port of its own: Ray's defaults (the agent's
    52365, the client server's 10001) are taken by any other Ray on this machine, such as
    the test session's or another test worker's, and a node whose agent cannot bind dies."""
    flags = [flag for flag, _ in NODE_PORTS] + (["--ray-client-server-port"] if head else [])
    return [f"{flag}={port}" for flag, port in zip(flags, free_ports(len(flags)))]


def stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    """End a `ray start --head --block` started with start_new_session, and everything it
    started (its workers, an autoscaler's nodes), then its temp dir; never another Ray."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)


def node_port_params(head: bool = False) -> dict[str, int]:
    """node_ports as RayParams keywords (ray.cluster_utils.Cluster.add_node): every port of
    the node its own, the head's GCS port too."""
    names = [name for _, name in NODE_PORTS] + (["gcs_server_port"] if head else [])
    return dict(zip(names, free_ports(len(names))))

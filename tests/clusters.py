"""Local Ray heads that tests start in their own process group, and tear down with it."""

import os
import shutil
import signal
import socket
import subprocess


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    """End a `ray start --head --block` started with start_new_session, and everything it
    started (its workers, an autoscaler's nodes), then its temp dir; never another Ray."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)

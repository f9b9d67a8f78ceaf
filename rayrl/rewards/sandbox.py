"""Run an untrusted Python program in a confined, killable child (see sandbox_child.py for what
is enforced) and report whether it ran to completion."""

from __future__ import annotations

import json
import os
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CHILD = str(Path(__file__).with_name("sandbox_child.py"))
NOBODY = 65534
REPORT_BYTES = 4096  # a hostile program may flood the report pipe; keep its first line and tail


@dataclass(frozen=True)
class RunResult:
    status: str  # "passed" (ran to the end), "failed" (raised or died) or "timeout"
    mode: str | None  # "namespace" or "process" (sandbox_child.py); None if setup never finished
    seconds: float


def _read_report(proc: subprocess.Popen, deadline: float) -> tuple[bytes, bytes, bool]:
    """Head and tail of the child's report pipe until EOF, and whether the deadline passed first."""
    fd = proc.stdout.fileno()
    head, tail = b"", b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return head, tail, True
        chunk = os.read(fd, 65536)
        if not chunk:
            return head, tail, False
        head = (head + chunk)[:64] if len(head) < 64 else head
        tail = (tail + chunk)[-REPORT_BYTES:]


def run_python(
    code: str,
    timeout_s: float = 10.0,
    memory_mb: int = 512,
    max_file_mb: int = 16,
    namespaces: bool = True,
) -> RunResult:
    start = time.monotonic()
    nonce = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(
        prefix="rayrl-sandbox-", ignore_cleanup_errors=True
    ) as workdir:
        if os.geteuid() == 0:
            os.chown(workdir, NOBODY, NOBODY)  # the program runs as nobody (see sandbox_child.py)
        # A file, not stdin: writing a large job to a pipe could block past the deadline.
        # The child reads and deletes it before running anything untrusted (it holds the nonce).
        job_path = Path(workdir) / "job.json"
        fd = os.open(job_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(
                {
                    "code": code,
                    "nonce": nonce,
                    "workdir": workdir,
                    "timeout_s": timeout_s,
                    "memory_mb": memory_mb,
                    "max_file_mb": max_file_mb,
                    "namespaces": namespaces,
                },
                f,
            )
        proc = subprocess.Popen(
            [sys.executable, "-I", CHILD, str(job_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=workdir,
            start_new_session=True,  # its own process group, killed as a whole below
        )
        try:
            head, tail, timed_out = _read_report(proc, start + timeout_s)
            if not timed_out:
                try:
                    proc.wait(max(0.0, start + timeout_s - time.monotonic()))
                except subprocess.TimeoutExpired:
                    timed_out = True
        finally:
            # Kill the group while the leader is unreaped, so its id cannot have been reused.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
            proc.stdout.close()
    first = head.decode(errors="replace").split("\n")[0]
    mode = first.removeprefix("mode ") if first.startswith("mode ") else None
    passed = f"pass {nonce}" in tail.decode(errors="replace").splitlines()
    status = "passed" if passed else "timeout" if timed_out else "failed"
    return RunResult(status, mode, time.monotonic() - start)

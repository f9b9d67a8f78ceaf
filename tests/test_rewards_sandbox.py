"""The code sandbox: real HumanEval rows pass and fail as they should, and hostile programs are
killed on time and leave nothing behind, in both isolation modes."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rayrl.rewards import score_detailed
from rayrl.rewards.sandbox import run_python

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("reward_hostile", FIXTURES / "reward_hostile.py")
hostile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hostile)

TIMEOUT_S = 1.0


def namespaces_available() -> bool:
    """Independent oracle: can util-linux unshare create the namespaces the sandbox uses?"""
    if shutil.which("unshare") is None:
        return False
    flags = ["--net", "--pid", "--fork", "--mount", "--ipc"] + (
        [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    )
    return subprocess.run(["unshare", *flags, "true"], capture_output=True).returncode == 0


def test_isolation_mode_is_the_strongest_available() -> None:
    mode = run_python("x = 1", timeout_s=10).mode
    assert mode == ("namespace" if namespaces_available() else "process")
    assert run_python("x = 1", timeout_s=10, namespaces=False).mode == "process"


def test_humaneval_rows(guru_dir: Path) -> None:
    rows = pq.read_table(guru_dir / "online_eval" / "codegen__humaneval_164.parquet").to_pylist()
    solutions = {
        k: v
        for k, v in json.loads((FIXTURES / "humaneval_solutions.json").read_text()).items()
        if k.isdigit()
    }
    for index, sol in solutions.items():
        row = rows[int(index)]
        gt = row["reward_model"]["ground_truth"]
        for kind, expected in (("right", "matched"), ("wrong", "wrong")):
            response = (
                f"Here is my solution.\n```python\n{sol[kind]}```\nIt handles the edge cases."
            )
            v = score_detailed(
                row["data_source"], response, gt, ability=row["ability"], timeout_s=10
            )
            assert v.reason == expected, (index, kind, v)


def test_process_mode_runs_correct_code(guru_dir: Path) -> None:
    row = pq.read_table(guru_dir / "online_eval" / "codegen__humaneval_164.parquet").to_pylist()[0]
    sol = json.loads((FIXTURES / "humaneval_solutions.json").read_text())["0"]
    tests = json.loads(row["reward_model"]["ground_truth"])["functional"]
    assert run_python(sol["right"] + tests, timeout_s=10, namespaces=False).status == "passed"
    assert run_python(sol["wrong"] + tests, timeout_s=10, namespaces=False).status == "failed"


class Host:
    """Things outside the sandbox that hostile programs try to reach, and the checks on them."""

    def __init__(self) -> None:
        self.mark = f"4242.{random.randrange(10**8):08d}"
        self.dir = Path(tempfile.mkdtemp(prefix="rayrl-host-", dir="/tmp"))
        self.dir.chmod(0o777)  # world-writable: only the sandbox itself stands in the way
        self.file = self.dir / "victim.txt"
        self.file.write_text("original")
        self.file.chmod(0o666)
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.port = self.tcp.getsockname()[1]
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", self.port))
        self.udp.setblocking(False)
        self.tcp.settimeout(0.2)
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.tcp.accept()
                self.connections += 1
                conn.close()
            except OSError:
                pass

    def programs(self) -> list[tuple[str, str, float | None]]:
        return hostile.code_programs(str(self.dir), str(self.file), str(REPO), self.port, self.mark)

    def survivors(self) -> list[int]:
        pids = []
        for p in Path("/proc").iterdir():
            try:
                if p.name.isdigit() and self.mark.encode() in (p / "cmdline").read_bytes():
                    pids.append(int(p.name))
            except OSError:
                pass
        return pids

    def escaped_files(self) -> list[str]:
        leaks = [str(p) for p in self.dir.iterdir() if p != self.file]
        for d in ("/tmp", "/var/tmp", "/dev/shm", str(REPO)):
            leaks += [str(p) for p in Path(d).glob(f"{self.mark}*")]
        return leaks

    def check_and_clean(self) -> None:
        self._stop.set()
        self._thread.join()
        try:
            datagrams = len(self.udp.recv(64))
        except BlockingIOError:
            datagrams = 0
        survivors, leaks = self.survivors(), self.escaped_files()
        victim = self.file.read_text() if self.file.exists() else None
        for pid in survivors:  # ours: started by this test's programs
            os.kill(pid, signal.SIGKILL)
        for leak in leaks:
            Path(leak).unlink()
        shutil.rmtree(self.dir)
        self.tcp.close()
        self.udp.close()
        assert survivors == [], "processes outlived their sandbox"
        assert leaks == [], "files written outside the sandbox"
        assert victim == "original", "a file outside the sandbox was changed or deleted"
        assert (self.connections, datagrams) == (0, 0), "the sandbox reached the host's network"


@pytest.mark.parametrize("namespaces", [True, False], ids=["namespace", "process"])
def test_hostile_programs_are_contained(namespaces: bool) -> None:
    host = Host()
    programs = host.programs()
    if namespaces and namespaces_available():
        programs += hostile.ctypes_programs(host.mark)
    code = [p + hostile.CODE_TESTS for _, p, _ in programs]
    with ThreadPoolExecutor(6) as ex:
        results = list(
            ex.map(lambda c: run_python(c, timeout_s=TIMEOUT_S, namespaces=namespaces), code)
        )
    try:
        for (name, _, expected), r in zip(programs, results):
            assert r.seconds <= TIMEOUT_S + 1.0, (name, r)
            if expected is not None:
                assert (r.status == "passed") == (expected == 1.0), (name, r)
    finally:
        host.check_and_clean()
    # and the sandbox still works afterwards
    assert (
        run_python(hostile._INC + hostile.CODE_TESTS, timeout_s=10, namespaces=namespaces).status
        == "passed"
    )

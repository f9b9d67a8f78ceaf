"""Hard timeouts by process isolation: kill on timeout, quick replacement, threads, no leftovers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rayrl.rewards.isolate import Isolated

HUGE = "2^{10^{10}}"  # sympy computes this big integer in C; only a kill stops it


@pytest.fixture(scope="module")
def iso():
    iso = Isolated("rayrl.rewards.symbolic")
    iso.warm()
    yield iso
    iso.close()


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_call_and_timeout(iso: Isolated) -> None:
    assert iso.call("equivalent", ("\\frac{1}{2}", "0.5"), 10.0) == ("ok", True)
    killed_before, pid = iso.kills, iso._pid
    start = time.monotonic()
    assert iso.call("equivalent", ("7", HUGE), 1.0) == ("timeout", None)
    assert time.monotonic() - start < 2.0
    assert iso.kills == killed_before + 1
    start = time.monotonic()
    assert iso.call("equivalent", ("\\sqrt{8}", "2\\sqrt{2}"), 10.0) == ("ok", True)
    assert time.monotonic() - start < 1.0  # the replacement comes from the warm zygote
    assert iso._pid != pid
    deadline = time.monotonic() + 5  # SIGKILL is asynchronous; the old worker goes soon after
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)


def test_worker_crash_is_an_error_not_a_hang(iso: Isolated) -> None:
    iso.warm()
    victim = iso._pid
    killer = threading.Timer(0.3, os.kill, (victim, signal.SIGKILL))
    killer.start()
    assert iso.call("equivalent", ("7", HUGE), 20.0) == ("error", "worker died")
    assert iso.call("equivalent", ("3", "3.0"), 10.0) == ("ok", True)


def test_threads_share_one_isolated(iso: Isolated) -> None:
    results = {}

    def work(i: int) -> None:
        results[i] = iso.call("equivalent", (str(i), HUGE if i % 2 else f"{i}.0"), 1.0)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == {0: ("ok", True), 1: ("timeout", None), 2: ("ok", True), 3: ("timeout", None)}


def test_errors_come_back_as_type_names(iso: Isolated) -> None:
    assert iso.call("no_such_function", (), 10.0) == ("error", "AttributeError")


PARENT = """
import sys, time
from rayrl.rewards.isolate import Isolated
iso = Isolated("rayrl.rewards.symbolic")
iso.warm()
print(iso._zygote.pid, iso._pid, flush=True)
iso.call("equivalent", ("7", "2^{10^{10}}"), 600.0)  # the worker is busy when the parent dies
"""


def test_no_leftovers_when_the_parent_dies() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    zygote, worker = map(int, parent.stdout.readline().split())
    time.sleep(0.5)
    assert alive(zygote) and alive(worker)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while (alive(zygote) or alive(worker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(zygote) and not alive(worker)


def test_close_leaves_no_processes() -> None:
    iso = Isolated("rayrl.rewards.symbolic")
    iso.warm()
    zygote, worker = iso._zygote.pid, iso._pid
    iso.close()
    time.sleep(0.2)
    assert not alive(zygote) and not alive(worker)


FORKER = """
import os
from rayrl.rewards.isolate import Isolated
iso = Isolated("rayrl.rewards.symbolic")
iso.warm()
parent_worker = iso._pid
read, write = os.pipe()
pid = os.fork()
if pid == 0:  # the child must not reuse (and so corrupt) the parent's worker
    ok = iso.call("equivalent", ("\\\\sqrt{3}", "\\\\frac{3}{\\\\sqrt{3}}"), 30.0) == ("ok", True)
    os.write(write, b"%d %d" % (ok, iso._pid != parent_worker))
    os._exit(0)
os.waitpid(pid, 0)
child = os.read(read, 16).decode()
same = iso._pid == parent_worker
ok = iso.call("equivalent", ("\\\\sqrt{5}", "\\\\frac{5}{\\\\sqrt{5}}"), 30.0) == ("ok", True)
print(child, int(same), int(ok))
"""


def test_forked_copy_gets_its_own_worker() -> None:
    # in a fresh interpreter: forking this pytest process, which may host a Ray driver, is unsafe
    out = subprocess.run(
        [sys.executable, "-c", FORKER], capture_output=True, text=True, timeout=120
    )
    assert out.stdout.split() == ["1", "1", "1", "1"], out.stderr

"""Hard timeouts by process isolation: a warm worker process that is killed and re-forked on timeout.

`signal.alarm` only works on the main thread and cannot stop C code (a sympy big-integer power
never returns to the interpreter). Instead the expensive functions run in a worker process; on
timeout the parent SIGKILLs it. New workers are forked from a zygote process that imported and
warmed their module once, so a replacement is ready in ~10 ms instead of the ~1 s a
fresh interpreter needs to import sympy. Works from any thread and inside Ray actors: the parent
only uses pipes and `os.kill`, never signals to itself.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection

PR_SET_PDEATHSIG = 1
STARTUP_TIMEOUT_S = 120.0  # a cold zygote imports sympy; slow on a loaded 2-core machine


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the worker then exits on pipe EOF only
        pass


def _serve(conn: Connection, module, memory_mb: int) -> None:
    """Worker loop: call module.<fn>(*args) for each (fn, args) request until the parent goes away."""
    _die_with_parent()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    limit = memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # a huge power fails fast, not by OOM
    while True:
        try:
            fn, args = conn.recv()
        except (EOFError, OSError):
            os._exit(0)
        try:
            reply = ("ok", getattr(module, fn)(*args))
        except BaseException as e:  # noqa: BLE001 - any failure of untrusted input is a verdict
            # only the type: str() of a half-built sympy object can itself hang
            reply = ("error", type(e).__name__)
        try:
            conn.send(reply)
        except (OSError, ValueError):
            os._exit(0)


def zygote_main(ctl_fd: int, module_name: str, memory_mb: int, setup: str = "") -> None:
    """Import the module once (and call its setup(*json.loads(setup)) when given), then fork a
    worker per request and hand its socket to the parent."""
    module = importlib.import_module(module_name)
    if setup:
        module.setup(*json.loads(setup))
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers are reaped automatically
    ctl = socket.socket(fileno=ctl_fd)
    while ctl.recv(1):
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            ctl.close()
            ours.close()
            try:
                _serve(Connection(theirs.detach()), module, memory_mb)
            finally:
                os._exit(1)
        socket.send_fds(ctl, [pid.to_bytes(8, "little")], [ours.fileno()])
        ours.close()
        theirs.close()


class Isolated:
    """Calls module.fn(*args) in a killable worker process: `call(fn, args, timeout_s)`.

    Results should be plain Python values: the parent unpickles them outside any timeout.

    Returns ("ok", result), ("timeout", None) or ("error", exception type name).
    Thread-safe; calls are serialized, one worker per Isolated.
    """

    def __init__(self, module: str, memory_mb: int = 1024, setup: list | None = None):
        """setup: arguments (JSON values) of module.setup, called once in the zygote."""
        self.module, self.memory_mb = module, memory_mb
        self.setup = json.dumps(setup) if setup is not None else ""
        self.kills = 0  # workers killed on timeout
        self._forget()
        # A forked copy of this process must not talk to our worker: it starts its own.
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._zygote: subprocess.Popen | None = None
        self._ctl: socket.socket | None = None
        self._conn: Connection | None = None
        self._pid = 0

    def _start_zygote(self) -> None:
        self._stop_zygote()
        ours, theirs = socket.socketpair()
        code = "import sys; from rayrl.rewards.isolate import zygote_main as z; a = sys.argv; z(int(a[1]), a[2], int(a[3]), a[4])"
        argv = [str(theirs.fileno()), self.module, str(self.memory_mb), self.setup]
        self._zygote = subprocess.Popen(
            [sys.executable, "-c", code, *argv],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        ours.settimeout(STARTUP_TIMEOUT_S)
        self._ctl = ours

    def _stop_zygote(self) -> None:
        if self._ctl is not None:
            self._ctl.close()  # the zygote exits on EOF
        if self._zygote is not None:
            self._zygote.kill()
            self._zygote.wait()
        self._ctl = self._zygote = None

    def _fork_worker(self) -> None:
        for _ in range(2):  # a dead zygote is replaced once
            if self._ctl is None or self._zygote.poll() is not None:
                self._start_zygote()
            try:
                self._ctl.sendall(b"f")
                msg, fds, _, _ = socket.recv_fds(self._ctl, 8, 1)
            except OSError:
                msg, fds = b"", []
            if msg and fds:
                self._pid = int.from_bytes(msg, "little")
                self._conn = Connection(fds[0])
                return
            self._stop_zygote()
        raise RuntimeError(f"isolated worker for {self.module} could not be started")

    def _kill_worker(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
            try:
                os.kill(self._pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def warm(self) -> None:
        """Start the zygote and a worker now rather than on the first call."""
        with self._lock:
            if self._conn is None:
                self._fork_worker()

    def call(self, fn: str, args: tuple, timeout_s: float) -> tuple[str, object]:
        with self._lock:
            for _ in range(2):  # a worker found dead before the request is not this item's fault
                if self._conn is None:
                    self._fork_worker()
                try:
                    self._conn.send((fn, args))
                    break
                except OSError:
                    self._kill_worker()
            else:
                return ("error", "worker unavailable")
            try:
                if self._conn.poll(timeout_s):
                    return self._conn.recv()
                self.kills += 1
                self._kill_worker()
                return ("timeout", None)
            except (EOFError, OSError):  # the worker crashed mid-call (e.g. a C stack overflow)
                self._kill_worker()
                return ("error", "worker died")

    def close(self) -> None:
        with self._lock:
            self._kill_worker()
            self._stop_zygote()

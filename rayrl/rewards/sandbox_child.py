"""Child side of the code sandbox, run as `python -I sandbox_child.py JOB.json`.

Standalone on purpose (stdlib only, no rayrl import): it sets up the confinement, then execs the
untrusted program. What is enforced, strongest first:
- namespace mode (Linux, root or unprivileged user namespaces): new PID, network, mount and IPC
  namespaces. No network interface but a down loopback; every process the program starts dies
  with the namespace's init; fresh tmpfs on /tmp, /var/tmp, /dev/shm and /run/lock, so the
  program's directory is a private /tmp. Started as root, it then runs as `nobody`: root-owned
  files are read-only to it, rlimits cannot be raised and RLIMIT_NPROC caps forks.
- both modes: RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NOFILE, no core dumps, a parent-death
  signal, stdin/stdout/stderr on /dev/null.
- process mode (no namespaces), or namespace mode without root: Python-level guards on sockets,
  writes and deletes outside the directory (and, in process mode, on fork/exec/kill). These are
  best effort: ctypes or a C extension can bypass them.
The parent kills the whole process group at the wall-clock timeout.
"""

import builtins
import ctypes
import io
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 0x4000, 1 << 18
PR_SET_PDEATHSIG = 1
NOBODY = 65534
MAX_PROCS = 8  # with RLIMIT_AS, bounds a fork-and-allocate bomb to MAX_PROCS * memory_mb
# Imported before dropping to `nobody`, who may not be able to read the interpreter's directory.
PRELOAD = (
    "array bisect cmath collections copy dataclasses datetime decimal enum fractions functools "
    "hashlib heapq itertools json math numbers operator random re statistics string textwrap "
    "time typing unicodedata"
).split()
PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
PATH_FUNCTIONS = (
    "remove unlink rmdir removedirs rename renames replace mkdir makedirs chmod chown lchown "
    "symlink link truncate utime"
).split()
PROCESS_FUNCTIONS = (
    "fork forkpty system popen kill killpg execv execve execvp execvpe posix_spawn posix_spawnp "
    "spawnv spawnve"
).split()

libc = ctypes.CDLL(None, use_errno=True)


def check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(
    source: str, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    args = [None if s is None else s.encode() for s in (source, target, fstype)]
    check(libc.mount(*args, flags, None if data is None else data.encode()), f"mount {target}")


def enter_namespaces(root: bool) -> None:
    """unshare + fork: the caller returns as PID 1 of the new namespaces; its parent waits."""
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWPID | CLONE_NEWNET
    check(libc.unshare(flags | (0 if root else CLONE_NEWUSER)), "unshare")
    if not root:  # map ourselves to root inside, to be allowed to mount
        for name, text in (
            ("setgroups", "deny"),
            ("uid_map", f"0 {uid} 1"),
            ("gid_map", f"0 {gid} 1"),
        ):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    pid = os.fork()
    if pid:
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 1)
    try:  # from here on a failure must not fall back to process mode in half-made namespaces
        check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL), "prctl")
        mount("none", "/", None, MS_REC | MS_PRIVATE)  # nothing propagates back to the host
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        for d in PRIVATE_DIRS:
            if os.path.isdir(d):
                mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,mode=1777")
    except OSError:
        os._exit(1)


def set_limits(job: dict, root: bool) -> None:
    cpu = int(job["timeout_s"]) + 1
    mem = job["memory_mb"] * 2**20
    fsize = job["max_file_mb"] * 2**20
    for res, value in (
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_AS, (mem, mem)),
        (resource.RLIMIT_FSIZE, (fsize, fsize)),
        (resource.RLIMIT_NOFILE, (64, 64)),
        (resource.RLIMIT_CORE, (0, 0)),
    ):
        resource.setrlimit(res, value)
    if root:  # per real uid: only meaningful once we are the otherwise unused `nobody`
        resource.setrlimit(resource.RLIMIT_NPROC, (MAX_PROCS, MAX_PROCS))


def install_guards(workdir: str, processes: bool) -> None:
    """Best-effort Python-level guards for when the kernel does not enforce the same."""

    def inside(path) -> bool:
        if isinstance(path, int):
            return True  # an already-open descriptor
        full = os.path.realpath(os.path.join(workdir, os.fsdecode(path)))
        return full in (workdir, os.devnull) or full.startswith(workdir + os.sep)

    def refuse(*_a, **_k):
        raise PermissionError("not allowed in the rayrl sandbox")

    real_open, real_os_open = builtins.open, os.open

    def guarded_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+") and not inside(file):
            refuse()
        return real_open(file, mode, *a, **k)

    def guarded_os_open(path, flags, *a, **k):
        writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
        if flags & writes and not inside(path):
            refuse()
        return real_os_open(path, flags, *a, **k)

    def guard_paths(fn):
        def guarded(*paths, **k):
            if not all(inside(p) for p in paths[:2] if isinstance(p, (str, bytes, os.PathLike))):
                refuse()
            return fn(*paths, **k)

        return guarded

    builtins.open = io.open = guarded_open
    os.open = guarded_os_open
    for name in PATH_FUNCTIONS:
        setattr(os, name, guard_paths(getattr(os, name)))
    shutil.rmtree = guard_paths(shutil.rmtree)
    socket.socket = socket.socketpair = socket.create_connection = refuse
    if processes:
        for name in PROCESS_FUNCTIONS:
            setattr(os, name, refuse)
        subprocess.Popen = refuse


def main() -> None:
    with open(sys.argv[1]) as f:
        job = json.load(f)
    os.remove(sys.argv[1])  # it holds the nonce; gone before anything untrusted runs
    check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL), "prctl")
    report = os.dup(1)  # our channel to the parent; the program writes to /dev/null
    root = os.geteuid() == 0
    mode, workdir = "process", job["workdir"]
    if job["namespaces"]:
        try:
            enter_namespaces(root)
            mode, workdir = "namespace", "/tmp"
        except OSError:
            pass  # no namespaces here (container without privileges): keep process mode
    os.chdir(workdir)
    set_limits(job, root)
    for name in PRELOAD:
        __import__(name)
    if root:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if not (mode == "namespace" and root):
        install_guards(os.path.realpath(workdir), processes=mode == "process")
    os.write(report, f"mode {mode}\n".encode())
    nonce = job.pop("nonce")
    try:
        program = compile(job.pop("code"), "solution.py", "exec")
        exec(program, {"__name__": "__sandbox__", "__builtins__": builtins})
    except BaseException:  # noqa: BLE001 - failing tests, SystemExit and crashes all mean "fail"
        os._exit(1)
    os.write(report, f"pass {nonce}\n".encode())
    os._exit(0)


if __name__ == "__main__":
    main()

"""Writes that a full disk or a kill cannot leave half-done, and the error a full disk gives.

A file that is rewritten (metrics.parquet, a manifest) goes to a temporary file beside it,
is fsynced and renamed over the old one, and the directory is fsynced: a reader sees the
old file or the new one, never a part. A line appended to a log (steps.jsonl) is fsynced,
or cut off again if its write fails. A write that fails for space (ENOSPC, or EDQUOT for a
quota) raises OutOfSpace, which names the directory and says it is out of space.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
SPACE_MESSAGE = "No space left on device"  # strerror(ENOSPC): how a remote error says it


class OutOfSpace(OSError):
    """A write that failed for space: names the directory and what to do."""

    def __init__(self, directory: str | Path, what: str = "") -> None:
        self.directory, self.what = str(directory), what
        writing_what = f" writing {what}" if what else ""
        super().__init__(
            errno.ENOSPC,
            f"{self.directory}: out of space ({SPACE_MESSAGE}){writing_what}; free space or "
            "move it to a larger disk, then run again to resume",
        )

    def __str__(self) -> str:
        return self.args[1]

    def __reduce__(self) -> tuple:  # through Ray's pickling as itself
        return OutOfSpace, (self.directory, self.what)

    @classmethod
    def named_in(cls, e: BaseException | str, directory: str | Path, what: str = "") -> OutOfSpace:
        """The OutOfSpace a wrapped error's text names (a trial's, deeper down), else one for
        `directory`."""
        inner = re.search(r"(/\S+): out of space", str(e))
        return cls(inner.group(1)) if inner else cls(Path(directory).resolve(), what)


def is_out_of_space(e: BaseException) -> bool:
    """An error, or one in its chain, that a write failed for space (also once Ray or Tune
    has wrapped it, keeping only its text)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in SPACE_ERRNOS:
            return True
        if SPACE_MESSAGE in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


NEARLY_FULL = 16 << 20  # free bytes under which a failed write is taken for a full disk


def nearly_full(directory: str | Path) -> bool:
    """Whether the file system of `directory` (or its nearest existing parent) has less
    than NEARLY_FULL bytes free for this user."""
    path = Path(directory).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize < NEARLY_FULL


@contextmanager
def writing(directory: str | Path, what: str = "") -> Iterator[None]:
    """Turn a failed write's ENOSPC or EDQUOT (raised here, or in a Ray actor and wrapped on
    the way back) into OutOfSpace naming `directory`; also any failure while `directory`'s
    disk is nearly full (torch's checkpoint writer reports a full disk as "iostream error"
    or "unexpected pos", without an errno)."""
    try:
        yield
    except OutOfSpace:
        raise
    except Exception as e:
        if is_out_of_space(e) or nearly_full(directory):
            # A wrapped OutOfSpace from deeper down (a trial's) names its own directory.
            raise OutOfSpace.named_in(e, directory, what) from e
        raise


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` a temporary file beside `path`, fsync it and rename it over `path`:
    `path` holds its old content or the new, whole. A failure leaves no temporary file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with writing(path.parent, path.name):
        try:
            write(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    replace_atomic(path, lambda tmp: tmp.write_bytes(data))


def append_line(path: str | Path, line: str) -> None:
    """Append one line and fsync it; a failed write is cut off again, so the file never ends
    in a part of a line."""
    data = (line + "\n").encode()
    with writing(Path(path).parent, Path(path).name):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except BaseException:
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)

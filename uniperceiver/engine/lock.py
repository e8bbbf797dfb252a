"""An exclusive lock on a run's output directory, held for the life of the run.

`fcntl.flock` on `<output_dir>/.lock`: the kernel releases it whenever the holder's process ends
(normal exit, exception, kill -9), so a lock left by a crashed run is never in the way of the
rerun. The file's content (host, pid, start time) only names the holder in the message a second
trainer gets. The file itself stays: unlinking it would let two processes lock two different
inodes of the same name.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from ..utils.errors import BadInput

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"


class OutputDirLockedError(RuntimeError, BadInput):
    """Another live process trains in this output directory (bad input: exit code 2)."""


class OutputDirLock:
    def __init__(self, output_dir: str | Path) -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown holder"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputDirLockedError(
                    f"train.output_dir {self.output_dir} is in use by another run ({holder}); wait for it to "
                    f"finish or choose another train.output_dir") from None
            # A file system without flock support (some Lustre mounts): say so and go on unlocked.
            log.warning("cannot lock %s (%s); two runs on this directory would not be detected", self.path, exc)
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def worker_init_fn(self, forget):
        """`functools.partial(forget, fd, (dev, inode))` for DataLoader workers, or None when not held."""
        if self._fd is None:
            return None
        import functools

        st = os.fstat(self._fd)
        return functools.partial(forget, self._fd, (st.st_dev, st.st_ino))

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> OutputDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()

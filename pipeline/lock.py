"""One writer per output directory: ``with DirectoryLock(out_dir): ...`` around every stage that writes there.

The lock is ``flock`` on ``<dir>/.asym3d.lock``, which the kernel releases when its process dies however it dies, so
a killed run never blocks the next one. The file also names its holder (PID, host, start time, command): a second
writer is refused at once in one line naming them, and a run that finds a holder written by a process that is gone
takes the lock over with a warning naming it. On acquiring the lock, temporary files a killed writer left behind are
deleted (nobody else can be writing them now).

Worker processes must not outlive the holder (they would keep writing after a rerun took over): see
:func:`pipeline.runner.run_tasks`.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
from pathlib import Path

from pipeline.store import TMP_GLOB, StoreError, write_error

LOCK_FILE = ".asym3d.lock"
log = logging.getLogger("asym3d")


def _describe(holder: dict) -> str:
    return (f"PID {holder.get('pid')} on {holder.get('host')} since {holder.get('started')} "
            f"({holder.get('command', '?')})")


class DirectoryLock:
    """Exclusive, non-blocking lock on a directory (created if missing); raises :class:`StoreError` when held."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.path = self.root / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> "DirectoryLock":
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise write_error(self.path, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise write_error(self.path, exc) from None
            raise StoreError(f"{self.root}: another asym3d process writes here ({_describe(holder)}); wait for it "
                             "to finish or use another directory") from None
        previous = _read_holder(fd)
        if previous:
            log.warning(f"{self.root}: taking over the lock of {_describe(previous)}, which is gone")
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])[:300]}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise write_error(self.path, exc) from None
        self._fd = fd
        for leftover in self.root.glob(TMP_GLOB):
            leftover.unlink(missing_ok=True)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # an empty lock file says "released cleanly"
        except OSError:  # a full or read-only disk: the holder stays written, the next run takes it over
            pass
        os.close(self._fd)  # releases the flock
        self._fd = None


def _read_holder(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {"pid": "?", "host": "?", "started": "?", "command": "unreadable lock file"}

"""One owner per run folder: the process that writes a run folder (`flowpo train`, new or
--resume) holds an exclusive OS file lock on `<run>/.flowpo.lock` while it runs.

The lock is `fcntl.flock` on that file, so the kernel drops it when its holder exits, however it
exits (a SIGKILL too). Beside the lock, in the same file, the holder writes who it is (pid, host,
start time); a second writer that finds the lock taken stops with one line naming the holder. A
file that still names a holder while the lock itself is free was left by a process that died: the
next writer takes it over and says so. A clean release empties the file (it is never deleted, so
two processes can never hold locks on two different files of the same name).

Readers (`eval`, `export`, `sample`) never take it. Under torchrun the job's rank 0 takes it for
all its ranks (`hold(..., rank=...)`); the other ranks proceed without it.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".flowpo.lock"


class RunBusy(Exception):
    """Another live process holds the run folder's lock (the CLI exits 2 with this line)."""


def _holder_text(info: dict | None) -> str:
    if not info:
        return "another process (it has not written its pid yet)"
    since = info.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    cmd = f", {info['command']}" if isinstance(info.get("command"), str) else ""
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')} since {when}{cmd}"


def _read_info(fd: int) -> dict | None:
    try:
        data = os.pread(fd, 4096, 0)
    except OSError:
        return None
    if not data.strip():
        return None
    try:
        info = json.loads(data.decode("utf-8", "replace"))
    except ValueError:
        return {"pid": "?", "host": "?"}  # written by something else: still a holder
    return info if isinstance(info, dict) else {"pid": "?", "host": "?"}


class RunLock:
    """The exclusive lock of one run folder (`acquire` / `release`, or a `with` block)."""

    def __init__(self, folder: str | Path, command: str = "flowpo train"):
        self.folder, self.command = Path(folder), command
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise
                info = None
                for _ in range(20):  # the holder writes its pid right after it locks
                    info = _read_info(fd)
                    if info:
                        break
                    time.sleep(0.05)
                os.close(fd)
                raise RunBusy(f"{self.folder} is in use by {_holder_text(info)} (it holds {self.path}); wait for "
                              "it to finish or stop it, or choose another --out") from None
            try:  # the file may have been removed and recreated between open and flock: lock the current one
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = _read_info(fd)
        if stale:
            print(f"flowpo: taking over the lock of {self.folder} left by {_holder_text(stale)}: that process has "
                  "ended without releasing it", file=sys.stderr)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "command": self.command}
        data = json.dumps(info).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        self.fd = fd
        return self

    def release(self, remove: bool = False) -> None:
        """Give the lock back; remove=True also deletes the lock file (a folder this process created
        and is removing again)."""
        if self.fd is None:
            return
        try:
            if remove:
                self.path.unlink(missing_ok=True)
            else:
                os.ftruncate(self.fd, 0)
        except OSError:
            pass
        os.close(self.fd)  # closing the last descriptor drops the flock
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextmanager
def hold(folder: str | Path, *, rank: int = 0, command: str = "flowpo train"):
    """Hold `folder`'s lock for the block (rank 0 only; other ranks get None). The folder is
    created if needed; if this block created it and it holds nothing but the lock when the block
    fails, it is removed again (with the parents it created), so bad input leaves no trace."""
    if rank != 0:
        yield None
        return
    folder = Path(folder)
    created = []
    p = folder
    while not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    lock = RunLock(folder, command)
    lock.acquire()  # (a folder created here that another process locked first is left to it)
    ok = False
    try:
        yield lock
        ok = True
    finally:
        if not ok and created and [q.name for q in folder.iterdir()] == [LOCK_NAME]:
            lock.release(remove=True)
            _remove_created(created)
        else:
            lock.release()


def _remove_created(created: list[Path]) -> None:
    for p in created:  # deepest first; only empty folders go
        try:
            p.rmdir()
        except OSError:
            break

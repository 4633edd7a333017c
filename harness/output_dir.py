"""A study's output folder: created with a one-line error when it cannot be, and locked while a run uses it.

Why a lock: the default stores are two SQLite files inside the folder. Two ``harness run`` started on
one new folder race to create MLflow's schema (``duplicate column name: step``) and, on an existing
store, hit "database is locked"; workers of ONE run share the stores safely because the parent creates
them first. So a run holds an exclusive ``flock`` on ``<output_dir>/.harness-run.lock`` from before it
opens a store until it returns, and a second run on the same folder stops at once with one line naming
the ways to run in parallel (``--workers``, or PostgreSQL and an MLflow server for several machines).

The lock is taken only when a local store lives in the folder (SQLite or a journal file): runs on
several machines against a PostgreSQL storage and a tracking server are meant to run at once, whatever
folder they write their trial files to. ``flock`` is released by the kernel when the process dies, so a
killed run never leaves a stale lock behind.

Example::

    with lock_output_dir(prepare_output_dir(spec.output_path)):
        ...   # open the stores, run the trials
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from harness.errors import HarnessError

__all__ = ["LOCK_NAME", "lock_output_dir", "prepare_output_dir"]

LOCK_NAME = ".harness-run.lock"


def prepare_output_dir(path: str | Path) -> Path:
    """Create the output folder (and its parents); a file in the way or no write access is one line."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise HarnessError(f"output dir {path} is a file, not a folder: give another --output-dir") from None
    except NotADirectoryError:
        raise HarnessError(
            f"output dir {path}: a parent of it is a file, not a folder: give another --output-dir"
        ) from None
    except OSError as err:
        raise HarnessError(
            f"output dir {path}: cannot create it ({err.strerror}): give a writable --output-dir"
        ) from None
    if not path.is_dir():
        raise HarnessError(f"output dir {path} is not a folder: give another --output-dir")
    if not os.access(path, os.W_OK | os.X_OK):
        raise HarnessError(f"output dir {path} is not writable: give a writable --output-dir")
    return path


@contextlib.contextmanager
def lock_output_dir(path: str | Path, *, needed: bool = True) -> Iterator[None]:
    """Hold the folder's run lock for the ``with`` block; refuse with one line when another run holds it.

    ``needed=False`` (every store is a server): no lock, runs on several machines are meant to overlap.
    """
    if not needed:
        yield
        return
    lock_path = Path(path) / LOCK_NAME
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise HarnessError(f"output dir {path}: cannot create {LOCK_NAME} ({err.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise HarnessError(f"output dir {path}: cannot lock {LOCK_NAME} ({err.strerror})") from None
            holder = _read_holder(fd)
            raise HarnessError(
                f"another `harness run` ({holder}) is using {path}: wait for it to finish, run one command with "
                "--workers N to train in parallel on this machine, or use --storage postgresql://... and an "
                "MLflow tracking server for runs that overlap"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "pid unknown"

"""A storage failure (full disk, read-only file system, a store that went away) as one line.

Why: Optuna's RDB storage and MLflow's SQLAlchemy store raise their database errors deep inside a trial
(``sqlite3.OperationalError: database or disk is full``, wrapped in their own exception types), so a
full disk ended ``harness run`` in a traceback. The line names the store (read from where the error was
raised: MLflow's code or Optuna's) and the cause. SQLite commits are atomic, so what was committed
before the failure (finished trials) is intact; the same command resumes once the cause is removed.
"""

from __future__ import annotations

import errno
import logging
import traceback

__all__ = ["describe_storage_error", "quiet_store_logs"]

_CAUSES = (
    "database or disk is full",
    "disk i/o error",
    "no space left on device",
    "readonly database",
    "read-only file system",
    "unable to open database file",
    "disk quota exceeded",
    "file too large",
)
_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG, errno.EIO}


def _chain(err: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while err is not None and err not in seen:
        seen.append(err)
        err = err.__cause__ or err.__context__
    return seen


def _cause(errors: list[BaseException]) -> str | None:
    for err in errors:
        if isinstance(err, OSError) and err.errno in _ERRNOS:
            return err.strerror or str(err)
        text = str(err).lower()
        for cause in _CAUSES:
            if cause in text:
                return cause
    return None


def _store(errors: list[BaseException], optuna_url: str, tracking_uri: str) -> str:
    modules = [
        frame.f_globals.get("__name__", "")
        for err in errors
        for frame, _ in traceback.walk_tb(err.__traceback__)
    ]
    for name in reversed(modules):  # the innermost library frame names the store
        if name.startswith("mlflow"):
            return f"MLflow store {tracking_uri}"
        if name.startswith("optuna"):
            return f"Optuna storage {optuna_url}"
    return "output dir"


def describe_storage_error(err: BaseException, *, optuna_url: str, tracking_uri: str) -> str | None:
    """One line for a storage failure (None when ``err`` is something else)."""
    errors = _chain(err)
    cause = _cause(errors)
    if cause is None:
        return None
    store = _store(errors, optuna_url, tracking_uri)
    return (
        f"{store}: {cause}. Finished trials are kept; free space (or fix the store) and run the same "
        "command again"
    )


def quiet_store_logs() -> None:
    """MLflow logs every database error with its whole traceback (``mlflow.store.db.utils``, level ERROR)
    before raising it; the harness reports the raised error in one line, so that log says it twice."""
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

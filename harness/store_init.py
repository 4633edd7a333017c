"""Create a study's SQLite stores whole or not at all.

Why: MLflow builds its SQLite schema through a chain of Alembic migrations, each committed on its own;
a disk that fills up half way (``database or disk is full``) leaves a file that no later run can open
("table secrets already exists"), so freeing space did not let the same command resume. Here a missing
store is built in a temporary file next to it and renamed into place only when its schema is complete;
a failure removes the temporary file and leaves the folder as it was.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

__all__ = ["create_sqlite_store", "ensure_mlflow_store", "ensure_optuna_store"]


def create_sqlite_store(path: Path, build: Callable[[str], None]) -> None:
    """Build the store at ``path`` with ``build(url)`` on a temporary file, then rename it into place."""
    if path.exists():
        return
    # a fresh name per attempt: a library may cache an engine per URL, still bound to a failed attempt
    tmp = path.with_name(f".{path.name}.creating-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        build(f"sqlite:///{tmp}")
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + "-journal")):
            leftover.unlink(missing_ok=True)


def ensure_mlflow_store(tracking_uri: str) -> None:
    """A local MLflow SQLite store with its whole schema (no-op for a server or an existing file)."""
    if not tracking_uri.startswith("sqlite:///"):
        return

    def build(url: str) -> None:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        store = SqlAlchemyStore(url, default_artifact_root=str(Path(url.removeprefix("sqlite:///")).parent))
        store.engine.dispose()

    create_sqlite_store(Path(tracking_uri.removeprefix("sqlite:///")), build)


def ensure_optuna_store(storage_url: str) -> None:
    """A local Optuna SQLite storage with its whole schema (no-op for other storages or an existing file)."""
    if not storage_url.startswith("sqlite:///"):
        return

    def build(url: str) -> None:
        from optuna.storages import RDBStorage

        storage = RDBStorage(url)
        storage.engine.dispose()

    create_sqlite_store(Path(storage_url.removeprefix("sqlite:///")), build)

"""Real services for the tests: a throwaway PostgreSQL cluster, an ``mlflow server``, headless Chromium.

Why real ones: the README tells users to scale out on PostgreSQL and an MLflow tracking server and to read
the report in a browser; SQLite, journal files and HTML parsing do not prove any of that.

Each service is found on the machine or the test is skipped with a reason that ``pytest -ra`` shows:

- PostgreSQL: Debian's ``postgresql-NN`` package, whose ``initdb``/``pg_ctl`` are not on PATH
  (``dpkg -L`` finds them); ``initdb`` refuses root, so as root the cluster runs as the ``postgres`` user
  in a temporary directory that user owns.
- MLflow server: the ``mlflow`` package of this environment, on a free loopback port, in its own process
  group (its uvicorn workers and job consumers are children: stopping it means stopping the group).
- Chromium: ``/usr/bin/chromium`` (Debian's package), driven by Playwright's Python package; Playwright's
  own browsers are never downloaded.

Every start is bounded in time and every stop runs in a finalizer.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = [
    "CHROMIUM_ARGS",
    "MlflowServer",
    "PostgresCluster",
    "SmokeRun",
    "chromium_path",
    "free_port",
    "mlflow_server",
    "pg_bin_dir",
    "postgres",
    "run_smoke_study",
    "smoke_run",
    "stop_group",
]

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_group(process: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the process group of ``process`` (started with ``start_new_session``), SIGKILL what is left."""

    def alive() -> bool:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return False
        return True

    if alive():
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.time() + grace
    while alive() and time.time() < deadline:  # the leader may be gone while its children linger
        process.poll()
        time.sleep(0.2)
    if alive():
        os.killpg(process.pid, signal.SIGKILL)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


# --------------------------------------------------------------------------------------------------
# PostgreSQL


def pg_bin_dir() -> Path | None:
    """The folder of ``initdb``: PATH first, else the newest Debian ``postgresql-NN`` package's files."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    if not shutil.which("dpkg-query"):
        return None
    try:
        listed = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Package}\n", "postgresql-[0-9]*"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    for package in sorted(listed, key=lambda p: int(p.rsplit("-", 1)[1]) if p[-1].isdigit() else 0)[::-1]:
        files = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, timeout=30).stdout
        for line in files.splitlines():
            if line.endswith("/bin/initdb") and Path(line).is_file():
                return Path(line).parent
    return None


class PostgresCluster:
    """A cluster in a temporary directory on a free loopback port, trust authentication, user ``postgres``."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="unisd-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self._as_user: list[str] = []
        if os.geteuid() == 0:  # initdb refuses root
            import pwd

            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]
        self.root.chmod(0o755)

    def _run(self, *args: str, timeout: float = 120) -> None:
        done = subprocess.run(
            [*self._as_user, *args], capture_output=True, text=True, timeout=timeout, cwd=self.root
        )
        if done.returncode != 0:
            log = self.log.read_text() if self.log.is_file() else ""
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stdout}{done.stderr}\n{log}")

    def start(self) -> None:
        self._run(
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "--encoding=UTF8",
            "--no-locale",
        )
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        )
        self._run(
            str(self.bin_dir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            options,
            "-w",
            "-t",
            "90",
            "start",
            timeout=120,
        )

    def url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database; returns its SQLAlchemy URL (``postgresql://``, psycopg2)."""
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """One cluster for the session; each test creates its own databases on it."""
    bin_dir = pg_bin_dir()
    if bin_dir is None:
        pytest.skip(
            "PostgreSQL server not installed (no initdb on PATH nor in a Debian postgresql-NN package)"
        )
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no 'postgres' user to run initdb as")
    for module in ("psycopg", "psycopg2"):
        try:
            __import__(module)
        except ImportError:
            pytest.skip(f"{module} not installed (pip install -e '.[dev]')")
    cluster = PostgresCluster(bin_dir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


# --------------------------------------------------------------------------------------------------
# MLflow tracking server


class MlflowServer:
    """``mlflow server`` on loopback over a backend store URL, artifacts served from a local folder."""

    def __init__(self, backend_uri: str, artifacts: Path, log: Path) -> None:
        self.backend_uri = backend_uri
        self.artifacts = artifacts
        self.log_path = log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 240) -> None:
        """Start and wait for ``/health`` (about 13 s on an idle machine; much longer on a busy one)."""
        self.artifacts.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            self.backend_uri,
            "--artifacts-destination",
            str(self.artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        log = open(self.log_path, "a")  # noqa: SIM115 - the server writes to it until it stops
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.artifacts
        )
        log.close()
        deadline = time.time() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(
                    f"mlflow server never answered /health: {self.log_path.read_text()[-3000:]}"
                )
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process)
            self.process = None


@pytest.fixture()
def mlflow_server(postgres, tmp_path) -> Iterator[MlflowServer]:
    """A fresh MLflow server per test, on its own database of the session's cluster."""
    name = f"mlflow_{os.getpid()}_{int(time.time() * 1000) % 10**9}"
    server = MlflowServer(
        postgres.create_database(name), tmp_path / "server-artifacts", tmp_path / "mlflow.log"
    )
    try:
        server.start()
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------------
# Chromium


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


# --------------------------------------------------------------------------------------------------
# One smoke study, run as a user without a terminal would: `harness run studies/smoke.yaml > log 2>&1`


class SmokeRun:
    """Where the shared smoke study put things: its log (stdout and stderr, no TTY), stores, report."""

    def __init__(
        self, root: Path, log: Path, output_dir: Path, report_dir: Path | None, seconds: float
    ) -> None:
        self.root, self.log, self.output_dir, self.report_dir, self.seconds = (
            root,
            log,
            output_dir,
            report_dir,
            seconds,
        )


def run_smoke_study(root: Path, timeout: float = 900) -> SmokeRun:
    repo = Path(__file__).resolve().parents[1]
    log = root / "run.log"
    out = root / "out"
    start = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "harness",
                "run",
                str(repo / "studies" / "smoke.yaml"),
                "--output-dir",
                str(out),
            ],
            cwd=root,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            timeout=timeout,
        )
    seconds = time.perf_counter() - start
    text = log.read_text()
    assert done.returncode == 0, text[-4000:]
    report = None
    for line in text.splitlines():
        if line.startswith("report: "):
            report = Path(line.removeprefix("report: ").strip())
            report = report if report.is_absolute() else root / report
    return SmokeRun(root, log, out, report, seconds)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> SmokeRun:
    """The smoke study, once per session, shared by the console and browser tests."""
    return run_smoke_study(tmp_path_factory.mktemp("smoke_study"))

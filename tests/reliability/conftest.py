"""Fault-injection harness: a stack with several named workers, and servers the tests own.

`Cluster` extends the integration `Stack` (same config, API client and worker
command) with any number of named `celery worker` processes, each with its own
environment overrides, `STABLETRAIN_WORKER_ID` and log file. `RedisServer` and
`PostgresServer` are private servers on free ports under a temp folder, so the
tests that stop a broker or a database never touch the shared ones. Every
process a test starts is stopped by its pid in a finalizer.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from app.extensions import db
from app.models import Job
from tests.conftest import create_key
from tests.integration.conftest import Stack, launch_worker_process
from worker.testing import wait_for

CI = os.environ.get("CI", "").lower() == "true"


def need(condition: bool, reason: str) -> None:
    """Skip when a prerequisite is missing; under CI=true fail instead."""
    if condition:
        return
    if CI:
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_pid(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, timeout_s: float = 30) -> None:
    """Stop one process we started, by its pid; SIGKILL if it ignores `sig`."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


class Cluster(Stack):
    """A Stack with named workers: start, kill and read the log of each one."""

    def __init__(self, name: str, database_url: str, broker_url: str, root: Path) -> None:
        super().__init__(name, database_url, broker_url, root)
        self.workers: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def engine(self) -> Engine:
        with self.app.app_context():
            return db.engine

    def prepare(self) -> None:
        """Schema from the models (migrations are tested in tests/api) and an API key."""
        with self.app.app_context():
            db.create_all()
        _, secret = create_key(self.app.test_cli_runner(), f"reliability-{self.name}")
        self.auth = {"Authorization": f"Bearer {secret}"}

    def worker_log_path(self, name: str) -> Path:
        return self.root / f"worker-{name}.log"

    def start_worker(self, name: str = "w1", **env: Any) -> subprocess.Popen[bytes]:  # type: ignore[override]
        """Start worker `name` (its jobs.worker_id) with STABLETRAIN_<KEY>=value overrides; wait until ready."""
        return self.start_workers(name, **env)[0]

    def start_workers(self, *names: str, **env: Any) -> list[subprocess.Popen[bytes]]:
        """Start several workers at once (they import torch in parallel) and wait until all are ready."""
        started = []
        for name in names:
            worker_env = {**self.env, "STABLETRAIN_WORKER_ID": name,
                          **{f"STABLETRAIN_{k}": str(v) for k, v in env.items()}}
            proc, wait_ready = launch_worker_process(worker_env, self.worker_log_path(name), name)
            self.workers[name] = proc
            started.append((proc, wait_ready))
        for _, wait_ready in started:
            wait_ready()
        return [proc for proc, _ in started]

    def kill_worker(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal one worker by pid and wait until it is gone."""
        stop_pid(self.workers.pop(name), sig)

    def stop_worker(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> None:
        """Stop every worker by pid: signal them all first, then wait for each."""
        procs = [self.workers.pop(name) for name in list(self.workers)]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(sig)
        for proc in procs:
            stop_pid(proc, sig, timeout_s)

    def close(self) -> None:
        # the test is over and nothing it checks depends on a clean exit: SIGKILL (a warm
        # shutdown of an idle worker takes ~6 s of the embedded broker's poll loop)
        self.stop_worker(signal.SIGKILL)
        with self.app.app_context():
            db.engine.dispose()

    def log_of(self, name: str) -> str:
        path = self.worker_log_path(name)
        return path.read_text("utf-8", "replace") if path.exists() else ""

    def log_tail(self, chars: int = 6000) -> str:
        parts = []
        for path in sorted(self.root.glob("worker-*.log")):
            parts.append(f"--- {path.name} ---\n{path.read_text('utf-8', 'replace')[-chars:]}")
        return "\n".join(parts)

    def job_row(self, job_id: str) -> Any:
        """The job's record read straight from the database (worker_id, attempts, ...)."""
        with self.engine.connect() as conn:
            return conn.execute(select(Job).where(Job.id == job_id)).one()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture
def make_cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """Factory: a Cluster on the given database/broker (default: SQLite file + embedded broker)."""
    made: list[Cluster] = []

    def make(database_url: str | None = None, broker_url: str | None = None) -> Cluster:
        root = tmp_path / f"cluster{len(made)}"
        root.mkdir()
        cluster = Cluster(request.node.name, database_url or f"sqlite:///{root / 'stabletrain.db'}",
                          broker_url or f"sqlalchemy+sqlite:///{root / 'broker.db'}", root)
        made.append(cluster)
        cluster.prepare()
        return cluster

    yield make
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for cluster in made:
        cluster.close()
        if failed:
            print(f"\n{cluster.log_tail()}")


@pytest.fixture(scope="session")
def corpus() -> bytes:
    path = Path(__file__).resolve().parents[1] / "data" / "corpus.txt"
    return path.read_bytes()


class RedisServer:
    """A private redis-server on a free port; stop() and start() it at will (same port)."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.root / "redis.log", "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.root), "--daemonize", "no"], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_for(self.answers, 30, f"redis on port {self.port}")

    def answers(self) -> bool:
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def stop(self, keep_data: bool = False) -> None:
        """Stop the server; with `keep_data` it saves its data first and the next start loads it
        (a restart with persistence), else the next start is empty (a restart that lost the queue)."""
        if keep_data and self.proc is not None and self.proc.poll() is None:
            import redis

            client = redis.Redis(host="127.0.0.1", port=self.port)
            try:
                client.shutdown(save=True)
            except redis.ConnectionError:  # the server closes the connection as it exits
                pass
            finally:
                client.close()
        stop_pid(self.proc)
        self.proc = None
        if not keep_data:
            (self.root / "dump.rdb").unlink(missing_ok=True)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    need(shutil.which("redis-server") is not None, "redis-server is not installed")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def _pg_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return versions[-1].parent if versions else None


def _runuser() -> str | None:
    # util-linux installs it in /sbin, which a minimal PATH (cron, CI) may lack
    return shutil.which("runuser") or shutil.which("runuser", path="/usr/sbin:/sbin")


class PostgresServer:
    """A throwaway PostgreSQL cluster (initdb) on a free port under a temp folder (as user postgres when root)."""

    def __init__(self, bindir: Path) -> None:
        self.bindir, self.port = bindir, free_port()
        self.root = Path(tempfile.mkdtemp(prefix="stabletrain-pg-"))  # /tmp: readable by the postgres user
        self.data = self.root / "data"
        self.url = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            shutil.chown(self.root, "postgres", "postgres")

    def _run(self, *args: str, timeout_s: float = 120) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.as_postgres:
            cmd = [str(_runuser()), "-u", "postgres", "--", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        assert out.returncode == 0, f"{' '.join(cmd)}: {out.stdout}\n{out.stderr}"

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-N", "-E", "UTF8")

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "pg.log"), "-o", options, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        # pg_ctl signals the postmaster by the pid in its pid file
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def postgres_server() -> Iterator[PostgresServer]:
    bindir = _pg_bin()
    need(bindir is not None, "PostgreSQL server binaries (pg_ctl, initdb) are not installed")
    need(os.geteuid() != 0 or _runuser() is not None, "runuser is not on PATH (needed to run PostgreSQL as root)")
    assert bindir is not None
    server = PostgresServer(bindir)
    try:
        server.init()
        server.start()
        yield server
    finally:
        try:
            server.stop("immediate")
        finally:
            server.remove()


@pytest.fixture(params=["embedded", "servers"])
def any_cluster(request: pytest.FixtureRequest) -> Cluster:
    """A Cluster on the embedded defaults, then on PostgreSQL + Redis (private servers, as in production)."""
    if request.param == "embedded":
        return request.getfixturevalue("make_cluster")()
    # servers first: fixtures are torn down in reverse, so the workers stop before their servers do
    pg = request.getfixturevalue("postgres_server")
    broker = request.getfixturevalue("redis_server")
    return request.getfixturevalue("make_cluster")(database_url=pg.url, broker_url=broker.url)

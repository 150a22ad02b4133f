"""API latency under gunicorn: job read, a 1,000-point metrics page, and submit-to-running.

Builds its own stack and removes it afterwards: a temp storage folder, a fresh database
(PostgreSQL `stabletrain_bench_<pid>` when reachable, else a temp SQLite file) migrated with
`flask db upgrade`, an API key from `flask keys create`, one dataset, one finished job holding
100,000 StepMetric rows (bulk Core insert), and gunicorn (`app:create_app()`, gthread) on a free
port. Then, per endpoint, an open-loop load at a fixed request rate: request i is due at
t0 + i/rate whatever happened before, and its latency is measured from that due time to the
last byte of the response, so time spent queueing (client or server) counts (no coordinated
omission). Keep-alive sessions, one per client thread.

    GET /v1/jobs/{id}
    GET /v1/jobs/{id}/metrics?after_step=<random>&limit=1000

Submit-to-running: a real `celery worker -Q train -c 1 --pool=solo` on the same database and
broker (Redis db 15 by default when Redis answers, flushed at start and end; `--broker embedded`
for the default kombu SQLAlchemy transport). A few tiny jobs are submitted one after another;
for each, the time from the POST returning 202 until GET /v1/jobs/{id} (polled every 20 ms)
shows it running, and the database's started_at - created_at.

With `--webhooks N`, N webhook endpoints (every event type) are registered for the bench key before the
load, pointing at a receiver thread in this process (http on 127.0.0.1, so the run sets
STABLETRAIN_WEBHOOK_ALLOW_HTTP/ALLOW_PRIVATE), and a `celery worker -Q webhooks --pool=threads` runs
next to the training worker: submits write their job.queued outbox rows, workers their lifecycle and
checkpoint events, and the summary counts the deliveries that arrived.

Columns: requests and errors (non-200 or transport errors) of the measured part, req/s achieved,
client-side p50/p99/max from the due time, server_p50/p99 as gunicorn logs them (`%(D)s`: from
reading the request to sending the response; no accept-queue or client time), web_cpu_ms (CPU
seconds of the gunicorn processes per request, from /proc) and client_cpu (this process, per
request). On a shared machine the CPU columns are the steadiest; tails include CPU waits.

Prints a table, the target comparisons in words, and last `p99_ms: X` = the worse of the two
endpoint p99s (targets: job read < 25 ms, metrics page < 50 ms, submit-to-running < 1 s with
Redis). Numbers, not pass/fail: the exit status is 0 whenever the run completed.

    .venv/bin/python bench/api_load.py [--db auto|postgres|sqlite] [--broker auto|redis|embedded]
        [--rate 50] [--duration 12] [--warmup 2] [--web-workers 2] [--web-threads 4] [--jobs 5] [--webhooks 0]
"""

from __future__ import annotations

import argparse
import math
import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from app.models import WEBHOOK_EVENTS  # noqa: E402

BIN = Path(sys.executable).parent  # .venv/bin when run as .venv/bin/python

DEFAULT_POSTGRES = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS = "redis://127.0.0.1:6379/15"
CORPUS = REPO / "tests" / "data" / "corpus.txt"
TARGET_JOB_MS, TARGET_METRICS_MS, TARGET_SUBMIT_S = 25.0, 50.0, 1.0
PAGE = 1000


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------
# environment: database, broker, storage


def postgres_reachable(url: str) -> bool:
    from sqlalchemy import create_engine, text

    engine = create_engine(url, connect_args={"connect_timeout": 2})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:
        return False
    finally:
        engine.dispose()


def redis_client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)


def redis_reachable(url: str) -> bool:
    try:
        return bool(redis_client(url).ping())
    except Exception:
        return False


def admin_sql(base_url: str, sql: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(base_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(sql))
    finally:
        engine.dispose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(args: list[str], env: dict[str, str]) -> str:
    out = subprocess.run([str(BIN / "flask"), "--app", "app", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"flask {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return out.stdout


def stop_process(proc: subprocess.Popen[bytes] | None, what: str, wait_s: float = 30) -> None:
    """SIGTERM by pid, then SIGKILL after wait_s (gunicorn's master takes its workers down)."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        log(f"  {what} (pid {proc.pid}) ignored SIGTERM for {wait_s:.0f} s; killing it")
        proc.kill()
        proc.wait(timeout=10)


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------
# seed data: one key (CLI), one dataset, one finished job with N step rows


def metric_rows(job_id: str, n: int, t_start: float) -> list[dict[str, Any]]:
    rng = random.Random(0)
    rows = []
    tokens = 0
    for step in range(1, n + 1):
        tokens += 4096
        loss = 4.0 * math.exp(-step / 20000) + 1.2 + rng.gauss(0, 0.05)
        grad = abs(rng.gauss(0.8, 0.3)) + (25.0 if step % 9973 == 0 else 0.0)
        rows.append({
            "job_id": job_id, "step": step, "loss": loss, "lr": 3e-4, "grad_norm": grad,
            "grad_norm_clipped": min(grad, 1.0), "clipped": grad > 1.0, "nonfinite": False,
            "skipped": False, "loss_scale": None, "tokens_per_s": 50000.0 + rng.random() * 1000,
            "tokens_seen": tokens, "val_loss": loss + 0.1 if step % 100 == 0 else None,
            "time": t_start + step * 0.08,
        })
    return rows


def seed(database_url: str, owner_id: str, steps: int, analyze: bool) -> str:
    """Insert a dataset row, a succeeded job and `steps` StepMetric rows; returns the job id."""
    from sqlalchemy import create_engine, insert, text

    from app.models import Dataset, Job, StepMetric, new_id
    from app.schemas.spec import JobSpecSchema, spec_to_json

    dataset_id, job_id = new_id("ds"), new_id("job")
    spec = spec_to_json(JobSpecSchema().load({  # dataset ids must look server-made since the schema checks them
        "name": "bench-seeded", "dataset_id": dataset_id,
        "model": {"arch": "lstm", "n_layers": 2, "d_model": 64, "hidden": 128},
        "training": {"max_steps": steps, "batch_size": 16, "seq_len": 256},
    }))
    now = datetime.now(timezone.utc)
    started = now - timedelta(seconds=steps * 0.08)
    rows = metric_rows(job_id, steps, started.timestamp())
    latest = {k: v for k, v in rows[-1].items() if k != "job_id"}
    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(insert(Dataset.__table__), [{
                "id": dataset_id, "owner_id": owner_id, "name": "seeded.txt", "bytes": 1_000_000,
                "sha256": "0" * 64, "created_at": started - timedelta(seconds=5)}])
            conn.execute(insert(Job.__table__), [{
                "id": job_id, "owner_id": owner_id, "dataset_id": dataset_id, "name": spec["name"],
                "spec": spec, "status": "succeeded", "created_at": started - timedelta(seconds=1),
                "updated_at": now, "started_at": started, "finished_at": now, "enqueued_at": started,
                "step": steps, "max_steps": steps, "tokens_seen": rows[-1]["tokens_seen"], "latest": latest,
                "health": "ok", "error": None, "diagnosis": [], "attempts": 1, "cancel_requested": False}])
            table = StepMetric.__table__
            for lo in range(0, len(rows), 10_000):
                conn.execute(insert(table), rows[lo:lo + 10_000])
        if analyze:
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text("ANALYZE"))
    finally:
        engine.dispose()
    return job_id


def cpu_seconds(root_pid: int) -> float:
    """user + system CPU seconds of root_pid and its direct children (gunicorn master + workers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after the ")": state ppid ... utime(12th) stime(13th)
        if int(entry) == root_pid or int(fields[1]) == root_pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


# ---------------------------------------------------------------------------------------------
# open-loop load


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def server_times(access_log: Path, start: int) -> list[float]:
    """Request times (ms) gunicorn logged (`%(D)s`: request read to response sent) from byte `start` on."""
    with open(access_log, "rb") as fh:
        fh.seek(start)
        data = fh.read()
    times = []
    for line in data.decode(errors="replace").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "BENCH" and parts[2].isdigit():
            times.append(int(parts[2]) / 1000)
    return sorted(times)


def open_loop(base: str, headers: dict[str, str], path_for: Callable[[int], str], rate: float,
              duration_s: float, warmup_s: float, n_threads: int, server_pid: int,
              access_log: Path) -> dict[str, Any]:
    """Request i is due at t0 + i/rate; latency = completion - due time. Warm-up requests are dropped."""
    n_warm, n_meas = int(rate * warmup_s), int(rate * duration_s)
    total = n_warm + n_meas
    latency: list[float | None] = [None] * total
    done_at: list[float] = [0.0] * total
    errors: list[str | None] = [None] * total
    work: queue.Queue[tuple[int, float, str] | None] = queue.Queue()

    def client() -> None:
        session = requests.Session()
        session.headers.update(headers)
        while (item := work.get()) is not None:
            i, due, path = item
            try:
                resp = session.get(base + path, timeout=30)
                _ = resp.content
                if resp.status_code != 200:
                    errors[i] = f"HTTP {resp.status_code}"
            except requests.RequestException as exc:
                errors[i] = type(exc).__name__
            end = time.perf_counter()
            latency[i], done_at[i] = end - due, end
        session.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(n_threads)]
    for thread in threads:
        thread.start()
    late = 0.0
    cpu0, log0, client0 = None, 0, 0.0
    t0 = time.perf_counter() + 0.05
    for i in range(total):
        if i == n_warm:
            cpu0, log0, client0 = cpu_seconds(server_pid), access_log.stat().st_size, time.process_time()
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        elif i >= n_warm:
            late = max(late, -delay)
        work.put((i, due, path_for(i)))
    for _ in threads:
        work.put(None)
    for thread in threads:
        thread.join()
    cpu_ms = (cpu_seconds(server_pid) - cpu0) * 1000 / n_meas if cpu0 is not None and n_meas else math.nan
    client_ms = (time.process_time() - client0) * 1000 / n_meas if n_meas else math.nan
    time.sleep(0.05)  # let the last access-log lines land
    server = server_times(access_log, log0)

    meas = range(n_warm, total)
    ok = sorted(latency[i] * 1000 for i in meas if errors[i] is None)  # type: ignore[operator]
    errs = [errors[i] for i in meas if errors[i] is not None]
    t_first_due = t0 + n_warm / rate
    span = max(done_at[i] for i in meas) - t_first_due if n_meas else math.nan
    return {
        "requests": n_meas, "errors": len(errs), "error_kinds": sorted(set(errs)),
        "rps": len(ok) / span if span > 0 else math.nan,
        "p50": percentile(ok, 50), "p99": percentile(ok, 99), "max": ok[-1] if ok else math.nan,
        "sched_late_ms": late * 1000, "cpu_ms": cpu_ms, "client_cpu_ms": client_ms,
        "server_p50": percentile(server, 50), "server_p99": percentile(server, 99),
    }


# ---------------------------------------------------------------------------------------------
# submit-to-running


class WebhookSink:
    """Receiver thread for --webhooks: answers 204 and counts the deliveries (by webhook-id)."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        sink = self
        self.ids: set[str] = set()
        self.requests = 0
        self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                self.rfile.read(int(self.headers.get("content-length", 0)))
                with sink.lock:
                    sink.requests += 1
                    sink.ids.add(self.headers.get("webhook-id", ""))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def register_webhooks(base: str, headers: dict[str, str], url: str, n: int) -> None:
    for _ in range(n):
        requests.post(f"{base}/v1/webhooks", json={"url": url, "events": list(WEBHOOK_EVENTS)}, headers=headers,
                      timeout=30).raise_for_status()


def start_worker(env: dict[str, str], queue_args: list[str], name: str, log_path: Path) -> subprocess.Popen[bytes]:
    """A celery worker on the bench's database and broker; returns once it says it is ready."""
    with open(log_path, "wb") as fh:
        proc = subprocess.Popen(
            [str(BIN / "celery"), "-A", "worker.celery_app", "worker", *queue_args,
             "-n", f"{name}-{os.getpid()}@%h", "--loglevel=INFO"],
            cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    t = time.perf_counter()
    while " ready." not in tail(log_path, 100_000):
        if proc.poll() is not None or time.perf_counter() - t > 120:
            raise RuntimeError(f"celery worker not ready:\n{tail(log_path)}")
        time.sleep(0.2)
    log(f"celery worker {name} pid {proc.pid} ready in {time.perf_counter() - t:.1f} s")
    return proc


def wait_deliveries(database_url: str, timeout_s: float) -> int:
    """Poll until no webhook delivery is pending (or the timeout); returns how many still are."""
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    deadline = time.perf_counter() + timeout_s
    try:
        while True:
            with engine.connect() as conn:
                pending = conn.execute(text("SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'"))
                left = int(pending.scalar_one())
            if left == 0 or time.perf_counter() > deadline:
                return left
            time.sleep(0.2)
    finally:
        engine.dispose()


def tiny_spec(dataset_id: str, i: int) -> dict[str, Any]:
    return {
        "name": f"bench-submit-{i}", "dataset_id": dataset_id,
        "model": {"arch": "lstm", "n_layers": 1, "d_model": 16, "hidden": 16},
        "training": {"max_steps": 5, "batch_size": 4, "seq_len": 16, "eval_every": 5, "eval_batches": 1},
        "monitoring": {"layer_stats_every": 5},
        "checkpointing": {"every_steps": 5, "keep_last": 1},
    }


def parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def submit_to_running(base: str, headers: dict[str, str], n_jobs: int) -> list[dict[str, Any]]:
    session = requests.Session()
    session.headers.update(headers)
    with open(CORPUS, "rb") as fh:
        resp = session.post(base + "/v1/datasets", files={"file": ("corpus.txt", fh, "text/plain")}, timeout=30)
    resp.raise_for_status()
    dataset_id = resp.json()["id"]
    results = []
    for i in range(n_jobs):
        t_post = time.perf_counter()
        resp = session.post(base + "/v1/jobs", json=tiny_spec(dataset_id, i), timeout=30)
        t_202 = time.perf_counter()
        if resp.status_code != 202:
            raise RuntimeError(f"submit answered {resp.status_code}: {resp.text[:500]}")
        job_id = resp.json()["id"]
        # poll every 20 ms (fixed period) until the job is no longer queued
        seen, job, k = None, None, 0
        while time.perf_counter() - t_202 < 60:
            k += 1
            job = session.get(f"{base}/v1/jobs/{job_id}", timeout=30).json()
            if job["status"] != "queued":
                seen = time.perf_counter()
                break
            time.sleep(max(0.0, t_202 + k * 0.02 - time.perf_counter()))
        first_status = job["status"] if job else "?"
        # wait for the end (one worker: the next job must not queue behind this one)
        deadline = time.perf_counter() + 120
        while job and job["status"] in ("queued", "running", "cancelling") and time.perf_counter() < deadline:
            time.sleep(0.1)
            job = session.get(f"{base}/v1/jobs/{job_id}", timeout=30).json()
        created, started = parse_time(job.get("created_at")), parse_time(job.get("started_at"))
        enqueued = parse_time(job.get("enqueued_at"))
        results.append({
            "job_id": job_id, "post_ms": (t_202 - t_post) * 1000,
            "seen_s": (seen - t_202) if seen else math.nan, "first_status": first_status,
            "db_s": (started - created).total_seconds() if started and created else math.nan,
            "enq_s": (started - enqueued).total_seconds() if started and enqueued else math.nan,
            "final": job["status"], "error": job.get("error"),
        })
        r = results[-1]
        log(f"  job {i + 1}/{n_jobs} {job_id}: POST {r['post_ms']:.0f} ms; running seen {r['seen_s'] * 1000:.0f} ms "
            f"after 202 (first status {first_status}); db started_at-created_at {r['db_s'] * 1000:.0f} ms, "
            f"started_at-enqueued_at {r['enq_s'] * 1000:.0f} ms; final {r['final']}"
            + (f" ({r['error']})" if r["error"] else ""))
    session.close()
    return results


# ---------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", choices=("auto", "postgres", "sqlite"), default="auto")
    ap.add_argument("--postgres-url", default=os.environ.get("STABLETRAIN_BENCH_POSTGRES_URL", DEFAULT_POSTGRES),
                    help="an existing database to connect to for CREATE/DROP DATABASE")
    ap.add_argument("--broker", choices=("auto", "redis", "embedded"), default="auto")
    ap.add_argument("--redis-url", default=os.environ.get("STABLETRAIN_BENCH_REDIS_URL", DEFAULT_REDIS),
                    help="a dedicated Redis db number: it is flushed at start and end")
    ap.add_argument("--rate", type=float, default=50.0, help="requests/s per endpoint (open loop)")
    ap.add_argument("--duration", type=float, default=12.0, help="measured seconds per endpoint")
    ap.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each endpoint's run")
    ap.add_argument("--client-threads", type=int, default=16)
    ap.add_argument("--web-workers", type=int, default=2)
    ap.add_argument("--web-threads", type=int, default=4)
    ap.add_argument("--steps", type=int, default=100_000, help="StepMetric rows of the read job")
    ap.add_argument("--jobs", type=int, default=5, help="submit-to-running samples; 0 skips it")
    ap.add_argument("--analyze", action="store_true", help="ANALYZE after the bulk insert (default: as inserted)")
    ap.add_argument("--gunicorn-arg", action="append", default=[], metavar="ARG",
                    help="extra gunicorn argument, repeatable (e.g. --gunicorn-arg=--config=gc.py)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (logs) at the end")
    ap.add_argument("--webhooks", type=int, default=0,
                    help="register N webhook endpoints (all events, a local receiver) and run a webhooks worker")
    args = ap.parse_args()

    # Ctrl-C and SIGTERM both run the cleanup below (also when started in the background)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.db == "auto":
        args.db = "postgres" if postgres_reachable(args.postgres_url) else "sqlite"
    if args.broker == "auto":
        args.broker = "redis" if redis_reachable(args.redis_url) else "embedded"

    tmp = Path(tempfile.mkdtemp(prefix="stabletrain-bench-"))
    pg_db: str | None = None
    redis_url: str | None = None
    web: subprocess.Popen[bytes] | None = None
    worker: subprocess.Popen[bytes] | None = None
    senders: subprocess.Popen[bytes] | None = None
    sink = WebhookSink() if args.webhooks > 0 else None
    try:
        if args.db == "postgres":
            from sqlalchemy.engine import make_url

            pg_db = f"stabletrain_bench_{os.getpid()}"
            admin_sql(args.postgres_url, f'DROP DATABASE IF EXISTS "{pg_db}" WITH (FORCE)')
            admin_sql(args.postgres_url, f'CREATE DATABASE "{pg_db}"')
            database_url = make_url(args.postgres_url).set(database=pg_db).render_as_string(hide_password=False)
        else:
            database_url = f"sqlite:///{tmp / 'stabletrain.db'}"
        if args.broker == "redis":
            redis_url = args.redis_url
            redis_client(redis_url).flushdb()
            broker_url = redis_url
        else:
            broker_url = f"sqlalchemy+sqlite:///{tmp / 'broker.db'}"

        env = {k: v for k, v in os.environ.items() if not k.startswith("STABLETRAIN_")}
        env.update({
            "STABLETRAIN_DATABASE_URL": database_url,
            "STABLETRAIN_BROKER_URL": broker_url,
            "STABLETRAIN_STORAGE_DIR": str(tmp / "storage"),
            # the limiter stays on (its cost is part of a request) but must not answer 429 at this rate
            "STABLETRAIN_RATELIMIT_DEFAULT": "1000000/minute",
            "STABLETRAIN_DEVICE": "cpu",
            "STABLETRAIN_LOG_LEVEL": "WARNING",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        })
        if sink is not None:  # the receiver is this process on 127.0.0.1 over http
            env.update({"STABLETRAIN_WEBHOOK_ALLOW_HTTP": "1", "STABLETRAIN_WEBHOOK_ALLOW_PRIVATE": "1"})
        load_start = os.getloadavg()[0]
        shown_db = f"postgresql ({pg_db})" if pg_db else f"sqlite ({tmp / 'stabletrain.db'})"
        shown_broker = redis_url if redis_url else "embedded (kombu sqlalchemy+sqlite)"
        log(f"setup: database {shown_db}; broker {shown_broker}; gunicorn {args.web_workers} workers x "
            f"{args.web_threads} threads (gthread); {args.rate:g} req/s x {args.duration:g} s per endpoint "
            f"(+{args.warmup:g} s warm-up), {args.client_threads} client threads; "
            f"{os.cpu_count()} CPUs, load average {load_start:.2f}")

        t = time.perf_counter()
        run_cli(["db", "upgrade"], env)
        fields = dict(line.split(": ", 1) for line in run_cli(["keys", "create", "bench"], env).strip().splitlines())
        headers = {"Authorization": f"Bearer {fields['key']}"}
        log(f"migrated and created key {fields['id']} in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        job_id = seed(database_url, fields["id"], args.steps, args.analyze)
        log(f"seeded job {job_id} with {args.steps:,} step rows in {time.perf_counter() - t:.1f} s"
            + (" (then ANALYZE)" if args.analyze else ""))

        port = free_port()
        base = f"http://127.0.0.1:{port}"
        cmd = [str(BIN / "gunicorn"), "--bind", f"127.0.0.1:{port}", "--workers", str(args.web_workers),
               "--worker-class", "gthread", "--threads", str(args.web_threads), "--timeout", "120"]
        # access log (serve.sh logs every request too) with gunicorn's own request time in microseconds
        access_log = tmp / "access.log"
        cmd += ["--access-logfile", str(access_log), "--access-logformat", "BENCH %(s)s %(D)s"]
        cmd += args.gunicorn_arg
        web_log = tmp / "gunicorn.log"
        with open(web_log, "wb") as fh:
            web = subprocess.Popen([*cmd, "app:create_app()"], cwd=REPO, env=env, stdout=fh,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.perf_counter() + 60
        while True:
            if web.poll() is not None:
                raise RuntimeError(f"gunicorn exited ({web.returncode}):\n{tail(web_log)}")
            try:
                if requests.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.perf_counter() > deadline:
                raise RuntimeError(f"gunicorn did not answer /healthz in 60 s:\n{tail(web_log)}")
            time.sleep(0.1)
        log(f"gunicorn pid {web.pid} on {base}")

        if sink is not None:
            register_webhooks(base, headers, sink.url, args.webhooks)
            log(f"registered {args.webhooks} webhook endpoints (every event type) -> {sink.url}")

        # correctness of what is being timed
        job = requests.get(f"{base}/v1/jobs/{job_id}", headers=headers, timeout=30)
        job.raise_for_status()
        assert job.json()["progress"]["step"] == args.steps, job.text[:300]
        page = requests.get(f"{base}/v1/jobs/{job_id}/metrics?after_step=500&limit={PAGE}", headers=headers,
                            timeout=30)
        page.raise_for_status()
        items = page.json()["items"]
        assert len(items) == PAGE and items[0]["step"] == 501, (len(items), items[:1])
        log(f"job read {len(job.content):,} bytes; metrics page {len(page.content):,} bytes ({len(items)} rows)")

        rng = random.Random(1)
        max_after = max(0, args.steps - PAGE)
        after = [rng.randint(0, max_after) for _ in range(int(args.rate * (args.duration + args.warmup)) + 1)]
        runs = {
            "job read": open_loop(base, headers, lambda i: f"/v1/jobs/{job_id}", args.rate, args.duration,
                                  args.warmup, args.client_threads, web.pid, access_log),
            "metrics page": open_loop(base, headers,
                                      lambda i: f"/v1/jobs/{job_id}/metrics?after_step={after[i]}&limit={PAGE}",
                                      args.rate, args.duration, args.warmup, args.client_threads, web.pid, access_log),
        }
        log(f"{'endpoint':<14}{'requests':>9}{'errors':>8}{'req/s':>8}{'p50_ms':>9}{'p99_ms':>9}{'max_ms':>9}"
            f"{'server_p50':>12}{'server_p99':>12}{'web_cpu_ms':>12}{'client_cpu':>12}")
        for name, r in runs.items():
            log(f"{name:<14}{r['requests']:>9}{r['errors']:>8}{r['rps']:>8.1f}{r['p50']:>9.1f}{r['p99']:>9.1f}"
                f"{r['max']:>9.1f}{r['server_p50']:>12.1f}{r['server_p99']:>12.1f}{r['cpu_ms']:>12.1f}{r['client_cpu_ms']:>12.1f}"
                + (f"   errors: {', '.join(r['error_kinds'])}" if r["errors"] else "")
                + (f"   (client fell {r['sched_late_ms']:.0f} ms behind schedule)" if r["sched_late_ms"] > 5 else ""))

        submit: list[dict[str, Any]] = []
        if args.jobs > 0:
            worker = start_worker(env, ["-Q", "train", "-c", "1", "--pool=solo"], "bench", tmp / "worker.log")
            if sink is not None:
                senders = start_worker(env, ["-Q", "webhooks", "-c", "4", "--pool=threads"], "bench-webhooks",
                                       tmp / "webhooks.log")
            log(f"submitting {args.jobs} jobs one after another")
            submit = submit_to_running(base, headers, args.jobs)
            stop_process(worker, "celery worker", 60)
            if sink is not None:
                pending = wait_deliveries(database_url, 60)
                log(f"webhooks: {sink.requests} deliveries of {len(sink.ids)} events arrived at the receiver; "
                    f"{pending} still pending")

        # ---- summary
        load_end = os.getloadavg()[0]
        log(f"load average at the end {load_end:.2f} ({os.cpu_count()} CPUs, shared by gunicorn, the database, "
            "this client and anything else running)")
        if max(load_start, load_end) > (os.cpu_count() or 1):
            log("note: the machine was busier than its CPU count during the run; tail latencies include "
                "waiting for a CPU (compare server_p99 and web_cpu_ms, which depend less on other load)")
        verdict = lambda ok: "OK" if ok else "MISSED"  # noqa: E731
        jr, mp = runs["job read"], runs["metrics page"]
        log(f"job read p99 {jr['p99']:.1f} ms (target < {TARGET_JOB_MS:g} ms): "
            f"{verdict(jr['p99'] < TARGET_JOB_MS and not jr['errors'])}")
        log(f"metrics page p99 {mp['p99']:.1f} ms (target < {TARGET_METRICS_MS:g} ms): "
            f"{verdict(mp['p99'] < TARGET_METRICS_MS and not mp['errors'])}")
        if submit:
            seen = sorted(r["seen_s"] for r in submit)
            db_s = sorted(r["db_s"] for r in submit)
            ok = all(r["final"] == "succeeded" for r in submit)
            where = "with Redis" if redis_url else "embedded broker; the target is for Redis"
            log(f"submit-to-running ({len(submit)} jobs, {'redis' if redis_url else 'embedded'} broker): "
                f"202-to-running-seen p50 {percentile(seen, 50) * 1000:.0f} ms, max {seen[-1] * 1000:.0f} ms; "
                f"db started_at-created_at p50 {percentile(db_s, 50) * 1000:.0f} ms, max {db_s[-1] * 1000:.0f} ms"
                + ("" if ok else "; NOT all jobs succeeded"))
            posts = sorted(r["post_ms"] for r in submit)
            log(f"submit POST (202) p50 {percentile(posts, 50):.0f} ms, max {posts[-1]:.0f} ms "
                "(the first POST per gunicorn worker also connects to the broker)")
            log(f"submit-to-running max {seen[-1] * 1000:.0f} ms (target < {TARGET_SUBMIT_S * 1000:.0f} ms, "
                f"{where}): {verdict(seen[-1] < TARGET_SUBMIT_S and ok)}")
        log(f"p99_ms: {max(jr['p99'], mp['p99']):.1f}")
        return 0
    finally:
        stop_process(worker, "celery worker", 60)
        stop_process(senders, "webhooks worker", 30)
        if sink is not None:
            sink.close()
        stop_process(web, "gunicorn", 30)
        if pg_db:
            try:
                admin_sql(args.postgres_url, f'DROP DATABASE IF EXISTS "{pg_db}" WITH (FORCE)')
            except Exception as exc:
                print(f"could not drop database {pg_db}: {exc}", file=sys.stderr)
        if redis_url:
            try:
                redis_client(redis_url).flushdb()
            except Exception as exc:
                print(f"could not flush {redis_url}: {exc}", file=sys.stderr)
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; stopped gunicorn and the worker, dropped the bench database", file=sys.stderr)
        sys.exit(130)

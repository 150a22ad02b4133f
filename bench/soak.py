"""Soak: a stream of jobs against two workers, the one training SIGKILLed every so often.

For `--duration` seconds a job is submitted through the API (in-process Flask
client) every `--submit-every` seconds while two `celery worker` processes
train them. Every `--kill-every` seconds the soak waits (up to `--kill-wait`
seconds) for a job that is training, and SIGKILLs, by pid, the worker whose id
is that job's `worker_id`, then starts it again; a kill with no job in training
hits the other worker and counts as idle. Jobs last a few seconds each (80 to
200 steps, a checkpoint every 20), so kills land mid-job. Then the stream stops and
every accepted job is waited for (bounded by `--drain-timeout`). Prints jobs
accepted, succeeded, failed, resumed after a kill, kills and how many landed
mid-job (the job was training on the victim and was later resumed), lost
(accepted but not succeeded: must be 0) and duplicated steps (a step row
twice, a gap, or a succeeded job without exactly max_steps rows: must be 0).
Last line `lost: N`; exit status 1 when anything was lost or duplicated, or
when fewer than `--min-mid-job` (90 %) of the kills landed mid-job.

    python bench/soak.py [--duration 120] [--kill-every 20] [--submit-every 4]
    python bench/soak.py --servers   # PostgreSQL + Redis from STABLETRAIN_TEST_POSTGRES_URL / _REDIS_URL

Default: the embedded stack (SQLite file + SQLAlchemy broker) in a temp folder.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import create_engine, func, select, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from app import create_app  # noqa: E402
from app.extensions import db  # noqa: E402
from app.models import Event, Job, StepMetric  # noqa: E402

TERMINAL = ("succeeded", "failed", "cancelled")
WORKER_ENV = {
    "STABLETRAIN_LEASE_S": "3",  # a killed worker's job is requeued within ~4 s
    "STABLETRAIN_HEARTBEAT_S": "0.5",
    "STABLETRAIN_RECONCILE_EVERY_S": "1",
    "STABLETRAIN_RESEND_AFTER_S": "30",
    "STABLETRAIN_DEVICE": "cpu",
    "OMP_NUM_THREADS": "1",
}


def job_spec(rng: random.Random, dataset_id: str, i: int) -> dict[str, Any]:
    """A job of a few seconds on one CPU core, with checkpoints, so a kill lands while it trains."""
    return {
        "name": f"soak-{i}", "dataset_id": dataset_id,
        "model": {"arch": rng.choice(["lstm", "gru", "mlp"]), "n_layers": 1, "d_model": 32, "hidden": 32,
                  "dropout": 0.1},
        "training": {"max_steps": rng.randint(80, 200), "batch_size": 8, "seq_len": 32, "eval_every": 40,
                     "seed": i},
        "monitoring": {"layer_stats_every": 10},
        "checkpointing": {"every_steps": 20, "keep_last": 2},
    }


class Workers:
    """Two named celery worker processes; kill/restart by pid; logs under root."""

    def __init__(self, env: dict[str, str], root: Path) -> None:
        self.env, self.root = env, root
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.generation: dict[str, int] = {}
        self.names: dict[str, str] = {}  # Celery node name (before the @host) of each slot's process

    def start(self, slot: str) -> None:
        gen = self.generation[slot] = self.generation.get(slot, 0) + 1
        self.names[slot] = f"soak-{slot}-{uuid.uuid4().hex[:6]}"
        log = open(self.root / f"worker-{slot}.log", "ab")  # noqa: SIM115 - the child owns it
        cmd = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", "train,samples",
               "-c", "1", "--pool=solo", "-n", f"{self.names[slot]}@%h", "--loglevel=INFO"]
        env = {**self.env, "STABLETRAIN_WORKER_ID": f"{slot}.{gen}"}
        self.procs[slot] = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def worker_id(self, slot: str) -> str:
        """The STABLETRAIN_WORKER_ID of the slot's current process (what it writes to jobs.worker_id)."""
        return f"{slot}.{self.generation[slot]}"

    def wait_ready(self, slot: str, timeout_s: float = 180) -> None:
        """Until the slot's worker logs Celery's `<name>@<host> ready.` (a first start can take long here)."""
        name = self.names[slot]
        deadline = time.monotonic() + timeout_s
        log = self.root / f"worker-{slot}.log"
        while not any(line.endswith(" ready.") and f" {name}@" in line
                      for line in log.read_text(errors="replace").splitlines()):
            if time.monotonic() > deadline or self.procs[slot].poll() is not None:
                raise SystemExit(f"soak: worker {slot} did not start; see {log}")
            time.sleep(0.2)

    def kill(self, slot: str) -> None:
        proc = self.procs.pop(slot)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    def stop_all(self) -> None:
        for slot in list(self.procs):
            self.kill(slot)


def servers_config(root: Path) -> tuple[dict[str, str], Any]:
    """A fresh PostgreSQL database and a flushed Redis db; returns config and a cleanup."""
    import redis

    pg_base = os.environ.get("STABLETRAIN_TEST_POSTGRES_URL")
    redis_base = os.environ.get("STABLETRAIN_TEST_REDIS_URL")
    if not pg_base or not redis_base:
        sys.exit("--servers needs STABLETRAIN_TEST_POSTGRES_URL and STABLETRAIN_TEST_REDIS_URL")
    name = f"stabletrain_soak_{uuid.uuid4().hex[:10]}"
    admin = create_engine(pg_base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    db_number = os.environ.get("STABLETRAIN_TEST_REDIS_DB", "13")  # a db of its own: no one else's messages
    broker = (redis_base.rsplit("/", 1)[0] if redis_base.count("/") > 2 else redis_base) + f"/{db_number}"
    redis.Redis.from_url(broker).flushdb()

    def cleanup() -> None:
        redis.Redis.from_url(broker).flushdb()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    url = make_url(pg_base).set(database=name).render_as_string(hide_password=False)
    return {"DATABASE_URL": url, "BROKER_URL": broker, "STORAGE_DIR": str(root / "storage")}, cleanup


def training_job(engine: Any, workers: Workers) -> tuple[str, str, int, int] | None:
    """(slot, job id, step, max_steps) of a worker training a job right now: past its first step and short
    of its last fifth, so the job cannot end on its own before the kill lands."""
    with engine.connect() as conn:
        rows = conn.execute(select(Job.id, Job.worker_id, Job.step, Job.max_steps)
                            .where(Job.status == "running", Job.step >= 1)).all()
    training = {row.worker_id: row for row in rows if row.step <= 0.8 * row.max_steps}
    for slot in workers.procs:
        if (row := training.get(workers.worker_id(slot))) is not None:
            return slot, row.id, row.step, row.max_steps
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=120, help="seconds of job stream (default 120)")
    parser.add_argument("--kill-every", type=float, default=20, help="SIGKILL a worker this often (s)")
    parser.add_argument("--kill-wait", type=float, default=15,
                        help="at a kill, wait up to this long for a job in training (s)")
    parser.add_argument("--min-mid-job", type=float, default=0.9,
                        help="fail when a smaller share of the kills landed mid-job (default 0.9)")
    parser.add_argument("--submit-every", type=float, default=4.0, help="one job this often (s)")
    parser.add_argument("--drain-timeout", type=float, default=300, help="bound on waiting for the backlog (s)")
    parser.add_argument("--servers", action="store_true", help="PostgreSQL + Redis instead of the embedded stack")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (logs, database)")
    args = parser.parse_args(argv)
    logging.getLogger("app.access").setLevel(logging.WARNING)  # one line per request otherwise

    root = Path(tempfile.mkdtemp(prefix="stabletrain-soak-"))
    cleanup = None
    if args.servers:
        config, cleanup = servers_config(root)
    else:
        config = {"DATABASE_URL": f"sqlite:///{root / 'stabletrain.db'}",
                  "BROKER_URL": f"sqlalchemy+sqlite:///{root / 'broker.db'}", "STORAGE_DIR": str(root / "storage")}
    app = create_app({**config, "RATELIMIT_ENABLED": False, "MAX_LIVE_JOBS": 100_000})
    with app.app_context():
        db.create_all()
        engine = db.engine
    out = app.test_cli_runner().invoke(args=["keys", "create", "soak"])
    secret = dict(line.split(": ", 1) for line in out.output.strip().splitlines())["key"]
    auth = {"Authorization": f"Bearer {secret}"}
    client = app.test_client()
    corpus = (REPO / "tests" / "data" / "corpus.txt").read_bytes()
    resp = client.post("/v1/datasets", headers=auth, data={"file": (io.BytesIO(corpus), "corpus.txt")},
                       content_type="multipart/form-data")
    dataset_id = resp.get_json()["id"]

    env = {**os.environ, **WORKER_ENV, **{f"STABLETRAIN_{k}": v for k, v in config.items()}}
    workers = Workers(env, root)
    rng = random.Random(args.seed)
    accepted: dict[str, int] = {}
    refused = kills = 0
    victims: list[str] = []  # the job each mid-job kill interrupted
    try:
        for slot in ("a", "b"):
            workers.start(slot)
        for slot in ("a", "b"):  # the clock starts with both workers up
            workers.wait_ready(slot)
        print(f"soak: {args.duration:g} s of jobs every {args.submit_every:g} s, SIGKILL a worker every "
              f"{args.kill_every:g} s ({'PostgreSQL + Redis' if args.servers else 'embedded'}; {root})", flush=True)
        start = time.monotonic()
        next_submit, next_kill, victim = start, start + args.kill_every, "a"
        while time.monotonic() - start < args.duration:
            now = time.monotonic()
            if now >= next_kill:
                # the victim is the worker named by a training job's worker_id, so the kill lands mid-job;
                # look for one on every turn of the loop (submissions go on) until --kill-wait runs out
                found = training_job(engine, workers)
                if found or now >= next_kill + args.kill_wait:
                    if found:
                        victim = found[0]
                        victims.append(found[1])
                    print(f"soak: kill {kills + 1} at {now - start:.0f} s: worker {workers.worker_id(victim)}, "
                          + (f"training {found[1]} at step {found[2]}/{found[3]}" if found else "idle"), flush=True)
                    workers.kill(victim)
                    workers.start(victim)
                    kills += 1
                    victim = "b" if victim == "a" else "a"
                    next_kill = time.monotonic() + args.kill_every
            if now >= next_submit:
                i = len(accepted) + refused
                spec = job_spec(rng, dataset_id, i)
                resp = client.post("/v1/jobs", json=spec, headers={**auth, "Idempotency-Key": f"soak-{i}"})
                if resp.status_code == 202:
                    accepted[resp.get_json()["id"]] = spec["training"]["max_steps"]
                else:
                    refused += 1
                next_submit += args.submit_every
            time.sleep(0.05)

        print(f"soak: stream done ({len(accepted)} accepted, {kills} kills); waiting for the backlog", flush=True)
        deadline = time.monotonic() + args.drain_timeout
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                live = conn.execute(select(func.count()).select_from(Job)
                                    .where(Job.id.in_(accepted), Job.status.notin_(TERMINAL))).scalar_one()
            if not live:
                break
            time.sleep(0.5)
        drained_s = time.monotonic() - start - args.duration

        with engine.connect() as conn:
            status = dict(conn.execute(select(Job.status, func.count()).where(Job.id.in_(accepted))
                                       .group_by(Job.status)).all())
            jobs = conn.execute(select(Job.id, Job.status, Job.max_steps, Job.attempts, Job.error)
                                .where(Job.id.in_(accepted))).all()
            doubled = conn.execute(select(StepMetric.job_id, StepMetric.step).group_by(StepMetric.job_id,
                                   StepMetric.step).having(func.count() > 1)).all()
            steps = {row.job_id: (row.n, row.lo, row.hi) for row in conn.execute(
                select(StepMetric.job_id, func.count().label("n"), func.min(StepMetric.step).label("lo"),
                       func.max(StepMetric.step).label("hi")).group_by(StepMetric.job_id)).all()}
            requeued = conn.execute(select(func.count()).select_from(Event)
                                    .where(Event.kind == "requeued")).scalar_one()
        attempts = {j.id: j.attempts for j in jobs}
        # a kill landed mid-job when the job it interrupted was resumed for it (one more attempt per kill)
        mid_job = sum(min(n, attempts.get(job_id, 1) - 1) for job_id, n in Counter(victims).items())
        for job_id in dict.fromkeys(victims):
            print(f"soak: {job_id} was killed {victims.count(job_id)}x mid-job, {attempts.get(job_id)} attempts")
        mid_job_ok = kills > 0 and mid_job >= args.min_mid_job * kills
        bad_steps = [j.id for j in jobs if j.status == "succeeded" and steps.get(j.id) != (j.max_steps, 1,
                                                                                            j.max_steps)]
        succeeded = status.get("succeeded", 0)
        lost = len(accepted) - succeeded
        failures = [f"{j.id}: {j.status} {j.error or ''}" for j in jobs if j.status != "succeeded"]
        print(f"duration_s: {args.duration:g}")
        print(f"backend: {'postgresql+redis' if args.servers else 'embedded'}")
        print(f"workers: 2  kills: {kills}  mid-job: {mid_job} ({mid_job / max(kills, 1):.0%})")
        print(f"jobs accepted: {len(accepted)}  refused: {refused}")
        print(f"jobs succeeded: {succeeded}  failed: {status.get('failed', 0)}  "
              f"unfinished: {len(accepted) - sum(status.get(s, 0) for s in TERMINAL)}")
        print(f"jobs resumed after a kill: {sum(1 for j in jobs if j.attempts > 1)}  requeued events: {requeued}")
        print(f"metric rows: {sum(n for n, _, _ in steps.values())}  drain_s: {drained_s:.1f}")
        for line in failures[:10]:
            print(f"  not succeeded: {line}")
        if not mid_job_ok:
            print(f"too few kills mid-job: {mid_job} of {kills} (need {args.min_mid_job:.0%})")
        print(f"duplicated steps: {len(doubled) + len(bad_steps)}")
        print(f"lost: {lost}")
        return 0 if lost == 0 and not doubled and not bad_steps and mid_job_ok else 1
    finally:
        workers.stop_all()
        with app.app_context():
            db.engine.dispose()
        if cleanup:
            cleanup()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

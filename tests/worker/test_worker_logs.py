"""Worker log lines carry the id of the job they belong to, as text or JSON."""

from __future__ import annotations

import io
import json
import logging
import threading

from sqlalchemy import Engine

from tests.worker.jobfactory import make_job
from worker.logs import configure, log_context
from worker.service import run_train_job
from worker.settings import WorkerSettings


def _capture(json_lines: bool) -> tuple[io.StringIO, logging.Handler]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    configure([handler], json_lines=json_lines)
    return stream, handler


def test_every_line_of_a_job_run_carries_its_id_as_json(engine: Engine, settings: WorkerSettings) -> None:
    job_id = make_job(engine, settings.storage_dir)
    stream, handler = _capture(json_lines=True)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with log_context(job_id=job_id):
            assert run_train_job(engine, job_id, settings) == "succeeded"
        logging.getLogger("worker.test").info("after the job")
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    during, after = lines[:-1], lines[-1]
    assert len(during) >= 3  # at least started, checkpoint, finished from the engine
    assert all(line["job_id"] == job_id for line in during)
    assert any(line["logger"].startswith("worker.engine") for line in during)
    assert "job_id" not in after and after["message"] == "after the job"


def test_text_lines_name_the_job_and_threads_start_clean() -> None:
    stream, handler = _capture(json_lines=False)
    logger = logging.getLogger("worker.test.text")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with log_context(job_id="job_abc"):
            logger.info("inside")
            thread = threading.Thread(target=lambda: logger.info("other thread"))
            thread.start()
            thread.join()
        logger.info("outside")
    finally:
        logger.removeHandler(handler)
    inside, other, outside = stream.getvalue().splitlines()
    assert "[job_id=job_abc]: inside" in inside
    assert "job_abc" not in other and "job_abc" not in outside

"""Worker settings and the Celery configuration the worker runs with."""

from __future__ import annotations

from pathlib import Path

from app import create_app
from stabletrain_storage import LocalStorage
from stabletrain_storage.s3 import S3Storage
from worker.celery_app import broker_transport_options, make_celery
from worker.settings import load_settings


def test_settings_prefer_app_config_then_environment_then_defaults() -> None:
    settings = load_settings({"LEASE_S": 7, "DATABASE_URL": "sqlite:///x.db"},
                             env={"STABLETRAIN_LEASE_S": "9", "STABLETRAIN_HEARTBEAT_S": "0.5",
                                  "STABLETRAIN_DEVICE": "cuda:1", "STABLETRAIN_WORKER_ID": "gpu-7"})
    assert (settings.lease_s, settings.heartbeat_s, settings.database_url) == (7.0, 0.5, "sqlite:///x.db")
    assert (settings.device, settings.worker_id) == ("cuda:1", "gpu-7")
    assert settings.job_time_limit_s == 86400 and settings.resend_after_s == 600
    assert settings.broker_url.startswith("sqlalchemy+sqlite:///")


def test_storage_comes_from_the_same_variables_as_the_api(tmp_path: Path) -> None:
    folder = load_settings({"STORAGE_DIR": str(tmp_path)}, env={})
    assert isinstance(folder.storage, LocalStorage) and folder.storage.root == tmp_path
    bucket = load_settings({"STORAGE_DIR": str(tmp_path)}, env={
        "STABLETRAIN_STORAGE_URL": "s3://bkt/pre", "STABLETRAIN_S3_ENDPOINT_URL": "http://127.0.0.1:9",
        "STABLETRAIN_CACHE_DIR": str(tmp_path / "c")})
    store = bucket.storage
    assert isinstance(store, S3Storage) and (store.bucket, store.prefix, store.cache_dir) == ("bkt", "pre", tmp_path / "c")
    assert store.client.meta.endpoint_url == "http://127.0.0.1:9"


def test_redis_visibility_timeout_outlasts_the_longest_job() -> None:
    settings = load_settings({"JOB_TIME_LIMIT_S": 7200}, env={})
    assert broker_transport_options("redis://h:6379/0", settings)["visibility_timeout"] > 7200
    # the SQLAlchemy transport hands its options to create_engine(): none may be passed
    assert broker_transport_options("sqlalchemy+sqlite:///b.db", settings) == {}


def test_celery_is_configured_for_long_idempotent_tasks(tmp_path: Path) -> None:
    flask_app = create_app({"DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
                            "BROKER_URL": "redis://127.0.0.1:6379/15", "STORAGE_DIR": str(tmp_path / "s")})
    celery = make_celery(flask_app, load_settings(flask_app.config, env={}))
    conf = celery.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] > 86400
    assert conf.task_routes["stabletrain.train_job"] == {"queue": "train"}
    assert conf.task_routes["stabletrain.sample"] == {"queue": "samples"}
    bindings = {q.name: (q.exchange.name, q.routing_key) for q in conf.task_queues}
    # one exchange per queue: a shared one would deliver each message to both queues
    assert bindings == {"train": ("train", "train"), "samples": ("samples", "samples"),
                        "webhooks": ("webhooks", "webhooks")}
    celery.loader.import_default_modules()
    assert {"stabletrain.train_job", "stabletrain.sample"} <= set(celery.tasks)

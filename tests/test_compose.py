"""docker-compose.yml: valid against the compose-spec JSON schema, and wired the way the service needs.

No Docker engine runs here, so the file is checked statically: the vendored schema
(tests/data/compose-spec.json, Apache-2.0, from the compose-spec project via
check-jsonschema's vendored copy) plus the invariants the deployment relies on.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from app.config import default_config
from worker.settings import WORKER_DEFAULTS

REPO = Path(__file__).resolve().parents[1]
APP_SERVICES = ("migrate", "api", "worker", "samples", "webhooks")
WORKER_ONLY_KEYS = {"DEVICE", "WORKER_ID"}
# boto3's standard credential variables, read by the S3 storage backend (stabletrain_storage)
AWS_KEYS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}
S3_PROFILE_SERVICES = {"minio", "minio-init"}
IMAGE_TARGETS = {"migrate": "api", "api": "api", "worker": "worker", "samples": "worker", "webhooks": "worker"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def validator() -> jsonschema.Validator:
    schema = json.loads((REPO / "tests" / "data" / "compose-spec.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def env(service: dict[str, Any]) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {k: str(v) for k, v in raw.items()}


def option(command: list[str], *names: str) -> str | None:
    """Value of a CLI option given as `--name value`, `--name=value` or `-n value`."""
    for i, arg in enumerate(command):
        for name in names:
            if arg == name and i + 1 < len(command):
                return command[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def test_file_matches_the_compose_spec_schema(compose: dict[str, Any], validator: jsonschema.Validator) -> None:
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_schema_check_rejects_a_broken_file(compose: dict[str, Any], validator: jsonschema.Validator) -> None:
    """The check has teeth: a misspelled key and a bad depends_on condition are caught."""
    broken = copy.deepcopy(compose)
    broken["services"]["api"]["depend_on"] = ["migrate"]
    broken["services"]["worker"]["depends_on"]["migrate"]["condition"] = "service_finished"
    assert len(list(validator.iter_errors(broken))) >= 2


def test_services_present(compose: dict[str, Any]) -> None:
    assert set(services(compose)) == ({"postgres", "redis", "migrate", "api", "worker", "samples", "webhooks"}
                                      | S3_PROFILE_SERVICES)
    for name in S3_PROFILE_SERVICES:  # optional: started only with `--profile s3`
        assert services(compose)[name]["profiles"] == ["s3"], name
    for name in APP_SERVICES:
        target = IMAGE_TARGETS[name]
        assert services(compose)[name]["image"] == f"stabletrain-{target}:latest", name
        assert services(compose)[name]["build"] == {"context": ".", "target": target}, name


def dockerfile_stages() -> dict[str, list[str]]:
    """Instruction lines of each named stage (continuation lines joined)."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        match = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if match:
            current = stages.setdefault(match.group(2) or match.group(1), [f"FROM {match.group(1)}"])
        elif line.strip() and not line.startswith("#"):
            current.append(line.strip())
    return stages


def stage_chain(stages: dict[str, list[str]], name: str) -> list[str]:
    """A stage's lines with those of the stages it is built FROM."""
    base = stages[name][0].split()[1]
    return (stage_chain(stages, base) if base in stages else []) + stages[name][1:]


def test_api_image_has_no_torch() -> None:
    """The API target installs the torch-free lock and nothing that names torch; the worker adds torch."""
    stages = dockerfile_stages()
    assert {"api", "worker"} <= set(stages), sorted(stages)
    api = stage_chain(stages, "api")
    installs = [line for line in api if line.startswith("RUN") and "pip install" in line]
    assert installs and not [line for line in installs if "torch" in line or "requirements.txt" in line], installs
    assert any("--require-hashes" in line and "requirements-api.lock" in line for line in installs), installs
    locked = {line.split("==")[0] for line in (REPO / "requirements-api.lock").read_text().splitlines()
              if re.match(r"[a-z0-9]", line)}
    assert locked and not {"torch", "triton"} & locked and not [n for n in locked if n.startswith("nvidia")]
    assert {"flask", "celery", "gunicorn", "sqlalchemy"} <= locked
    worker = stage_chain(stages, "worker")
    assert any("torch==" in line or "requirements.txt" in line for line in worker if line.startswith("RUN"))


def test_start_order_waits_for_healthy_stores_and_finished_migration(compose: dict[str, Any]) -> None:
    svc = services(compose)
    assert "healthcheck" in svc["postgres"] and "healthcheck" in svc["redis"]
    assert svc["migrate"]["command"] == ["flask", "--app", "app", "db", "upgrade"]
    assert svc["migrate"]["restart"] == "no"
    assert svc["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in ("api", "worker", "samples", "webhooks"):
        deps = svc[name]["depends_on"]
        assert deps["migrate"] == {"condition": "service_completed_successfully"}, name
        assert deps["postgres"] == {"condition": "service_healthy"}, name
        assert deps["redis"] == {"condition": "service_healthy"}, name


def test_training_worker_reserves_its_gpus_and_runs_one_job(compose: dict[str, Any]) -> None:
    worker = services(compose)["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    # every GPU of the machine: a job's resources.devices ranks run on them (data parallel)
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    # the API refuses jobs asking for more devices than a worker has
    assert env(worker)["STABLETRAIN_MAX_DEVICES"] == env(services(compose)["api"])["STABLETRAIN_MAX_DEVICES"]
    cmd = worker["command"]
    assert cmd[:4] == ["celery", "-A", "worker.celery_app", "worker"]
    assert option(cmd, "-Q", "--queues") == "train"
    assert option(cmd, "-c", "--concurrency") == "1"
    assert option(cmd, "-P", "--pool") == "solo"


def test_samples_worker_runs_the_samples_queue(compose: dict[str, Any]) -> None:
    samples = services(compose)["samples"]
    cmd = samples["command"]
    assert cmd[:4] == ["celery", "-A", "worker.celery_app", "worker"]
    assert option(cmd, "-Q", "--queues") == "samples"
    assert option(cmd, "-c", "--concurrency") == "1"
    assert "deploy" not in samples


def test_webhooks_worker_runs_the_webhooks_queue_on_threads(compose: dict[str, Any]) -> None:
    cmd = services(compose)["webhooks"]["command"]
    assert cmd[:4] == ["celery", "-A", "worker.celery_app", "worker"]
    assert option(cmd, "-Q", "--queues") == "webhooks"
    assert option(cmd, "-P", "--pool") == "threads"
    assert "deploy" not in services(compose)["webhooks"]


def test_api_serves_the_app_factory(compose: dict[str, Any]) -> None:
    api = services(compose)["api"]
    assert api["command"][0] == "gunicorn" and api["command"][-1] == "app:create_app()"
    assert option(api["command"], "--bind") == "0.0.0.0:8000"
    assert any(str(p).endswith(":8000") for p in api["ports"])


def test_env_var_names_are_ones_the_code_reads(compose: dict[str, Any]) -> None:
    known = set(default_config()) | set(WORKER_DEFAULTS) | WORKER_ONLY_KEYS
    for name in APP_SERVICES:
        for var in set(env(services(compose)[name])) - AWS_KEYS:
            assert var.startswith("STABLETRAIN_"), f"{name}: {var}"
            assert var.removeprefix("STABLETRAIN_") in known, f"{name}: {var} is not read by app/config or worker/settings"


def test_app_containers_share_database_broker_and_storage(compose: dict[str, Any]) -> None:
    svc = services(compose)
    shared = ("STABLETRAIN_DATABASE_URL", "STABLETRAIN_BROKER_URL", "STABLETRAIN_STORAGE_DIR")
    values = {name: tuple(env(svc[name])[k] for k in shared) for name in APP_SERVICES}
    assert len(set(values.values())) == 1, values
    db_url, broker_url, storage = values["api"]
    assert re.fullmatch(r"postgresql\+psycopg2://stabletrain:[^@]+@postgres:5432/stabletrain", db_url)
    assert re.fullmatch(r"redis://redis:6379/\d+", broker_url)
    pg_password = svc["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert f":{pg_password}@" in db_url
    for name in APP_SERVICES:
        mounts = {m.split(":")[1]: m.split(":")[0] for m in svc[name]["volumes"]}
        assert any(storage.startswith(target) for target in mounts), f"{name} does not mount {storage}"
        assert mounts.get("/data") == "storage"
    assert "storage" in compose["volumes"]


def test_dockerfile_copies_what_exists() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    sources = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("COPY ")]
    assert sources and all((REPO / src).exists() for src in sources), sources
    assert "STABLETRAIN_STORAGE_DIR=/data/storage" in dockerfile


def test_app_containers_can_share_an_s3_bucket(compose: dict[str, Any]) -> None:
    """One set of variables wires every app container to the bucket; MinIO (profile s3) takes the same
    credentials as its root login, and its init job creates the bucket once MinIO is healthy."""
    svc = services(compose)
    wired = ("STABLETRAIN_STORAGE_URL", "STABLETRAIN_S3_ENDPOINT_URL", *sorted(AWS_KEYS))
    values = {name: tuple(env(svc[name])[k] for k in wired) for name in APP_SERVICES}
    assert len(set(values.values())) == 1, values
    assert values["api"][:2] == ("${STABLETRAIN_STORAGE_URL:-}", "${STABLETRAIN_S3_ENDPOINT_URL:-}")  # off by default
    minio = svc["minio"]
    assert minio["environment"]["MINIO_ROOT_USER"].startswith("${AWS_ACCESS_KEY_ID")
    assert minio["environment"]["MINIO_ROOT_PASSWORD"].startswith("${AWS_SECRET_ACCESS_KEY")
    assert "healthcheck" in minio and "miniodata" in compose["volumes"]
    assert svc["minio-init"]["depends_on"] == {"minio": {"condition": "service_healthy"}}
    assert "mc mb --ignore-existing" in " ".join(svc["minio-init"]["entrypoint"])

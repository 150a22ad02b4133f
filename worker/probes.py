"""Worker side of dry runs and LR probes: measuring the device's throughput, running a job's LR range test.

Neither touches the job's own records or files: a probe reads the job's spec and dataset and writes
only its `probes` row; a calibration writes only its device's `device_calibrations` row."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, delete, select, update

from app.models import DeviceCalibration, Probe
from worker.db import utcnow
from worker.service import JobInputError, load_inputs
from worker.settings import WorkerSettings, pick_device

log = logging.getLogger(__name__)

# A figure measured more recently than this is not measured again (a burst of dry runs asks once each).
CALIBRATION_FRESH_S = 3600


def run_calibration(engine: Engine, settings: WorkerSettings) -> str:
    """Measure this worker's device (unless a fresh figure exists) and store it as its class's row."""
    from worker.engine.calibrate import device_class, measure_throughput

    device = pick_device(settings.device)
    name = device_class(device)
    with engine.connect() as conn:
        measured_at = conn.execute(select(DeviceCalibration.measured_at)
                                   .where(DeviceCalibration.device_class == name)).scalar_one_or_none()
    if measured_at is not None and utcnow() - measured_at < timedelta(seconds=CALIBRATION_FRESH_S):
        return f"{name}: fresh figure from {measured_at.isoformat()}"
    figure = measure_throughput(device)
    details = {k: figure[k] for k in ("steps", "seconds", "flops_per_step", "reference")}
    with engine.begin() as conn:  # one row per class: the newest measurement replaces the last
        conn.execute(delete(DeviceCalibration).where(DeviceCalibration.device_class == name))
        conn.execute(DeviceCalibration.__table__.insert().values(
            device_class=name, flops_per_s=figure["flops_per_s"], details=details, measured_at=utcnow()))
    log.info("calibrated %s: %.3g FLOP/s", name, figure["flops_per_s"])
    return f"{name}: {figure['flops_per_s']:.3g} FLOP/s"


def claim_probe(engine: Engine, probe_id: str) -> tuple[str, dict[str, Any]] | None:
    """queued -> running (once: a duplicate message finds it running); (job id, params) or None."""
    with engine.begin() as conn:
        row = conn.execute(update(Probe).where(Probe.id == probe_id, Probe.status == "queued")
                           .values(status="running", started_at=utcnow())
                           .returning(Probe.job_id, Probe.params)).first()
    return (row.job_id, dict(row.params)) if row is not None else None


def finish_probe(engine: Engine, probe_id: str, result: dict[str, Any] | None, error: str | None) -> None:
    values = {"status": "failed" if error else "succeeded", "result": result, "error": error,
              "finished_at": utcnow()}
    with engine.begin() as conn:
        conn.execute(update(Probe).where(Probe.id == probe_id, Probe.status == "running").values(**values))


def run_probe(engine: Engine, probe_id: str, settings: WorkerSettings) -> str:
    """Run one queued probe: the LR range test of its job's stored spec on its dataset."""
    claimed = claim_probe(engine, probe_id)
    if claimed is None:
        return f"probe {probe_id}: not queued"
    job_id, params = claimed
    try:
        from worker.engine.config import parse_spec, upgrade_legacy_spec
        from worker.engine.lr_probe import lr_range_test

        raw, corpus, _ = load_inputs(engine, job_id, settings.storage)
        spec = parse_spec(upgrade_legacy_spec(raw))
        result = lr_range_test(spec, corpus, params["lr_min"], params["lr_max"], params["steps"],
                               device=pick_device(settings.device))
    except JobInputError as exc:
        finish_probe(engine, probe_id, None, str(exc))
        return f"probe {probe_id}: failed"
    except Exception as exc:  # the probe's own failure; the job is untouched
        log.exception("probe %s failed", probe_id)
        finish_probe(engine, probe_id, None, f"probe failed: {type(exc).__name__}: {exc}")
        return f"probe {probe_id}: failed"
    finish_probe(engine, probe_id, _json_safe(result), None)
    return f"probe {probe_id}: succeeded"


def _json_safe(value: Any) -> Any:
    """The result as stored JSON: no NaN or infinity (the curve already uses null for those)."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value

"""POST /v1/jobs?dry_run=true: what a spec would cost, from the engine's stdlib estimate; nothing is written.

Wall time comes from the newest cached device calibration (a training worker's measured FLOPs/s,
table device_calibrations). With none cached the answer has `estimated_wall_s: null`, a reason, and
a calibration task is sent to the train queue: the dry run never waits for a worker, so it answers
in well under 2 s whatever the workers are doing."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from sqlalchemy import select

from app.extensions import db
from app.models import DeviceCalibration, utcnow
from app.services.datasets import distinct_characters
from app.services.jobs import check_dataset, check_limits
from app.services.queue import CALIBRATE_TASK, TRAIN_QUEUE, publish
from worker.engine import estimate

log = logging.getLogger(__name__)

# Older figures are still used, and a fresh measurement is requested alongside (hardware or software
# of a device class may have changed).
CALIBRATION_MAX_AGE = timedelta(days=7)


def dry_run(owner_id: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The dry run's answer for a loaded spec; the same 422s as a real submit, no record written."""
    check_limits(spec)
    dataset = check_dataset(owner_id, spec)
    # a char tokenizer's vocabulary comes from the corpus
    chars = distinct_characters(dataset) if spec["tokenizer"]["kind"] == "char" else None
    vocab, vocab_exact = estimate.vocab_for(spec["tokenizer"], chars)
    figures = estimate.estimate(spec, vocab)
    db.session.rollback()  # end the read transaction; nothing was written
    return {**figures, "vocab_size": vocab, "vocab_exact": vocab_exact, **_wall_time(figures["flops"])}


def _wall_time(flops: int) -> dict[str, Any]:
    newest = db.session.execute(select(DeviceCalibration).order_by(DeviceCalibration.measured_at.desc())
                                .limit(1)).scalar_one_or_none()
    if newest is None:
        requested = publish(CALIBRATE_TASK, "dry_run", TRAIN_QUEUE)
        return {"estimated_wall_s": None, "device_class": None, "flops_per_s": None, "calibrated_at": None,
                "wall_reason": "no training worker has measured its device yet; "
                               + ("a calibration was requested, ask again in a minute"
                                  if requested else "the task queue is unavailable to request one")}
    if utcnow() - newest.measured_at > CALIBRATION_MAX_AGE:
        publish(CALIBRATE_TASK, "stale", TRAIN_QUEUE)
    return {"estimated_wall_s": estimate.wall_seconds(flops, newest.flops_per_s),
            "device_class": newest.device_class, "flops_per_s": newest.flops_per_s,
            "calibrated_at": newest.measured_at, "wall_reason": None}

"""Publishing tasks by name; failures are logged, never raised (the reconciler re-sends)."""

from __future__ import annotations

import logging

from app.extensions import celery_client

log = logging.getLogger(__name__)

TRAIN_TASK, TRAIN_QUEUE = "stabletrain.train_job", "train"
SAMPLE_TASK, SAMPLE_QUEUE = "stabletrain.sample", "samples"
# Exports are short CPU work like samples and share their queue (and workers).
EXPORT_TASK = "stabletrain.export"
# LR range tests run next to samples; a calibration measures a training worker's own device.
PROBE_TASK = "stabletrain.lr_probe"
CALIBRATE_TASK = "stabletrain.calibrate"


def publish(task: str, record_id: str, queue: str, extra: tuple[object, ...] = ()) -> bool:
    """Send one task (arguments: the record id, then `extra`); True when the broker accepted it."""
    try:
        celery_client.send_task(task, args=[record_id, *extra], queue=queue)
        return True
    except Exception as exc:  # broker down or misconfigured: the record stays queued
        log.warning("enqueue of %s(%s) on %s failed: %s", task, record_id, queue, exc)
        return False

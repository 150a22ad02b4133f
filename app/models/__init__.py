"""The records of docs/contracts.md."""

from app.models._common import ID_PATTERN, is_server_id, new_id, utcnow
from app.models.api_key import ApiKey
from app.models.checkpoint import Checkpoint
from app.models.dataset import Dataset, DatasetFile
from app.models.event import Event
from app.models.job import (
    HEALTH_STATES,
    JOB_STATUSES,
    LIVE_STATUSES,
    TERMINAL_STATUSES,
    UNFINISHED_STATUSES,
    Job,
)
from app.models.metrics import ActivationMetric, LayerMetric, StepMetric
from app.models.probe import PENDING_PROBE_STATUSES, PROBE_STATUSES, DeviceCalibration, Probe
from app.models.sample import PENDING_SAMPLE_STATUSES, SAMPLE_STATUSES, Sample, next_fair_sample
from app.models.webhook import (
    DELIVERY_STATUSES,
    WEBHOOK_EVENTS,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookMessage,
)

__all__ = [
    "ActivationMetric",
    "DELIVERY_STATUSES",
    "WEBHOOK_EVENTS",
    "WebhookDelivery",
    "WebhookEndpoint",
    "WebhookMessage",
    "ApiKey",
    "Checkpoint",
    "Dataset",
    "DeviceCalibration",
    "DatasetFile",
    "Event",
    "HEALTH_STATES",
    "JOB_STATUSES",
    "LIVE_STATUSES",
    "UNFINISHED_STATUSES",
    "Job",
    "LayerMetric",
    "PENDING_PROBE_STATUSES",
    "PENDING_SAMPLE_STATUSES",
    "PROBE_STATUSES",
    "Probe",
    "SAMPLE_STATUSES",
    "Sample",
    "next_fair_sample",
    "StepMetric",
    "TERMINAL_STATUSES",
    "ID_PATTERN",
    "is_server_id",
    "new_id",
    "utcnow",
]

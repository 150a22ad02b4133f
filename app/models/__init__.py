"""The records of docs/contracts.md."""

from app.models._common import ID_PATTERN, is_server_id, new_id, utcnow
from app.models.api_key import ApiKey
from app.models.checkpoint import Checkpoint
from app.models.dataset import Dataset
from app.models.event import Event
from app.models.job import HEALTH_STATES, JOB_STATUSES, LIVE_STATUSES, TERMINAL_STATUSES, Job
from app.models.metrics import ActivationMetric, LayerMetric, StepMetric
from app.models.sample import SAMPLE_STATUSES, Sample

__all__ = [
    "ActivationMetric",
    "ApiKey",
    "Checkpoint",
    "Dataset",
    "Event",
    "HEALTH_STATES",
    "JOB_STATUSES",
    "LIVE_STATUSES",
    "Job",
    "LayerMetric",
    "SAMPLE_STATUSES",
    "Sample",
    "StepMetric",
    "TERMINAL_STATUSES",
    "ID_PATTERN",
    "is_server_id",
    "new_id",
    "utcnow",
]

"""The API fixtures (dataset, job) for the ops tests that look at /metrics after real requests."""

from tests.api.conftest import dataset, job, submit, upload  # noqa: F401

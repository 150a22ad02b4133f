"""Security tests reuse the API tests' factories (datasets and jobs made through the HTTP API) and the
fuzzer's seeded app (one per module and backend: a key, a dataset, a running and a finished job)."""

from tests.api.conftest import CORPUS, dataset, job, submit, upload  # noqa: F401
from tests.fuzz.conftest import seeded  # noqa: F401

"""Python client and `stabletrain` command for the StableTrain HTTP API.

    from stabletrain import Client
    client = Client()                       # STABLETRAIN_URL, STABLETRAIN_API_KEY
    ds = client.upload("corpus.txt")
    job = client.submit({"model": {...}, "training": {...}}, dataset_id=ds["id"])
    job = client.wait(job["id"], on_progress=print)
    path = client.download(job["id"])       # sha256-verified checkpoint

Only `requests` is needed: the client never imports the service or torch.
"""

from stabletrain.client import (
    DEFAULT_URL,
    TERMINAL_STATUSES,
    ApiError,
    ChecksumError,
    Client,
    ConfigError,
    ConnectionFailed,
    StableTrainError,
)

__all__ = [
    "DEFAULT_URL",
    "TERMINAL_STATUSES",
    "ApiError",
    "ChecksumError",
    "Client",
    "ConfigError",
    "ConnectionFailed",
    "StableTrainError",
]

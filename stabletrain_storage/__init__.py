"""Where StableTrain keeps its files: a local folder (the default) or an S3-compatible bucket.

Neutral ground for the API (`app/`) and the workers (`worker/`): standard library plus boto3 (imported
only by the S3 backend). Keys are the relative paths of the folder layout (`datasets/<sha256>.txt`,
`checkpoints/<job>/step_<n>.pt`, `exports/...`, `tokenizers/...`), the same in both backends.
"""

from __future__ import annotations

from stabletrain_storage.base import ObjectInfo, Storage, StorageError, check_key, fetch_verified, file_sha256
from stabletrain_storage.keys import checkpoint_key, checkpoint_prefix, checkpoint_step, dataset_key
from stabletrain_storage.local import LocalStorage
from stabletrain_storage.open import open_storage

__all__ = [
    "LocalStorage", "ObjectInfo", "Storage", "StorageError", "check_key", "checkpoint_key", "checkpoint_prefix",
    "checkpoint_step", "dataset_key", "fetch_verified", "file_sha256", "open_storage",
]

"""PNG plots of a job: aggregate the series in SQL (request thread), render off it (one plot thread), cache.

Cache key: (job id, plot name, last recorded step of the series). A finished job's plots are
rendered once; a running job's plot is rendered again only when new steps arrived. Bytes are kept
in a small in-memory LRU and under <storage>/plots/<job_id>/ (so restarts and other API processes
reuse them); older files of the same plot are removed when a newer one is written.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from flask_smorest import abort

from app.models import ActivationMetric, Job, LayerMetric, StepMetric
from app.plots import aggregate
from app.plots.data import PlotData
from app.plots.render import PLOT_NAMES, render
from app.services.storage import storage_dir

RENDER_TIMEOUT_S = 60.0
MEMORY_ENTRIES = 64

# pyplot is not thread-safe and even the object API shares font caches: one render at a time,
# on a thread of its own so a slow render never runs inside a request handler's thread.
_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stabletrain-plots")
_lock = threading.Lock()
_memory: OrderedDict[tuple[str, str, int], bytes] = OrderedDict()
_inflight: dict[tuple[str, str, int], Future[bytes]] = {}

def check_name(name: str) -> None:
    """404 (error envelope) for an unknown plot name."""
    if name not in PLOT_NAMES:
        abort(404, message=f"Unknown plot {name!r}; plots are {', '.join(PLOT_NAMES)}.",
              details={"name": name, "plots": list(PLOT_NAMES)})


_TABLES = {"layers": LayerMetric.__table__.c, "activations": ActivationMetric.__table__.c,
           "grad_time": ActivationMetric.__table__.c}


def last_step(job: Job, name: str) -> int:
    """Newest step of the series this plot draws (0 when none)."""
    return aggregate.last_step(job.id, _TABLES.get(name, StepMetric.__table__.c))


def clip_threshold(spec: dict[str, Any] | None) -> float | None:
    """stabilization.clip.max_norm when clipping by norm, else None."""
    clip = ((spec or {}).get("stabilization") or {}).get("clip") or {}
    if clip.get("mode") != "norm":
        return None
    value = clip.get("max_norm")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def load(job: Job, name: str) -> PlotData:
    """What plot `name` draws, aggregated in SQL per step bucket (runs in the request thread: it uses the
    session). Its size is bounded by the buckets, never by the number of steps."""
    data = PlotData(title=job.name or job.id, clip_max_norm=clip_threshold(job.spec))
    if name == "layers":
        data.heatmap = aggregate.layer_heatmap(job.id)
    elif name == "activations":
        data.heatmap_metric = aggregate.activation_metric(job.id)
        data.heatmap = aggregate.activation_heatmap(job.id, data.heatmap_metric)
    elif name == "grad_time":
        data.lines = aggregate.grad_time_series(job.id)
    else:
        data.steps = aggregate.step_series(job.id)
    return data


def _cache_path(job_id: str, name: str, last: int) -> Path:
    return storage_dir() / "plots" / job_id / f"{name}-{last}.png"


def _remember(key: tuple[str, str, int], png: bytes) -> None:
    with _lock:
        _memory[key] = png
        _memory.move_to_end(key)
        while len(_memory) > MEMORY_ENTRIES:
            _memory.popitem(last=False)


def _write_file(path: Path, png: bytes) -> None:
    """Atomic write; then drop this plot's older renders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(png)
    os.replace(tmp, path)
    prefix = path.name.rsplit("-", 1)[0] + "-"
    for old in path.parent.glob(f"{prefix}*.png"):
        if old != path and old.name.rsplit("-", 1)[0] + "-" == prefix:
            old.unlink(missing_ok=True)


def _render_once(key: tuple[str, str, int], data: PlotData) -> bytes:
    """Render on the plot thread; concurrent requests for the same key share one render."""
    with _lock:
        future = _inflight.get(key)
        if future is None:
            future = _executor.submit(render, key[1], data)
            _inflight[key] = future
    try:
        return future.result(timeout=RENDER_TIMEOUT_S)
    except FutureTimeout:
        abort(503, message=f"Rendering plot {key[1]!r} took longer than {RENDER_TIMEOUT_S:g} s; try again.",
              headers={"Retry-After": "5"})
        raise  # unreachable
    finally:
        if future.done():
            with _lock:
                if _inflight.get(key) is future:
                    del _inflight[key]


def plot_png(job: Job, name: str) -> tuple[bytes, str]:
    """(PNG bytes, ETag) of plot `name` of `job`, from cache when its series has not moved."""
    check_name(name)
    last = last_step(job, name)
    key = (job.id, name, last)
    etag = f"{job.id}-{name}-{last}"
    with _lock:
        png = _memory.get(key)
        if png is not None:
            _memory.move_to_end(key)
    if png is not None:
        return png, etag
    path = _cache_path(job.id, name, last)
    if path.is_file():
        png = path.read_bytes()
    else:
        png = _render_once(key, load(job, name))
        _write_file(path, png)
    _remember(key, png)
    return png, etag


def clear_memory_cache() -> None:
    """Forget in-memory renders (tests)."""
    with _lock:
        _memory.clear()

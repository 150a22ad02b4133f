"""HTTP client for the StableTrain API (`requests` only; no service or torch imports).

Retries: 429 (honouring Retry-After), 502/503/504 and connection errors, with exponential
backoff and jitter, at most `retries` times. Which requests are retried depends on whether
repeating them is safe:

- GETs, `submit` and `retry` (they always send an Idempotency-Key, the same one on every attempt)
  and `cancel` (idempotent on the server) are retried on all of the above;
- `upload` and `sample` create a record per request, so they are retried only when nothing
  can have been stored: a 429/503 answer, or a connection that was never established.

Every other error answer (4xx, 500) raises `ApiError` at once.
"""

from __future__ import annotations

import email.utils
import hashlib
import io
import logging
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Literal

import requests
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

log = logging.getLogger("stabletrain")

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
# `wait` also returns for a paused job: it does not move again until someone resumes it
SETTLED_STATUSES = TERMINAL_STATUSES | {"paused"}
SAMPLE_DONE = frozenset({"succeeded", "failed"})
SAMPLE_MAX_WAIT_S = 10.0  # the server's bound on ?wait= for samples
RETRY_STATUSES = frozenset({429, 502, 503, 504})
# answers after which the server has stored nothing (safe to repeat a non-idempotent POST)
NOTHING_STORED_STATUSES = frozenset({429, 503})

Policy = Literal["idempotent", "unsafe"]


class StableTrainError(Exception):
    """Base class of the client's errors."""


class ConfigError(StableTrainError):
    """Missing or malformed configuration (URL, API key)."""


class ConnectionFailed(StableTrainError):
    """The service could not be reached (after retries where they were allowed)."""


class ChecksumError(StableTrainError):
    """A downloaded file does not match the sha256 or size the service listed."""


class ApiError(StableTrainError):
    """An error answer from the service: `{"error": {"code", "message", "details"}}`."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None, attempts: int = 1) -> None:
        self.status, self.code, self.message = status, code, message
        self.details: dict[str, Any] = details or {}
        self.headers: dict[str, str] = headers or {}
        self.attempts = attempts
        super().__init__(str(self))

    @classmethod
    def from_response(cls, response: requests.Response, attempts: int = 1) -> ApiError:
        """Parse the error envelope; tolerate non-JSON bodies (a proxy's HTML page)."""
        code, message, details = f"http_{response.status_code}", "", {}
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            err = body["error"]
            code = str(err.get("code") or code)
            message = str(err.get("message") or "")
            details = err.get("details") if isinstance(err.get("details"), dict) else {}
        if not message:
            text = (response.text or "").strip().splitlines()
            message = text[0][:200] if text else (response.reason or "request failed")
        return cls(response.status_code, code, message, details, dict(response.headers), attempts)

    def field_messages(self) -> list[str]:
        """`details` as "field: message" strings (validation errors carry field paths)."""
        out = []
        for field, value in self.details.items():
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                out.append(f"{field}: {' '.join(value)}")
        return out

    def __str__(self) -> str:
        fields = self.field_messages()
        if fields and self.status == 422:
            text = "; ".join(fields)
        elif fields and not all(f.split(": ", 1)[-1] in self.message for f in fields):
            text = f"{self.message} ({'; '.join(fields)})"
        else:
            text = self.message
        return f"error {self.status} {self.code}: {text}"


def _nothing_sent(exc: requests.RequestException) -> bool:
    """True when the connection was never established, so the server cannot have seen the request."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = exc.args[0] if exc.args else None
    reason = getattr(reason, "reason", reason)  # urllib3 MaxRetryError wraps the cause
    return isinstance(reason, (NewConnectionError, ConnectTimeoutError))


def _retry_after_s(value: str | None) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


class Client:
    """A StableTrain API client; `url`/`key` default to STABLETRAIN_URL / STABLETRAIN_API_KEY.

    `timeout` is the per-request socket timeout in seconds; `retries` the most extra attempts of
    one request; `backoff` the first retry delay (doubled per attempt up to `max_backoff`, with
    jitter); a Retry-After longer than `max_retry_after` is not waited for (the 429 is raised).
    """

    def __init__(self, url: str | None = None, key: str | None = None, timeout: float = 30.0,
                 retries: int = 4, backoff: float = 0.5, max_backoff: float = 30.0,
                 max_retry_after: float = 120.0, session: requests.Session | None = None) -> None:
        url = (url or os.environ.get("STABLETRAIN_URL") or DEFAULT_URL).strip().rstrip("/")
        if not url.startswith(("http://", "https://")) or len(url.split("://", 1)[1]) == 0:
            raise ConfigError(f"STABLETRAIN_URL must be an http(s) URL like {DEFAULT_URL}, not {url!r}")
        self.url = url
        self.key = (key if key is not None else os.environ.get("STABLETRAIN_API_KEY", "")).strip() or None
        self.timeout, self.retries = timeout, max(0, int(retries))
        self.backoff, self.max_backoff, self.max_retry_after = backoff, max_backoff, max_retry_after
        self.session = session or requests.Session()
        self.session.headers["User-Agent"] = "stabletrain-client/0.1"
        self._sleep: Callable[[float], None] = time.sleep

    # -- plumbing ---------------------------------------------------------------------------

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _delay(self, attempt: int) -> float:
        """Exponential backoff with 'equal jitter': half fixed, half random."""
        cap = min(self.max_backoff, self.backoff * (2 ** attempt))
        return cap / 2 + random.uniform(0, cap / 2)

    def request(self, method: str, path: str, *, policy: Policy = "idempotent", auth: bool = True,
                expect: tuple[int, ...] = (200,), rewind: Callable[[], None] | None = None,
                **kwargs: Any) -> requests.Response:
        """One API call with retries per `policy`; returns the response when its status is in
        `expect`, else raises ApiError (ConnectionFailed when the service cannot be reached)."""
        if auth and not self.key:
            raise ConfigError("no API key: set STABLETRAIN_API_KEY (or pass --key); "
                              "`flask --app app keys create NAME` makes one")
        headers = dict(kwargs.pop("headers", None) or {})
        if auth:
            headers["Authorization"] = f"Bearer {self.key}"
        kwargs.setdefault("timeout", self.timeout)
        url = path if path.startswith(("http://", "https://")) else f"{self.url}{path}"
        attempt = 0
        while True:
            if rewind is not None:
                rewind()
            try:
                response = self.session.request(method, url, headers=headers, **kwargs)
            except requests.RequestException as exc:
                if not isinstance(exc, (requests.ConnectionError, requests.Timeout)):
                    raise ConnectionFailed(f"{method} {url} failed: {exc}") from exc
                retryable = policy == "idempotent" or _nothing_sent(exc)
                if not retryable or attempt >= self.retries:
                    hint = "" if retryable else " (not retried: the request may have reached the server)"
                    raise ConnectionFailed(f"cannot reach {self.url} ({method} {path}): "
                                           f"{_short_reason(exc)}{hint}") from exc
                delay = self._delay(attempt)
                log.warning("%s %s: %s; retrying in %.1f s (%d/%d)", method, path, _short_reason(exc),
                            delay, attempt + 1, self.retries)
                self._sleep(delay)
                attempt += 1
                continue
            if response.status_code in expect:
                return response
            error = ApiError.from_response(response, attempts=attempt + 1)
            response.close()
            allowed = RETRY_STATUSES if policy == "idempotent" else NOTHING_STORED_STATUSES
            if response.status_code not in allowed or attempt >= self.retries:
                raise error
            delay = self._delay(attempt)
            retry_after = _retry_after_s(response.headers.get("Retry-After"))
            if retry_after is not None:
                if retry_after > self.max_retry_after:
                    raise error
                delay = max(delay, retry_after) if response.status_code != 429 else retry_after + delay / 10
            log.warning("%s %s: %d %s; retrying in %.1f s (%d/%d)", method, path, response.status_code,
                        error.code, delay, attempt + 1, self.retries)
            self._sleep(delay)
            attempt += 1

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()

    def _pages(self, path: str, params: dict[str, Any], cursor_param: str, next_key: str,
               start: Any = None) -> Iterator[dict[str, Any]]:
        """Every item of a paged listing, following `next_key` into `cursor_param`."""
        cursor = start
        while True:
            query = {k: v for k, v in params.items() if v is not None}
            if cursor is not None:
                query[cursor_param] = cursor
            page = self._json("GET", path, params=query)
            yield from page.get("items") or []
            cursor = page.get(next_key)
            if cursor is None or not page.get("items"):
                return

    # -- datasets ---------------------------------------------------------------------------

    def upload(self, source: str | os.PathLike[str] | bytes | IO[bytes], name: str | None = None) -> dict[str, Any]:
        """Upload a UTF-8 corpus: a file path, raw bytes or a binary file object. Returns the dataset
        (id, name, bytes, sha256). Streamed as text/plain; retried only when nothing was stored."""
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            with open(path, "rb") as fh:
                return self._upload(fh, name or path.name)
        if isinstance(source, (bytes, bytearray, memoryview)):
            return self._upload(io.BytesIO(bytes(source)), name)
        return self._upload(source, name)

    def upload_text(self, text: str, name: str | None = None) -> dict[str, Any]:
        """Upload a corpus given as a string."""
        return self._upload(io.BytesIO(text.encode("utf-8")), name)

    def _upload(self, fh: IO[bytes], name: str | None) -> dict[str, Any]:
        start = fh.tell() if fh.seekable() else None
        rewind = (lambda: fh.seek(start)) if start is not None else None
        return self._json("POST", "/v1/datasets", policy="unsafe", expect=(200, 201), rewind=rewind,
                          params={"name": name} if name else None, data=fh,
                          headers={"Content-Type": "text/plain; charset=utf-8"})

    def list_datasets(self, limit: int = 50) -> Iterator[dict[str, Any]]:
        """All datasets of this key, newest first."""
        return self._pages("/v1/datasets", {"limit": limit}, "cursor", "next_cursor")

    def dataset(self, dataset_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/datasets/{dataset_id}")

    def delete_dataset(self, dataset_id: str) -> None:
        self.request("DELETE", f"/v1/datasets/{dataset_id}", expect=(204,))

    # -- jobs -------------------------------------------------------------------------------

    def submit(self, spec: dict[str, Any], dataset_id: str | None = None,
               idempotency_key: str | None = None) -> dict[str, Any]:
        """Submit a job spec (202, or 200 for a replay of the same Idempotency-Key). A uuid4 key is
        made when none is given and reused on every retry, so a retried submit makes one job."""
        body = dict(spec)
        if dataset_id is not None:
            body["dataset_id"] = dataset_id
        key = idempotency_key or str(uuid.uuid4())
        return self._json("POST", "/v1/jobs", expect=(200, 201, 202), json=body,
                          headers={"Idempotency-Key": key})

    def dry_run(self, spec: dict[str, Any], dataset_id: str | None = None) -> dict[str, Any]:
        """Validate a spec as submit would (the same 422s) and estimate it, without making a job:
        params, memory (bytes), tokens, flops and estimated_wall_s (null with wall_reason while no
        worker has measured its device). Safe to retry: nothing is recorded."""
        body = dict(spec)
        if dataset_id is not None:
            body["dataset_id"] = dataset_id
        return self._json("POST", "/v1/jobs", expect=(200,), json=body, params={"dry_run": "true"})

    def probe(self, job_id: str, *, lr_min: float | None = None, lr_max: float | None = None,
              steps: int | None = None, timeout: float = 600.0, poll_s: float = 0.5,
              max_poll_s: float = 5.0) -> dict[str, Any]:
        """Run an LR range test of the job's spec on a worker and poll it until succeeded/failed (every
        `poll_s` doubling up to `max_poll_s`); returns the probe: `result` has the curve, steepest_lr,
        divergence_lr and `recommended` {field: "training.lr", value} for `retry(overrides=...)`.
        Raises StableTrainError when still unfinished after `timeout` s."""
        body = {k: v for k, v in {"lr_min": lr_min, "lr_max": lr_max, "steps": steps}.items() if v is not None}
        probe = self.request("POST", f"/v1/jobs/{job_id}/probes", policy="unsafe", expect=(202,),
                             json=body).json()
        deadline = time.monotonic() + timeout
        delay = poll_s
        while probe.get("status") not in SAMPLE_DONE:
            if time.monotonic() >= deadline:
                raise StableTrainError(f"probe {probe['id']} still {probe.get('status')} after {timeout:g} s")
            self._sleep(min(delay, max(deadline - time.monotonic(), 0.0)))
            delay = min(delay * 2, max_poll_s)
            probe = self._json("GET", f"/v1/jobs/{job_id}/probes/{probe['id']}")
        return probe

    def retry(self, job_id: str, apply: str | list[str] = "recommendations",
              overrides: dict[str, Any] | None = None, idempotency_key: str | None = None) -> dict[str, Any]:
        """Retry a finished job as a new one with its diagnosis' recommendations applied: all of them
        ("recommendations"), those of some finding kinds (["vanishing", ...]) or none ([]); then
        `overrides` ({"training.max_steps": 500}). Returns the new job: `parent_id`, and
        `applied_patch` [{field, value, from_finding}]. Idempotency-Key as in `submit`."""
        body = {"apply": apply, "overrides": overrides or {}}
        key = idempotency_key or str(uuid.uuid4())
        return self._json("POST", f"/v1/jobs/{job_id}/retry", expect=(200, 202), json=body,
                          headers={"Idempotency-Key": key})

    def job(self, job_id: str) -> dict[str, Any]:
        """Status, progress, latest metrics, health and error of one job."""
        return self._json("GET", f"/v1/jobs/{job_id}")

    def jobs(self, status: str | None = None, limit: int = 50) -> Iterator[dict[str, Any]]:
        """All jobs of this key (optionally one status), newest first, across cursor pages."""
        return self._pages("/v1/jobs", {"status": status, "limit": limit}, "cursor", "next_cursor")

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a job (queued: at once; running: at its next step). A 409 'already cancelled'
        that answers a retried cancel means an earlier attempt worked: the job is returned."""
        try:
            return self._json("POST", f"/v1/jobs/{job_id}/cancel", expect=(200, 202))
        except ApiError as exc:
            if exc.status == 409 and exc.attempts > 1 and exc.details.get("status") == "cancelled":
                return self.job(job_id)
            raise

    def pause(self, job_id: str) -> dict[str, Any]:
        """Pause a job: queued at once ("paused"); running at its next step, with a checkpoint ("pausing",
        then "paused"), freeing its worker. A paused job does not count toward the key's live-job limit.
        Repeating it is harmless (the same answer)."""
        return self._json("POST", f"/v1/jobs/{job_id}/pause", expect=(200, 202))

    def resume(self, job_id: str) -> dict[str, Any]:
        """Queue a paused job again; it continues from its newest checkpoint, with the weights a run never
        paused would have. A job already queued or running is returned as it is (a repeated resume)."""
        return self._json("POST", f"/v1/jobs/{job_id}/resume", expect=(200, 202))

    def wait(self, job_id: str, on_progress: Callable[[dict[str, Any]], None] | None = None,
             poll_s: float = 1.0, timeout: float | None = None, outage_s: float = 300.0) -> dict[str, Any]:
        """Poll the job until it is succeeded, failed, cancelled or paused; `on_progress(job)` after each poll.
        Returns the final job; raises StableTrainError after `timeout` seconds. An outage of the
        service (unreachable, or 502/503/504 after the request's own retries) is waited out for up
        to `outage_s` seconds: the job keeps training meanwhile."""
        deadline = None if timeout is None else time.monotonic() + timeout
        down_since: float | None = None
        while True:
            try:
                job = self.job(job_id)
            except (ConnectionFailed, ApiError) as exc:
                if isinstance(exc, ApiError) and exc.status not in RETRY_STATUSES - {429}:
                    raise
                down_since = down_since if down_since is not None else time.monotonic()
                if time.monotonic() - down_since > outage_s:
                    raise
                log.warning("still waiting for %s: %s", job_id, exc)
                self._sleep(max(poll_s, 1.0))
                continue
            down_since = None
            if on_progress is not None:
                on_progress(job)
            if job.get("status") in SETTLED_STATUSES:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise StableTrainError(f"job {job_id} still {job.get('status')} after {timeout:g} s")
            self._sleep(poll_s)

    def _cursor_pages(self, path: str, params: dict[str, Any], start_param: str,
                      start: int) -> Iterator[dict[str, Any]]:
        """Every item of a keyset-paged listing: the first page from `start_param`=start, the next ones from
        each page's `next_cursor`, which holds the full sort key of the page's last row (so nothing is lost
        when a page ends inside a step)."""
        first = {**params, start_param: start or None}
        cursor: str | None = None
        while True:
            query = {k: v for k, v in (params if cursor else first).items() if v is not None}
            if cursor:
                query["cursor"] = cursor
            page = self._json("GET", path, params=query)
            yield from page.get("items") or []
            cursor = page.get("next_cursor")
            if not cursor or not page.get("items"):
                return

    def metrics(self, job_id: str, after_step: int = 0, limit: int = 1000,
                max_points: int | None = None) -> Iterator[dict[str, Any]]:
        """Every step row after `after_step`, following `next_cursor` across pages (with max_points, each
        page is downsampled on its own)."""
        return self._cursor_pages(f"/v1/jobs/{job_id}/metrics", {"limit": limit, "max_points": max_points},
                                  "after_step", after_step)

    def layer_metrics(self, job_id: str, after_step: int = 0, limit: int = 1000,
                      layer: str | None = None) -> Iterator[dict[str, Any]]:
        """Every per-layer row (step, layer, position, grad_norm, weight_norm, update_ratio), in depth order
        within a step (`position`: 0 = first layer; null for rows recorded before positions existed)."""
        return self._cursor_pages(f"/v1/jobs/{job_id}/metrics/layers", {"limit": limit, "layer": layer},
                                  "after_step", after_step)

    def activation_metrics(self, job_id: str, after_step: int = 0, limit: int = 1000,
                           site: str | None = None) -> Iterator[dict[str, Any]]:
        """Every activation row (step, site, position, kind, mean, std, saturated_frac, dead_frac,
        attn_max_logit, attn_entropy, z_lse, grad_time, grad_time_ratio) in (step, position, site) order."""
        return self._cursor_pages(f"/v1/jobs/{job_id}/metrics/activations", {"limit": limit, "site": site},
                                  "after_step", after_step)

    def events(self, job_id: str, after_id: int = 0, limit: int = 100) -> Iterator[dict[str, Any]]:
        """Lifecycle and stability events, oldest first."""
        return self._cursor_pages(f"/v1/jobs/{job_id}/events", {"limit": limit}, "after_id", after_id)

    def diagnosis(self, job_id: str) -> dict[str, Any]:
        """{job_id, status, health, findings: [...], summary}."""
        return self._json("GET", f"/v1/jobs/{job_id}/diagnosis")

    # -- checkpoints ------------------------------------------------------------------------

    def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        """The job's checkpoints (step, bytes, sha256, val_loss, health, download_url), oldest first."""
        return list(self._json("GET", f"/v1/jobs/{job_id}/checkpoints").get("items") or [])

    def download(self, job_id: str, step: int | None = None, dest: str | os.PathLike[str] | None = None,
                 chunk_size: int = 1 << 16) -> Path:
        """Download a checkpoint (the newest when `step` is None) to `dest` (a file, or a folder for
        `<job>_step_<n>.pt`; default the current folder). Streams into a temp file next to it,
        resumes with Range after a broken connection, verifies size and sha256 against the listing,
        then renames. Raises ChecksumError on a mismatch (nothing is left behind)."""
        info = self._pick_checkpoint(job_id, step)
        target = Path(dest) if dest is not None else Path.cwd()
        if target.is_dir():
            target = target / f"{job_id}_step_{info['step']}.pt"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.part"
        url = info.get("download_url") or f"/v1/jobs/{job_id}/checkpoints/{info['step']}/file"
        if url.startswith("/"):
            url = f"{self.url}{url}"
        try:
            self._fetch(url, tmp, info, chunk_size)
            size, digest = _file_digest(tmp)
            if size != info["bytes"] or digest != info["sha256"]:
                raise ChecksumError(f"checkpoint step {info['step']} of {job_id}: got {size} bytes sha256 "
                                    f"{digest}, the service lists {info['bytes']} bytes sha256 {info['sha256']}")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return target

    def _pick_checkpoint(self, job_id: str, step: int | None) -> dict[str, Any]:
        """The listing entry of `step` (the newest when None); StableTrainError when absent."""
        listing = self.checkpoints(job_id)
        if not listing:
            raise StableTrainError(f"job {job_id} has no checkpoints yet")
        if step is None:
            return max(listing, key=lambda c: c["step"])
        found = [c for c in listing if c["step"] == step]
        if not found:
            have = ", ".join(str(c["step"]) for c in listing)
            raise StableTrainError(f"job {job_id} has no checkpoint at step {step} (it has: {have})")
        return found[0]

    def export(self, job_id: str, fmt: str = "hf", step: int | None = None,
               dest: str | os.PathLike[str] | None = None, *, wait: float = 10.0, timeout: float = 600.0,
               chunk_size: int = 1 << 16) -> Path:
        """Download an export of a checkpoint (the newest when `step` is None): "hf" (a .tar.gz of a
        Hugging Face folder) or "safetensors" (weights only). A worker writes it: while the service
        answers 202 the request is repeated (after its retry_after_s) until `timeout` s. `dest` is a
        file, or a folder for `<job>_step_<n>.hf.tar.gz` / `.safetensors`. A spec that cannot be
        exported raises ApiError (409, details name the field)."""
        info = self._pick_checkpoint(job_id, step)
        suffix = ".hf.tar.gz" if fmt == "hf" else f".{fmt}"
        target = Path(dest) if dest is not None else Path.cwd()
        if target.is_dir():
            target = target / f"{job_id}_step_{info['step']}{suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.part"
        path = f"/v1/jobs/{job_id}/checkpoints/{info['step']}/export"
        deadline = time.monotonic() + timeout
        try:
            while True:
                response = self.request("GET", path, expect=(200, 202), stream=True,
                                        params={"format": fmt, "wait": wait}, timeout=self.timeout + wait)
                try:
                    if response.status_code == 200:
                        with open(tmp, "wb") as fh:
                            for chunk in response.iter_content(chunk_size):
                                fh.write(chunk)
                        break
                    retry_s = float(response.json().get("retry_after_s") or 1)
                finally:
                    response.close()
                if time.monotonic() + retry_s >= deadline:
                    raise StableTrainError(f"export of {job_id} step {info['step']} as {fmt} not ready "
                                           f"after {timeout:g} s")
                self._sleep(retry_s)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return target

    def _fetch(self, url: str, tmp: Path, info: dict[str, Any], chunk_size: int) -> None:
        """Stream url into tmp; on a broken stream, resume from what was written (bounded)."""
        breaks = 0
        while True:
            have = tmp.stat().st_size if tmp.exists() else 0
            headers = {"Range": f"bytes={have}-", "If-Range": f'"{info["sha256"]}"'} if have else {}
            response = self.request("GET", url, expect=(200, 206), stream=True, headers=headers)
            try:
                mode = "ab" if response.status_code == 206 else "wb"
                with open(tmp, mode) as fh:
                    for chunk in response.iter_content(chunk_size):
                        fh.write(chunk)
                return
            except (requests.ConnectionError, requests.Timeout,
                    requests.exceptions.ChunkedEncodingError) as exc:
                if breaks >= self.retries:
                    raise ConnectionFailed(f"download of {url} kept breaking: {_short_reason(exc)}") from exc
                delay = self._delay(breaks)
                log.warning("download broke (%s); resuming in %.1f s", _short_reason(exc), delay)
                self._sleep(delay)
                breaks += 1
            finally:
                response.close()

    # -- samples ----------------------------------------------------------------------------

    def sample(self, job_id: str, prompt: str, *, wait: float = 0.0, timeout: float = 300.0,
               poll_s: float = 0.25, max_poll_s: float = 2.0, **params: Any) -> dict[str, Any]:
        """Generate text from a checkpoint (params: max_new_tokens, temperature, top_k, seed, step;
        None means the server's default). The server queues the sample and answers 202 at once (or,
        with `wait` <= SAMPLE_MAX_WAIT_S, 201 when done within it); the sample is then polled, every
        `poll_s` doubling up to `max_poll_s`, until succeeded/failed. Returns the sample (status,
        text, error); raises StableTrainError when still unfinished after `timeout` s. A 429 (the
        key's queued-samples cap) is retried after its Retry-After like any 429."""
        body = {"prompt": prompt, **{k: v for k, v in params.items() if v is not None}}
        wait = min(max(wait, 0.0), SAMPLE_MAX_WAIT_S)
        response = self.request("POST", f"/v1/jobs/{job_id}/samples", policy="unsafe", expect=(201, 202),
                                params={"wait": wait}, json=body, timeout=self.timeout + wait)
        sample = response.json()
        deadline = time.monotonic() + timeout
        delay = poll_s
        while sample.get("status") not in SAMPLE_DONE:
            if time.monotonic() >= deadline:
                raise StableTrainError(f"sample {sample['id']} still {sample.get('status')} after {timeout:g} s")
            self._sleep(min(delay, max(deadline - time.monotonic(), 0.0)))
            delay = min(delay * 2, max_poll_s)
            sample = self._json("GET", f"/v1/jobs/{job_id}/samples/{sample['id']}")
        return sample

    # -- service ----------------------------------------------------------------------------

    # -- webhooks ---------------------------------------------------------------------------

    def add_webhook(self, url: str, events: list[str]) -> dict[str, Any]:
        """Register a webhook endpoint for these event types. The answer carries its signing secret
        (`whsec_...`), shown only this once. Retried only when nothing was stored."""
        return self._json("POST", "/v1/webhooks", policy="unsafe", expect=(201,),
                          json={"url": url, "events": list(events)})

    def webhooks(self, limit: int = 50) -> Iterator[dict[str, Any]]:
        """All webhook endpoints of this key, newest first (without secrets)."""
        return self._pages("/v1/webhooks", {"limit": limit}, "cursor", "next_cursor")

    def webhook(self, webhook_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/webhooks/{webhook_id}")

    def delete_webhook(self, webhook_id: str) -> None:
        """Delete an endpoint; its undelivered events are dropped."""
        self.request("DELETE", f"/v1/webhooks/{webhook_id}", expect=(204,))

    def enable_webhook(self, webhook_id: str) -> dict[str, Any]:
        """Send to an endpoint again after its receiver disabled it with a 410 Gone (`disabled_at` set);
        events from now on. Repeating it is harmless."""
        return self._json("POST", f"/v1/webhooks/{webhook_id}/enable")

    def webhook_deliveries(self, webhook_id: str, limit: int = 50) -> Iterator[dict[str, Any]]:
        """An endpoint's delivery log, newest first: status, attempts, last status code, next attempt."""
        return self._pages(f"/v1/webhooks/{webhook_id}/deliveries", {"limit": limit}, "cursor", "next_cursor")

    def health(self) -> dict[str, Any]:
        """GET /readyz (database and broker), no key needed. 503 raises ApiError after retries."""
        return self._json("GET", "/readyz", auth=False)


def _short_reason(exc: BaseException) -> str:
    """A one-line cause for a requests exception ('Connection refused', 'Read timed out')."""
    text = str(exc)
    for marker in ("Connection refused", "Read timed out", "timed out", "Name or service not known",
                   "Connection reset", "Connection aborted", "RemoteDisconnected", "IncompleteRead"):
        if marker in text:
            return marker
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _file_digest(path: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()

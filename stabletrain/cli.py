"""`stabletrain` command: the StableTrain API from a terminal (argparse + tqdm)."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from stabletrain.client import (
    DEFAULT_URL,
    ApiError,
    ChecksumError,
    Client,
    ConfigError,
    ConnectionFailed,
    StableTrainError,
)

EXIT_OK = 0            # done; with --wait: the job succeeded
EXIT_FAILED = 1        # the job (or sample) failed
EXIT_USAGE = 2         # bad arguments, unreadable spec file, missing/invalid URL or key
EXIT_REQUEST = 3       # the service answered an error, could not be reached, or a checksum mismatched
EXIT_CANCELLED = 4     # with --wait: the job was cancelled
EXIT_PAUSED = 5        # with --wait: the job was paused (`stabletrain resume JOB` continues it)
EXIT_INTERRUPTED = 130  # Ctrl-C (the job keeps running unless --cancel-on-interrupt)

EPILOG = f"""\
environment:
  STABLETRAIN_URL       service URL (default {DEFAULT_URL})
  STABLETRAIN_API_KEY   API key (`flask --app app keys create NAME` prints one)

exit codes:
  {EXIT_OK}    success; with --wait / wait: the job succeeded
  {EXIT_FAILED}    the job failed (its error and diagnosis are printed), or a sample failed
  {EXIT_USAGE}    usage error: bad arguments, unreadable spec file, missing or malformed URL/key
  {EXIT_REQUEST}    the request failed: an API error (e.g. `error 422 validation_error: training.lr: ...`),
       the service unreachable after retries, or a downloaded checkpoint failed its sha256 check
  {EXIT_CANCELLED}    with --wait / wait: the job was cancelled
  {EXIT_PAUSED}    with --wait / wait: the job was paused (`stabletrain resume JOB` continues it)
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C); the job keeps running unless --cancel-on-interrupt

Requests are retried with backoff on 429/502/503/504 and connection errors; submit and retry send
an Idempotency-Key (a fresh uuid4 unless --idempotency-key) so a retried request makes one job.
"""

log = logging.getLogger("stabletrain")


class UsageError(StableTrainError):
    """Bad input that argparse cannot see (spec file contents)."""


class _TqdmHandler(logging.Handler):
    """Log lines (retry notices) that do not tear the progress bar; stderr looked up per line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(f"stabletrain: {self.format(record)}", file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def _setup_logging() -> None:
    if not any(isinstance(h, _TqdmHandler) for h in log.handlers):
        log.addHandler(_TqdmHandler())
    log.setLevel(logging.WARNING)


# -- formatting --------------------------------------------------------------------------------

def _num(value: Any, fmt: str = ".4g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (int, float)):
        return format(value, fmt)
    return str(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f} s"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m:02d} min"


def _out(text: str = "") -> None:
    print(text, file=sys.stdout, flush=True)


def _print_json(value: Any) -> None:
    _out(json.dumps(value, indent=2, sort_keys=False, default=str))


def _step_line(job: dict[str, Any]) -> str:
    p = job.get("progress") or {}
    return f"step {p.get('step', 0)}/{p.get('max_steps', '?')}"


def format_job(job: dict[str, Any]) -> str:
    """Several human lines about one job."""
    p = job.get("progress") or {}
    latest = job.get("latest") or {}
    frac = p.get("fraction")
    lines = [f"{job['id']}  {job.get('name') or '-'}  {job.get('status')}",
             f"  {_step_line(job)}" + (f" ({frac * 100:.1f}%)" if frac is not None else "")
             + f"  tokens {p.get('tokens_seen') or 0:,}"
             + (f"  eta {_duration(p.get('eta_s'))}" if job.get("status") == "running" else "")]
    if latest:
        lines.append(f"  latest: loss {_num(latest.get('loss'))}  grad_norm {_num(latest.get('grad_norm'), '.3g')}"
                     f"  lr {_num(latest.get('lr'), '.3g')}  val_loss {_num(latest.get('val_loss'))}")
    lines.append(f"  health: {job.get('health') or '-'}  dataset: {job.get('dataset_id') or '-'}"
                 f"  created: {job.get('created_at') or '-'}")
    if job.get("error"):
        lines.append(f"  error: {job['error']}")
    return "\n".join(lines)


def format_diagnosis(diag: dict[str, Any]) -> str:
    """The summary, then each finding with its recommendations as `field: value — why`."""
    findings = [f for f in diag.get("findings") or [] if isinstance(f, dict)]
    summary = (diag.get("summary") or "").strip()
    head = f"diagnosis ({diag.get('health') or '-'}): "
    if not findings:
        return head + (summary or "no findings")
    lines = [head + f"{len(findings)} finding{'s' if len(findings) != 1 else ''}"]
    covered = " ".join(str(f.get("summary", "")) for f in findings)
    extra = [line for line in summary.splitlines() if line.strip() and line.split("] ", 1)[-1] not in covered]
    lines += [f"  {line}" for line in extra]
    for f in findings:
        steps = f.get("steps") or {}
        where = ""
        if steps.get("first") is not None:
            where = f" (steps {steps['first']}-{steps['last']})" if steps.get("last") not in (None, steps["first"]) \
                else f" (step {steps['first']})"
        lines.append(f"  [{f.get('severity', '?')}] {f.get('kind', '?')}{where}: {f.get('summary', '')}")
        if f.get("layers"):
            layers = [str(name) for name in f["layers"]]
            lines.append(f"      layers: {', '.join(layers[:6])}{' ...' if len(layers) > 6 else ''}")
        for rec in f.get("recommendations") or []:
            lines.append(f"      -> {rec.get('field')}: {json.dumps(rec.get('value'))} — {rec.get('why', '')}")
    return "\n".join(lines)


def format_patch(job: dict[str, Any]) -> str:
    """A retry's applied changes, one `field = value  (finding kind | override)` per line."""
    changes = job.get("applied_patch") or []
    if not changes:
        return "  no changes: the parent's spec as it was"
    width = max(len(str(c.get("field"))) for c in changes)
    return "\n".join(f"  {str(c.get('field')):<{width}} = {json.dumps(c.get('value'))}"
                     f"  ({c.get('from_finding') or 'override'})" for c in changes)


SPIKE_EVENTS = ("grad_norm_spike", "loss_spike")
MAX_OFFSETS_SHOWN = 16


def format_attribution(data: dict[str, Any]) -> list[str]:
    """A spike event's rule and the batch rows behind it: window offsets, then the highest-loss rows."""
    lines = []
    if data.get("value") is not None:
        factor = f" = {_num(data.get('factor'), '.3g')}x" if data.get("factor") is not None else ""
        policy = f" (policy {data['policy']})" if data.get("policy") else ""
        lines.append(f"{data.get('rule') or 'value'} {_num(data['value'], '.4g')}{factor} the median "
                     f"{_num(data.get('median'), '.4g')}{policy}")
    attribution = data.get("attribution") if isinstance(data.get("attribution"), dict) else {}
    offsets = attribution.get("offsets") or []
    if offsets:
        shown = " ".join(str(o) for o in offsets[:MAX_OFFSETS_SHOWN])
        more = f" ... ({len(offsets) - MAX_OFFSETS_SHOWN} more)" if len(offsets) > MAX_OFFSETS_SHOWN else ""
        lines.append(f"batch rows at token offsets: {shown}{more}")
    top = [row for row in attribution.get("top") or [] if isinstance(row, dict)]
    if top:
        lines.append("highest-loss rows:")
        lines += [f"  offset {row.get('offset', '-'):>9}  loss {_num(row.get('loss'), '.4g'):>7}  "
                  f"{json.dumps(row.get('excerpt') or '', ensure_ascii=False)}" for row in top]
    return lines


def format_event(event: dict[str, Any]) -> str:
    """One line per event; spike events add their attribution below it."""
    step = "-" if event.get("step") is None else event["step"]
    line = f"{event.get('created_at', '-')}  step {step:>6}  {event.get('kind', '?'):<15}  {event.get('message', '')}"
    data = event.get("data")
    if event.get("kind") not in SPIKE_EVENTS or not isinstance(data, dict):
        return line
    return "\n".join([line, *(f"      {extra}" for extra in format_attribution(data))])


def format_outcome(job: dict[str, Any]) -> str:
    """The first line after --wait: how the job ended."""
    status = job.get("status")
    latest = job.get("latest") or {}
    took = ""
    if job.get("started_at") and job.get("finished_at"):
        try:
            from datetime import datetime

            start = datetime.fromisoformat(str(job["started_at"]).replace("Z", "+00:00"))
            end = datetime.fromisoformat(str(job["finished_at"]).replace("Z", "+00:00"))
            took = f" in {_duration((end - start).total_seconds())}"
        except ValueError:
            took = ""
    head = f"job {job['id']} {status} at {_step_line(job)}{took}"
    if status == "paused":
        head += f" (`stabletrain resume {job['id']}` continues it)"
    if status == "succeeded":
        head += f": loss {_num(latest.get('loss'))}, val_loss {_num(latest.get('val_loss'))}"
    if job.get("error"):
        head += f"\nerror: {job['error']}"
    return head


# -- progress ----------------------------------------------------------------------------------

class Progress:
    """tqdm bar over max_steps with loss, grad norm and health as postfix (on stderr)."""

    def __init__(self, job_id: str, enabled: bool) -> None:
        self.job_id, self.enabled = job_id, enabled
        self.bar: tqdm | None = None
        self.status: str | None = None

    def __call__(self, job: dict[str, Any]) -> None:
        if not self.enabled:
            return
        p = job.get("progress") or {}
        step, total = int(p.get("step") or 0), p.get("max_steps")
        if self.bar is None:
            self.bar = tqdm(total=total, initial=step, unit="step", desc=self.job_id, file=sys.stderr,
                            dynamic_ncols=True, mininterval=0.2, leave=True)
        bar = self.bar
        latest = job.get("latest") or {}
        status = job.get("status")
        parts = [f"loss={_num(latest.get('loss'))}", f"grad_norm={_num(latest.get('grad_norm'), '.3g')}",
                 f"health={job.get('health') or '-'}"]
        if status != "running":
            parts.append(str(status))
        bar.set_postfix_str(" ".join(parts), refresh=False)  # before update(), which may redraw
        if total and bar.total != total:
            bar.total = total
        if self.status == "queued" and status != "queued":  # time spent queued must not skew the rate/ETA
            bar.reset(total=bar.total)
            bar.initial = bar.n = bar.last_print_n = step
        if step > bar.n:
            bar.update(step - bar.n)
        elif step < bar.n:  # a rollback rewinds the step counter
            bar.n = step
        bar.refresh()
        self.status = status

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def wait_and_report(client: Client, job: dict[str, Any], args: argparse.Namespace) -> int:
    """Follow a job to its end with a progress bar, then print the outcome and diagnosis."""
    job_id = job["id"]
    progress = Progress(job_id, enabled=not args.no_progress)
    try:
        final = client.wait(job_id, on_progress=progress, poll_s=args.poll, timeout=args.wait_timeout)
    except KeyboardInterrupt:
        progress.close()
        if args.cancel_on_interrupt:
            client.cancel(job_id)
            print(f"interrupted: cancel requested for {job_id}", file=sys.stderr)
        else:
            print(f"interrupted: {job_id} keeps running (`stabletrain cancel {job_id}` stops it)",
                  file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        progress.close()
    diagnosis = client.diagnosis(job_id)
    if _json_mode(args):
        _print_json({"job": final, "diagnosis": diagnosis})
    else:
        _out(format_outcome(final))
        _out(format_diagnosis(diagnosis))
    return {"succeeded": EXIT_OK, "cancelled": EXIT_CANCELLED, "paused": EXIT_PAUSED}.get(final["status"], EXIT_FAILED)


# -- commands ----------------------------------------------------------------------------------

def _json_mode(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


def cmd_upload(client: Client, args: argparse.Namespace) -> int:
    if args.file == "-":
        dataset = client.upload(sys.stdin.buffer.read(), name=args.name or "stdin")
    else:
        path = Path(args.file)
        if not path.is_file():
            raise UsageError(f"{args.file}: no such file")
        dataset = client.upload(path, name=args.name)
    if _json_mode(args):
        _print_json(dataset)
    else:
        _out(f"uploaded {dataset['id']}  {dataset.get('name') or '-'}  {dataset.get('bytes', 0):,} bytes"
             f"  sha256 {dataset.get('sha256')}")
    return EXIT_OK


def cmd_datasets(client: Client, args: argparse.Namespace) -> int:
    items = list(client.list_datasets())
    if _json_mode(args):
        _print_json(items)
    for d in [] if _json_mode(args) else items:
        _out(f"{d['id']}  {d.get('bytes', 0):>12,} bytes  {d.get('created_at', '-')}  {d.get('name') or '-'}")
    return EXIT_OK


def _read_spec(name: str) -> dict[str, Any]:
    try:
        text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{name}: {exc.strerror or exc}") from exc
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{name}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    if not isinstance(spec, dict):
        raise UsageError(f"{name}: a job spec is a JSON object, not {type(spec).__name__}")
    return spec


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.3g} GiB" if n >= 2**30 else f"{n / 2**20:.3g} MiB"


def format_dry_run(est: dict[str, Any]) -> str:
    mem = est["memory"]
    vocab = f"{est['vocab_size']}{'' if est['vocab_exact'] else ' (upper bound)'}"
    if est.get("estimated_wall_s") is not None:
        wall = f"~{format_duration(est['estimated_wall_s'])} on {est['device_class']}"
    else:
        wall = f"unknown ({est.get('wall_reason')})"
    return "\n".join([
        f"parameters   {est['params']:,} (vocab {vocab})",
        f"memory       {_gib(mem['total_bytes'])}: weights {_gib(mem['params_bytes'])}, grads "
        f"{_gib(mem['grads_bytes'])}, optimizer {_gib(mem['optimizer_bytes'])}, activations {_gib(mem['activations_bytes'])}",
        f"tokens       {est['tokens']:,} ({est['tokens_per_step']:,} per step)",
        f"flops        {est['flops']:.3g} (train {est['train_flops']:.3g}, eval {est['eval_flops']:.3g})",
        f"wall time    {wall}",
    ])


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.3g} s"
    return f"{seconds / 60:.3g} min" if seconds < 7200 else f"{seconds / 3600:.3g} h"


def cmd_submit(client: Client, args: argparse.Namespace) -> int:
    spec = _read_spec(args.spec)
    if args.name:
        spec["name"] = args.name
    if args.dry_run:
        est = client.dry_run(spec, dataset_id=args.dataset)
        if _json_mode(args):
            _print_json(est)
        else:
            _out(format_dry_run(est))
        return EXIT_OK
    job = client.submit(spec, dataset_id=args.dataset, idempotency_key=args.idempotency_key)
    if args.wait:
        print(f"submitted {job['id']} ({job.get('status')})", file=sys.stderr)
        return wait_and_report(client, job, args)
    if _json_mode(args):
        _print_json(job)
    else:
        _out(f"submitted {job['id']}  {job.get('name') or '-'}  {job.get('status')}")
    return EXIT_OK


def _parse_sets(items: list[str]) -> dict[str, Any]:
    """--set FIELD=VALUE: VALUE is JSON when it parses (500, 0.1, true, {"mode": "norm"}), else a string."""
    overrides: dict[str, Any] = {}
    for item in items:
        field, sep, text = item.partition("=")
        if not sep or not field.strip():
            raise UsageError(f"--set {item!r}: expected FIELD=VALUE, e.g. training.max_steps=500")
        try:
            overrides[field.strip()] = json.loads(text)
        except json.JSONDecodeError:
            overrides[field.strip()] = text
    return overrides


def format_probe(probe: dict[str, Any]) -> str:
    if probe.get("status") != "succeeded":
        return f"probe {probe['id']} {probe.get('status')}: {probe.get('error')}"
    res = probe["result"]

    def lr(value: float | None) -> str:
        return "-" if value is None else f"{value:.3g}"

    lines = [f"probe {probe['id']}: {res['steps_run']} steps, lr {lr(res['lr_min'])} .. {lr(res['lr_max'])}",
             f"steepest descent lr  {lr(res['steepest_lr'])}",
             f"divergence lr        {lr(res['divergence_lr'])}"]
    rec = res.get("recommended")
    if rec:
        lines.append(f"recommended          {rec['field']}={rec['value']:g}  "
                     f"(stabletrain retry {probe['job_id']} --set {rec['field']}={rec['value']:g})")
    else:
        lines.append("recommended          none (no descent found in the range)")
    return "\n".join(lines)


def cmd_probe(client: Client, args: argparse.Namespace) -> int:
    probe = client.probe(args.job, lr_min=args.lr_min, lr_max=args.lr_max, steps=args.steps,
                         timeout=args.probe_timeout)
    if _json_mode(args):
        _print_json(probe)
    else:
        _out(format_probe(probe))
    return EXIT_OK if probe.get("status") == "succeeded" else EXIT_FAILED


def cmd_retry(client: Client, args: argparse.Namespace) -> int:
    overrides = _parse_sets(args.set)
    if args.apply is None and not overrides:
        raise UsageError("nothing to change: pass --apply (all recommendations), --apply KIND ..., or --set")
    # bare --apply: every recommendation; --apply KIND...: those findings'; no --apply: overrides only
    apply: str | list[str] = "recommendations" if args.apply == [] else list(args.apply or [])
    job = client.retry(args.job, apply=apply, overrides=overrides, idempotency_key=args.idempotency_key)
    if _json_mode(args) and not args.wait:
        _print_json(job)
        return EXIT_OK
    if not _json_mode(args):
        _out(f"retried {args.job} as {job['id']} ({job.get('status')})")
        _out(format_patch(job))
    return wait_and_report(client, job, args) if args.wait else EXIT_OK


def cmd_wait(client: Client, args: argparse.Namespace) -> int:
    return wait_and_report(client, client.job(args.job), args)


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    job = client.job(args.job)
    if _json_mode(args):
        _print_json(job)
    else:
        _out(format_job(job))
    return EXIT_OK


def cmd_jobs(client: Client, args: argparse.Namespace) -> int:
    items = client.jobs(status=args.status)
    if args.limit:
        items = (j for _, j in zip(range(args.limit), items, strict=False))
    if _json_mode(args):
        _print_json(list(items))
        return EXIT_OK
    for j in items:
        _out(f"{j['id']}  {j.get('status', '-'):<10}  {_step_line(j):<16}  {j.get('health') or '-':<8}  "
             f"{j.get('created_at', '-')}  {j.get('name') or '-'}")
    return EXIT_OK


def cmd_pause(client: Client, args: argparse.Namespace) -> int:
    job = client.pause(args.job)
    if _json_mode(args):
        _print_json(job)
    elif job.get("status") == "paused":
        _out(f"{job['id']} paused at {_step_line(job)}")
    else:
        _out(f"{job['id']} {job.get('status')}: pauses at its next step (with a checkpoint)")
    return EXIT_OK


def cmd_resume(client: Client, args: argparse.Namespace) -> int:
    job = client.resume(args.job)
    if _json_mode(args):
        _print_json(job)
    else:
        _out(f"{job['id']} {job.get('status')}: continues from its newest checkpoint")
    return EXIT_OK


def cmd_cancel(client: Client, args: argparse.Namespace) -> int:
    job = client.cancel(args.job)
    if _json_mode(args):
        _print_json(job)
    elif job.get("status") == "cancelled":
        _out(f"{job['id']} cancelled")
    else:
        _out(f"{job['id']} {job.get('status')}: stops at its next step (with a final checkpoint)")
    return EXIT_OK


# The API's event types (app.models.WEBHOOK_EVENTS; a test keeps the two equal).
WEBHOOK_EVENTS = ("job.queued", "job.running", "job.succeeded", "job.failed", "job.cancelled", "job.paused",
                  "job.health_changed", "checkpoint.created")


def cmd_webhooks_add(client: Client, args: argparse.Namespace) -> int:
    webhook = client.add_webhook(args.endpoint_url, args.events or list(WEBHOOK_EVENTS))
    if _json_mode(args):
        _print_json(webhook)
    else:
        _out(f"added {webhook['id']}  {webhook['url']}  events: {', '.join(webhook['events'])}")
        _out(f"secret {webhook['secret']}  (shown once: verify each webhook-signature with it)")
    return EXIT_OK


def cmd_webhooks_list(client: Client, args: argparse.Namespace) -> int:
    items = list(client.webhooks())
    if _json_mode(args):
        _print_json(items)
    for w in [] if _json_mode(args) else items:
        disabled = f"  DISABLED: {w['disabled_reason']}" if w.get("disabled_at") else ""
        _out(f"{w['id']}  {w['url']}  {','.join(w.get('events') or [])}  {w.get('created_at', '-')}{disabled}")
    return EXIT_OK


def cmd_webhooks_enable(client: Client, args: argparse.Namespace) -> int:
    webhook = client.enable_webhook(args.webhook)
    if _json_mode(args):
        _print_json(webhook)
    else:
        _out(f"{webhook['id']} enabled: events from now on are sent to {webhook['url']}")
    return EXIT_OK


def cmd_webhooks_rm(client: Client, args: argparse.Namespace) -> int:
    client.delete_webhook(args.webhook)
    if _json_mode(args):
        _print_json({"id": args.webhook, "deleted": True})
    else:
        _out(f"{args.webhook} deleted")
    return EXIT_OK


def format_delivery(d: dict[str, Any]) -> str:
    """One delivery log line: what, how it went, and when the next attempt is due."""
    code = d.get("last_status_code")
    outcome = f"HTTP {code}" if code is not None else (d.get("last_error") or "not tried yet")
    when = f"  next {d['next_attempt_at']}" if d.get("next_attempt_at") else ""
    return (f"{d['id']}  {d['webhook_id']}  {d['event_type']:<19}  {d['status']:<9}  "
            f"attempts {d['attempts']}  {outcome}{when}")


def cmd_webhooks_deliveries(client: Client, args: argparse.Namespace) -> int:
    items = client.webhook_deliveries(args.webhook)
    if args.limit:
        items = (d for _, d in zip(range(args.limit), items, strict=False))
    if _json_mode(args):
        _print_json(list(items))
        return EXIT_OK
    for d in items:
        _out(format_delivery(d))
    return EXIT_OK


def _write_rows(rows: Iterable[dict[str, Any]], fmt: str) -> None:
    out = sys.stdout
    if fmt == "jsonl":
        for row in rows:
            out.write(json.dumps(row) + "\n")
        out.flush()
        return
    writer: csv.DictWriter[str] | None = None
    for row in rows:
        if writer is None:
            writer = csv.DictWriter(out, fieldnames=list(row), extrasaction="ignore", lineterminator="\n")
            writer.writeheader()
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    out.flush()


def cmd_metrics(client: Client, args: argparse.Namespace) -> int:
    if args.layers:
        rows = client.layer_metrics(args.job, after_step=args.after_step, limit=args.limit, layer=args.layer)
    else:
        rows = client.metrics(args.job, after_step=args.after_step, limit=args.limit, max_points=args.max_points)
    _write_rows(rows, args.format)
    return EXIT_OK


def cmd_events(client: Client, args: argparse.Namespace) -> int:
    items = list(client.events(args.job))
    if _json_mode(args):
        _print_json(items)
        return EXIT_OK
    for e in items:
        _out(format_event(e))
    return EXIT_OK


def cmd_diagnose(client: Client, args: argparse.Namespace) -> int:
    diagnosis = client.diagnosis(args.job)
    if _json_mode(args):
        _print_json(diagnosis)
    else:
        _out(f"{diagnosis.get('job_id', args.job)} {diagnosis.get('status', '')}")
        _out(format_diagnosis(diagnosis))
    return EXIT_OK


def cmd_download(client: Client, args: argparse.Namespace) -> int:
    if args.format == "checkpoint":
        path = client.download(args.job, step=args.step, dest=args.output)
        how = "sha256 verified"
    else:
        path = client.export(args.job, args.format, step=args.step, dest=args.output)
        how = "Hugging Face GPT-2 folder as .tar.gz" if args.format == "hf" else "weights only"
    if _json_mode(args):
        _print_json({"path": str(path), "bytes": path.stat().st_size, "format": args.format})
    else:
        _out(f"saved {path} ({path.stat().st_size:,} bytes, {how})")
    return EXIT_OK


def cmd_sample(client: Client, args: argparse.Namespace) -> int:
    sample = client.sample(args.job, args.prompt, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_k=args.top_k, seed=args.seed, step=args.step,
                           timeout=args.sample_timeout)
    if _json_mode(args):
        _print_json(sample)
    elif sample.get("status") == "succeeded":
        _out(sample.get("text") or "")
    else:
        print(f"error: sample {sample.get('id')} failed: {sample.get('error')}", file=sys.stderr)
    return EXIT_OK if sample.get("status") == "succeeded" else EXIT_FAILED


# -- parser ------------------------------------------------------------------------------------

def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _common(suppress: bool) -> argparse.ArgumentParser:
    """Options accepted before or after the command (`stabletrain --json status J` or `... status J --json`)."""
    default = argparse.SUPPRESS if suppress else None
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection and output")
    g.add_argument("--url", default=default, help=f"service URL (env STABLETRAIN_URL, default {DEFAULT_URL})")
    g.add_argument("--key", default=default, help="API key (env STABLETRAIN_API_KEY)")
    g.add_argument("--timeout", type=_positive_float, default=argparse.SUPPRESS if suppress else 30.0,
                   help="per-request timeout in seconds (default 30)")
    g.add_argument("--retries", type=int, default=argparse.SUPPRESS if suppress else 4,
                   help="retries of one request on 429/502/503/504 and connection errors (default 4)")
    g.add_argument("--json", action="store_true", default=argparse.SUPPRESS if suppress else False,
                   help="machine-readable JSON output")
    return p


def _wait_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--poll", type=_positive_float, default=1.0, help="seconds between polls (default 1)")
    p.add_argument("--wait-timeout", metavar="S", type=_positive_float, default=None, help="give up waiting after S seconds")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--cancel-on-interrupt", action="store_true", help="cancel the job on Ctrl-C")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stabletrain", parents=[_common(False)], epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train small text-generation models stably: a client for the StableTrain API.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = [_common(True)]

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, parents=common, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    p = add("upload", "upload a UTF-8 text corpus (FILE, or - for stdin)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--name", help="dataset name (default: the file name)")
    p.set_defaults(func=cmd_upload)

    p = add("datasets", "list datasets")
    p.set_defaults(func=cmd_datasets)

    p = add("submit", "submit a job spec (JSON file, or - for stdin)")
    p.add_argument("spec", metavar="SPEC.json")
    p.add_argument("--dataset", metavar="ID", help="dataset id (overrides the spec's dataset_id)")
    p.add_argument("--name", help="job name (overrides the spec's name)")
    p.add_argument("--idempotency-key", metavar="KEY", help="reuse a key to make resubmitting safe (default: uuid4)")
    p.add_argument("--wait", action="store_true",
                   help="follow the job with a progress bar, print its diagnosis; exit code = outcome")
    p.add_argument("--dry-run", action="store_true",
                   help="validate and estimate (parameters, memory, tokens, FLOPs, wall time); no job is made")
    _wait_options(p)
    p.set_defaults(func=cmd_submit)

    p = add("probe", "LR range test of a job's spec on a worker: curve landmarks and a recommended training.lr")
    p.add_argument("job", metavar="JOB")
    p.add_argument("--lr-min", type=_positive_float, default=None, help="first lr (server default 1e-7)")
    p.add_argument("--lr-max", type=_positive_float, default=None, help="last lr (server default 10)")
    p.add_argument("--steps", type=int, default=None, help="steps at most (server default 200)")
    p.add_argument("--wait-timeout", dest="probe_timeout", metavar="S", type=_positive_float, default=600.0,
                   help="give up waiting for the result after N s (default 600)")
    p.set_defaults(func=cmd_probe)

    p = add("retry", "retry a finished job as a new one with its diagnosis' recommendations applied")
    p.add_argument("job", metavar="JOB")
    p.add_argument("--apply", nargs="*", metavar="KIND", default=None,
                   help="apply the recommendations of every finding, or only of findings of these kinds "
                        "(e.g. --apply vanishing exploding); the most severe finding wins a shared field")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="set a spec field after the recommendations (repeatable; VALUE is JSON or a string), "
                        "e.g. --set training.max_steps=500")
    p.add_argument("--idempotency-key", metavar="KEY", help="reuse a key to make retrying safe (default: uuid4)")
    p.add_argument("--wait", action="store_true",
                   help="follow the new job with a progress bar, print its diagnosis; exit code = outcome")
    _wait_options(p)
    p.set_defaults(func=cmd_retry)

    p = add("wait", "follow a job to its end (progress bar, then diagnosis); exit code = outcome")
    p.add_argument("job", metavar="JOB")
    _wait_options(p)
    p.set_defaults(func=cmd_wait)

    p = add("status", "status, progress, latest metrics and error of a job")
    p.add_argument("job", metavar="JOB")
    p.set_defaults(func=cmd_status)

    p = add("jobs", "list jobs, newest first")
    p.add_argument("--status", choices=["queued", "running", "pausing", "paused", "cancelling", "succeeded",
                                        "failed", "cancelled"])
    p.add_argument("--limit", type=int, default=None, help="show at most N jobs")
    p.set_defaults(func=cmd_jobs)

    p = add("cancel", "cancel a job (queued or paused: at once; running: at its next step)")
    p.add_argument("job", metavar="JOB")
    p.set_defaults(func=cmd_cancel)

    p = add("pause", "pause a job (queued: at once; running: checkpoints at its next step and frees its worker)")
    p.add_argument("job", metavar="JOB")
    p.set_defaults(func=cmd_pause)

    p = add("resume", "queue a paused job again; it continues from its newest checkpoint")
    p.add_argument("job", metavar="JOB")
    p.set_defaults(func=cmd_resume)

    p = add("metrics", "print a job's step metrics (or per-layer stats) as JSON lines or CSV")
    p.add_argument("job", metavar="JOB")
    p.add_argument("--layers", action="store_true", help="per-layer grad norm, weight norm, update ratio")
    p.add_argument("--layer", help="with --layers: only this layer")
    p.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    p.add_argument("--after-step", type=int, default=0)
    p.add_argument("--max-points", type=int, default=None, help="downsample (keeps spikes and NaNs)")
    p.add_argument("--limit", type=int, default=1000, help="rows per page (default 1000)")
    p.set_defaults(func=cmd_metrics)

    p = add("events", "lifecycle and stability events of a job (spikes with the batch rows behind them)")
    p.add_argument("job", metavar="JOB")
    p.set_defaults(func=cmd_events)

    p = add("diagnose", "gradient-health findings and recommended spec changes")
    p.add_argument("job", metavar="JOB")
    p.set_defaults(func=cmd_diagnose)

    p = add("download", "download a checkpoint (newest by default): the full file (sha256-verified), "
                        "a Hugging Face export or the weights only")
    p.add_argument("job", metavar="JOB")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--format", choices=("checkpoint", "hf", "safetensors"), default="checkpoint",
                   help="checkpoint: the .pt file to resume or sample from; hf: a .tar.gz that "
                        "transformers loads (transformer specs of GPT-2 shape); safetensors: weights "
                        "and engine config only (any spec)")
    p.add_argument("-o", "--output", metavar="FILE", default=None,
                   help="file or folder (default ./JOB_step_N.pt, .hf.tar.gz or .safetensors)")
    p.set_defaults(func=cmd_download)

    p = add("sample", "generate text from a job's checkpoint (on a worker)")
    p.add_argument("job", metavar="JOB")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default newest)")
    p.add_argument("--wait-timeout", dest="sample_timeout", metavar="S", type=_positive_float, default=300.0,
                   help="give up waiting for the text after N s (default 300)")
    p.set_defaults(func=cmd_sample)

    p = add("webhooks", "webhook endpoints that receive job events, signed per Standard Webhooks")
    hooks = p.add_subparsers(dest="webhooks_command", required=True, metavar="ACTION")

    def add_action(name: str, help_text: str) -> argparse.ArgumentParser:
        return hooks.add_parser(name, help=help_text, description=help_text, parents=common, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)

    a = add_action("add", "register an endpoint URL (https) for some events; prints its secret once")
    a.add_argument("endpoint_url", metavar="URL")  # not `url`: that is the service's --url
    a.add_argument("--events", nargs="+", choices=WEBHOOK_EVENTS, metavar="EVENT", default=None,
                   help="event types to send (default all): " + ", ".join(WEBHOOK_EVENTS))
    a.set_defaults(func=cmd_webhooks_add)
    a = add_action("list", "list the endpoints of this key")
    a.set_defaults(func=cmd_webhooks_list)
    a = add_action("rm", "delete an endpoint (its undelivered events are dropped)")
    a.add_argument("webhook", metavar="WEBHOOK")
    a.set_defaults(func=cmd_webhooks_rm)
    a = add_action("enable", "send to an endpoint again after its receiver disabled it (410 Gone)")
    a.add_argument("webhook", metavar="WEBHOOK")
    a.set_defaults(func=cmd_webhooks_enable)
    a = add_action("deliveries", "an endpoint's delivery log, newest first: attempts, status codes, next retry")
    a.add_argument("webhook", metavar="WEBHOOK")
    a.add_argument("--limit", type=int, default=None, help="show at most N deliveries")
    a.set_defaults(func=cmd_webhooks_deliveries)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `stabletrain` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        client = Client(url=args.url, key=args.key, timeout=args.timeout, retries=args.retries)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    started = time.monotonic()
    try:
        with client:
            return int(args.func(client, args))
    except ApiError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_REQUEST
    except (ConfigError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConnectionFailed as exc:
        print(f"error: {exc} (is the service running? STABLETRAIN_URL={client.url})", file=sys.stderr)
        return EXIT_REQUEST
    except ChecksumError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REQUEST
    except StableTrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REQUEST
    except KeyboardInterrupt:
        print(f"interrupted after {_duration(time.monotonic() - started)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `stabletrain metrics J | head`: stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

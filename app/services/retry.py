"""Retry a finished job with its diagnosis' recommendations (and explicit overrides) applied.

The child is a normal submission of the patched spec: same validation, limits, dataset lock and
Idempotency-Key handling (jobs.submit_job); it records its parent and the changes it applied.
"""

from __future__ import annotations

import copy
from typing import Any

from flask_smorest import abort
from marshmallow import ValidationError

from app.errors import flatten_messages
from app.models import UNFINISHED_STATUSES, Job
from app.schemas.spec import JobSpecSchema
from app.services import jobs as jobs_service
from app.services.events import diagnosis_view
from worker.engine.config import JobSpec, SpecError, parse_spec, spec_to_dict
from worker.engine.diagnosis.spec import get

APPLY_ALL = "recommendations"

Change = dict[str, Any]  # {"field": dotted path, "value": JSON, "from_finding": kind | None}


def _overlaps(a: str, b: str) -> bool:
    """Two dotted paths name the same field, or one lies inside the other."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _inside(field: str, outer: str) -> bool:
    return field == outer or field.startswith(outer + ".")


def _selected_findings(findings: list[dict[str, Any]], apply: str | list[str], job: Job) -> list[dict[str, Any]]:
    """The findings whose recommendations to apply; 409 when a requested kind is not diagnosed."""
    findings = [f for f in findings if isinstance(f, dict)]
    if apply == APPLY_ALL:
        return findings
    present = [f.get("kind") for f in findings]
    missing = [kind for kind in apply if kind not in present]
    if missing:
        have = ", ".join(str(k) for k in present) or "none"
        abort(409, message=f"Job {job.id}'s diagnosis has no finding of kind {', '.join(missing)} (it has: {have}).",
              details={"apply": missing, "findings": present})
    return [f for f in findings if f.get("kind") in apply]


def recommended_changes(findings: list[dict[str, Any]]) -> list[Change]:
    """The findings' recommendations in order; a field already set (or one overlapping it) is skipped.

    Findings are stored most severe first, so when two recommendations target the same field the
    most severe finding's value wins."""
    changes: list[Change] = []
    for finding in findings:
        for rec in finding.get("recommendations") or []:
            field = rec.get("field") if isinstance(rec, dict) else None
            if not isinstance(field, str) or any(_overlaps(field, c["field"]) for c in changes):
                continue
            changes.append({"field": field, "value": rec.get("value"), "from_finding": finding.get("kind")})
    return changes


def with_overrides(changes: list[Change], overrides: dict[str, Any]) -> list[Change]:
    """Overrides come last, in path order (a JSON object's key order means nothing; sorted, a section
    comes before the fields inside it). A recommendation an override replaces whole is dropped."""
    kept = [c for c in changes if not any(_inside(c["field"], path) for path in overrides)]
    return kept + [{"field": path, "value": overrides[path], "from_finding": None} for path in sorted(overrides)]


def _merged(current: Any, value: Any) -> Any:
    """A dict value merges into a dict section (field "stabilization.clip" value {"mode": ...})."""
    if isinstance(current, dict) and isinstance(value, dict):
        out = dict(current)
        for key, item in value.items():
            out[key] = _merged(out.get(key), item)
        return out
    return copy.deepcopy(value)


def patched_spec(spec: dict[str, Any], changes: list[Change]) -> dict[str, Any]:
    """A copy of spec with each change set at its dotted path; 422 when a path crosses a non-section."""
    out = copy.deepcopy(spec)
    for change in changes:
        *parents, leaf = change["field"].split(".")
        node = out
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                section = ".".join(parents[:depth + 1])
                abort(422, message=f"Validation failed: {change['field']} lies inside {section}, "
                                   "which is not a section.",
                      details={change["field"]: [f"{section} is not a section of the spec"]})
        node[leaf] = _merged(node.get(leaf), change["value"])
    return out


# A patch can leave a field the user never touched invalid (init_std once init is no longer normal,
# a relu activation once arch becomes lstm); at most this many such fields go back to their defaults.
MAX_RESETS = 16
_MISSING = object()


def resets_for(spec: dict[str, Any], changes: list[Change]) -> list[Change]:
    """Fields the changes made invalid go back to their defaults, credited to the change that
    made the switch (the one on the field the engine's message names, else the first); a field the
    patch set itself is left as it is, so a contradictory override still answers 422."""
    patched = [c["field"] for c in changes]
    defaults = spec_to_dict(JobSpec())
    resets: list[Change] = []
    for _ in range(MAX_RESETS):
        try:
            parse_spec(patched_spec(spec, resets))
            return resets
        except SpecError as exc:
            path = exc.path
            default = get(defaults, path, _MISSING)
            if default is _MISSING or any(_overlaps(path, field) for field in patched + [r["field"] for r in resets]):
                return resets  # the user's own value, or no default: validated_spec names it with a 422
            cause = next((c for c in changes if c["field"] in exc.message), changes[0] if changes else None)
            resets.append({"field": path, "value": default, "from_finding": cause and cause["from_finding"]})
    return resets


def validated_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Load the patched spec like a submitted one; 422 with the field paths that fail."""
    try:
        return JobSpecSchema().load(spec)
    except ValidationError as exc:
        details = flatten_messages(exc.messages)
        abort(422, message="Validation failed: the retried spec is invalid: "
                           + "; ".join(f"{path} {' '.join(msgs)}" for path, msgs in details.items()),
              details=details)
        raise  # unreachable


def retry_job(owner_id: str, job_id: str, apply: str | list[str], overrides: dict[str, Any],
              idempotency_key: str | None, body_hash: str | None = None) -> tuple[Job, bool]:
    """Submit the parent's spec with the selected recommendations and the overrides applied;
    returns (child, created). 409 while the parent is live or when it has nothing to apply."""
    parent = jobs_service.get_job(owner_id, job_id)
    existing = jobs_service.find_idempotent(owner_id, idempotency_key, body_hash)
    if existing is not None:
        return existing, False
    if parent.status in UNFINISHED_STATUSES:
        abort(409, message=f"Job {parent.id} is still {parent.status}; retry it once it has finished "
                           "(or cancel it first).", details={"status": parent.status})
    changes: list[Change] = []
    if apply:  # "recommendations" or a non-empty list of kinds; [] applies the overrides only
        findings = diagnosis_view(parent)["findings"]
        changes = recommended_changes(_selected_findings(findings, apply, parent))
        if not changes:
            abort(409, message=f"Job {parent.id} has no recommendations to apply "
                               f"({'no findings' if not findings else 'its findings recommend no change'}).",
                  details={"findings": [f.get("kind") for f in findings]})
    changes = with_overrides(changes, overrides)
    changes += resets_for(patched_spec(parent.spec, changes), changes)
    spec = validated_spec(patched_spec(parent.spec, changes))
    return jobs_service.submit_job(owner_id, spec, idempotency_key, body_hash, parent_id=parent.id,
                                   applied_patch=changes)

"""Property-based fuzzing of the whole /v1 API from its own OpenAPI document (schemathesis + hypothesis).

For every operation and both generation modes (positive: requests the schema allows; negative: requests
it forbids), hypothesis generates requests; about half use the seeded app's real ids in the path (and
POST /v1/jobs often names the real dataset), so handlers run past their 404s. Every schemathesis check
runs on every answer (no 5xx; status, content type, headers and body as documented; schema-valid
requests accepted and schema-invalid ones refused; the key enforced: ignored_auth re-sends the request
without it and with a wrong one), plus error_envelope: every error is JSON in the documented envelope.
"""

from __future__ import annotations

import re
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import hypothesis
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import CHECKS as REGISTERED_CHECKS
from schemathesis.checks import load_all_checks
from schemathesis.core.failures import FailureGroup
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from tests.fuzz.conftest import Seeded

PATH_PARAM = re.compile(r"{(\w+)}")

# A dictionary of values that break things below the schema (drivers, column types, parsers, paths):
# one of them replaces one generated value (a path or query parameter, a JSON leaf or key, the
# Idempotency-Key) in a third of the cases. Schema-driven generation alone rarely produces them.
HOSTILE: list[Any] = [
    "\x00", "a\x00b", "\ud800", "x\udfffy", "é\x00", "../../../../etc/passwd", "..%2F..%2F", "%00", "/etc/passwd",
    "C:\\Windows\\win.ini", "\u202e\u0000", "\U0001f4a5" * 300, "a" * 10_000, "", " ", "null", "NaN",
    2**31, 2**31 - 1, 2**63, 2**63 - 1, 2**64, -(2**63) - 1, 10**30, -1, 1e308, -0.0, 1e-320, True, None,
    [], {}, [[[[[[[[[[[]]]]]]]]]]],
]
# schemathesis encodes URLs, headers and JSON bodies as UTF-8, which cannot carry an unpaired
# surrogate; tests/security/test_named_cases.py sends those as raw JSON escapes instead
UNENCODABLE = re.compile("[\ud800-\udfff]")


class EnvelopeError(AssertionError):
    """A 4xx/5xx response that is not the documented JSON error envelope."""


@schemathesis.check
def error_envelope(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every error is application/json with {"error": {"code": str, "message": str, "details": object}}."""
    if response.status_code < 400:
        return None
    content_type = (response.headers.get("content-type") or [""])[0]
    if not content_type.startswith("application/json"):
        raise EnvelopeError(f"{response.status_code} with content-type {content_type!r}: {response.content[:200]!r}")
    body = response.json()
    error = body.get("error") if isinstance(body, dict) else None
    if not (isinstance(body, dict) and set(body) == {"error"} and isinstance(error, dict)
            and set(error) == {"code", "message", "details"} and isinstance(error["code"], str)
            and isinstance(error["message"], str) and error["message"] and isinstance(error["details"], dict)):
        raise EnvelopeError(f"{response.status_code} body is not the error envelope: {body!r}")
    return None


def _every_check() -> list[Any]:
    """Every check schemathesis has (14 in 4.32: no 5xx; status, content type, headers and body as
    documented; schema-valid requests accepted and schema-invalid ones refused; auth not ignored; Allow
    headers; ...) plus error_envelope above."""
    load_all_checks()
    checks = list(REGISTERED_CHECKS.get_all())
    assert positive_data_acceptance in checks and negative_data_rejection in checks and error_envelope in checks
    return checks


# Schema-valid requests the server refuses on purpose: limits and cross-field rules that OpenAPI cannot
# state. (operation, field, a fragment of the message) -> why.
SEMANTIC_LIMITS: dict[tuple[str, str, str], str] = {
    ("POST /v1/jobs", "model", "parameters; this server allows"): "model size vs STABLETRAIN_MAX_PARAMS",
    ("POST /v1/jobs", "training.warmup_steps", "must not exceed training.max_steps"): "cross-field rule",
    ("POST /v1/jobs", "model.norm", "is only supported for"): "cross-field rule (norm vs arch)",
    # An option set where its arch/scheme/mode never reads it (worker.engine.config.APPLIES_WHEN), and
    # the model checks that tie options to the arch: cross-field rules.
    ("POST /v1/jobs", "*", "only applies when"): "cross-field rule (option vs the field it depends on)",
    ("POST /v1/jobs", "model.activation", "cells have fixed"): "cross-field rule (activation vs arch)",
    ("POST /v1/jobs", "model.activation", "a vanilla rnn supports"): "cross-field rule (activation vs arch)",
    ("POST /v1/jobs", "model.n_heads", "must divide model.d_model"): "cross-field rule",
    ("POST /v1/jobs", "model.tie_embeddings", "needs model.hidden"): "cross-field rule",
    ("POST /v1/jobs", "model.depth_scaled_init", ""): "cross-field rule (arch, residual)",
    ("POST /v1/jobs", "dataset_id", "not found"): "a well-formed id of a dataset that does not exist (or is another key's)",
    ("POST /v1/jobs/{job_id}/probes", "lr_max", "must be greater than lr_min"): "cross-field rule (the sweep rises)",
    ("POST /v1/jobs/{job_id}/samples", "prompt", "NUL characters or unpaired surrogates"):
        "text the model can take: JSON allows lone surrogates and NUL, UTF-8 text does not",
    # A retry's overrides are dotted paths with free values, checked against the patched spec:
    # OpenAPI 3.0 can state neither a pattern for object keys nor the patched spec's rules.
    ("POST /v1/jobs/{job_id}/retry", "*", ""): "overrides are checked against the patched spec",
    ("POST /v1/jobs", "training.seq_len", "on this server"): "STABLETRAIN_MAX_SEQ_LEN, set per deployment",
    ("POST /v1/jobs", "training.max_steps", "on this server"): "STABLETRAIN_MAX_STEPS, set per deployment",
    ("POST /v1/jobs", "resources.devices", "on this server"): "STABLETRAIN_MAX_DEVICES, set per deployment",
    ("POST /v1/jobs", "training.batch_size", "divisible by resources.devices"): "cross-field rule (batch vs devices)",
    ("POST /v1/jobs", "model.norm", "would normalize each device"): "cross-field rule (batchnorm vs devices)",
    ("POST /v1/datasets", "file", "invalid UTF-8"): "a dataset is UTF-8 text; a binary upload may be any bytes",
    # where a host resolves and whether that address is public is no schema matter (docs/contracts.md, Webhooks)
    ("POST /v1/webhooks", "url", ""): "https on a public address, resolved by the server",
}
# Schema-valid requests the server refuses where the OpenAPI document is looser than the server: spec
# gaps owned elsewhere (docs/contracts.md, the lead's list). Delete an entry once its fix is merged.
SPEC_GAPS: dict[tuple[str, str, str], str] = {}
KNOWN_REFUSALS = {**SEMANTIC_LIMITS, **SPEC_GAPS}


def _known_refusal(case: Any, response: Any) -> str | None:
    """The refused fields when every one of them is a KNOWN_REFUSALS entry of this operation, else None."""
    if not 400 <= response.status_code < 500:
        return None
    try:
        details = response.json()["error"]["details"]
        messages = {name: " ".join(map(str, value if isinstance(value, list) else [value]))
                    for name, value in details.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    label = case.operation.label
    known = all(any(op == label and field in (name, "*") and fragment in text
                    for op, field, fragment in KNOWN_REFUSALS)
                for name, text in messages.items())
    return ", ".join(sorted(messages)) if messages and known else None


def _form_field_sent_as_text(case: Any, response: Any) -> str | None:
    """A multipart upload with a valid file and a non-string `name`: on the wire every form field is text,
    so the server gets a valid name (schemathesis counts the request as schema-violating)."""
    body = case.body if isinstance(case.body, dict) else {}
    if (str(case.media_type).startswith("multipart/form-data") and response.status_code < 300
            and set(body) <= {"file", "name"} and isinstance(body.get("file"), (bytes, str))
            and not isinstance(body.get("name", ""), str)):
        return "multipart name sent as text"
    return None


def _excusing(check: Any, excuse: Callable[[Any, Any], str | None], report: FuzzReport) -> Any:
    """`check`, except that a failure `excuse` explains is counted in the report instead of raised."""

    def excused(ctx: Any, response: Any, case: Any) -> bool | None:
        try:
            return check(ctx, response, case)
        except Exception:  # schemathesis raises its own failure types
            why = excuse(case, response)
            if why is None:
                raise
            report.excused[f"{case.operation.label} {why}"] += 1
            return None

    excused.__name__ = check.__name__
    return excused


CHECKS = _every_check()
# Whether a request is schema-valid is known only for what schemathesis generated: a case that got a
# HOSTILE value may have turned valid or invalid, so these two checks skip it (all others still run).
DATA_CHECKS = (positive_data_acceptance, negative_data_rejection)
HOSTILE_CASE_CHECKS = [check for check in CHECKS if check not in DATA_CHECKS]


@dataclass
class FuzzReport:
    """What a run did: requests per operation and status, and the failures found."""

    requests: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    by_operation: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    excused: Counter[str] = field(default_factory=Counter)  # known refusals and schemathesis misreadings

    def summary(self) -> str:
        statuses = ", ".join(f"{code}: {n}" for code, n in sorted(self.by_status.items()))
        known = "; ".join(f"{what}: {n}" for what, n in sorted(self.excused.items()))
        return (f"{self.requests} requests over {len(self.by_operation)} operations; statuses {{{statuses}}}; "
                f"{len(self.failures)} failing operation/mode pairs; excused {{{known}}}")


def _with_real_ids(operation: Any, mode: GenerationMode, ids: dict[str, list[str]]) -> Any:
    names = PATH_PARAM.findall(operation.path)
    generated = operation.as_strategy(generation_mode=mode)
    if not names or not all(name in ids for name in names):
        return generated
    real = st.fixed_dictionaries({name: st.sampled_from(ids[name]) for name in names})
    seeded = real.flatmap(lambda params: operation.as_strategy(generation_mode=mode, path_parameters=params))
    return st.one_of(generated, seeded)


def _real_dataset(case: Any, use: bool, dataset_id: str) -> Any:
    if use and isinstance(case.body, dict) and "dataset_id" in case.body:
        case.body = {**case.body, "dataset_id": dataset_id}
    return case


def _authorized(case: Any, dice: int, auth: dict[str, str]) -> Any:
    """Most cases carry the real key (negative mode drops or spoils the Authorization header); hypothesis
    favours the ends of a range, so the unauthenticated draw is one in the middle."""
    if dice != 5:
        case.headers = {**(case.headers or {}), **auth}
        # the key is the caller's, not generated: ignored_auth then probes the request without it and
        # with a wrong one (both must answer 401) instead of taking it for a generated, invalid one
        case._has_explicit_auth = True
    return case


def _make_check(seeded: Seeded, report: FuzzReport, operation: Any, strategy: Any,
                examples: int, seed: int) -> Callable[[], None]:
    wrapped = {positive_data_acceptance: _excusing(positive_data_acceptance, _known_refusal, report),
               negative_data_rejection: _excusing(negative_data_rejection, _form_field_sent_as_text, report)}
    generated_case_checks = [wrapped.get(check, check) for check in CHECKS]

    @hypothesis.seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
    @given(drawn=strategy)
    def check(drawn: tuple[Any, bool]) -> None:
        case, hostile = drawn
        response = case.call(buffered=True)  # closes streamed file bodies (schemathesis leaves them open)
        report.requests += 1
        report.by_status[response.status_code] += 1
        report.by_operation[operation.label] += 1
        case.validate_response(response, checks=HOSTILE_CASE_CHECKS if hostile else generated_case_checks)

    return check


def _slots(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths of every leaf and every key in JSON-like data (a key slot ends with a `None` marker)."""
    if isinstance(value, dict):
        out: list[tuple[Any, ...]] = []
        for key, child in value.items():
            out.append((*path, key, None))
            out.extend(_slots(child, (*path, key)))
        return out or [path]
    if isinstance(value, list):
        return [p for i, child in enumerate(value) for p in _slots(child, (*path, i))] or [path]
    return [path]


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    if path[-1] is None and len(path) >= 2 and isinstance(value, dict) and len(path) == 2:
        return {(str(new) if k == path[0] else k): v for k, v in value.items()}
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {k: (_replace(v, rest, new) if k == head else v) for k, v in value.items()}
    if isinstance(value, list):
        return [(_replace(v, rest, new) if i == head else v) for i, v in enumerate(value)]
    return value


def _hostile(case: Any, choice: int, value: Any, slot: int) -> tuple[Any, bool]:
    """In a third of the cases, put one HOSTILE value into one slot of the request; (case, whether it did)."""
    if choice % 3:
        return case, False
    slots: list[tuple[str, Any]] = [("path", k) for k in case.path_parameters or {}]
    slots += [("query", k) for k in case.query or {}]
    if isinstance(case.body, (dict, list)):
        slots += [("body", p) for p in _slots(case.body)]
    if case.operation.method.upper() == "POST":
        slots.append(("header", "Idempotency-Key"))
    if not slots:
        return case, False
    where, key = slots[slot % len(slots)]
    if isinstance(value, str):
        value = UNENCODABLE.sub("?", value)
    if where == "body":
        case.body = _replace(case.body, key, value)
        return case, True
    text = "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    if where == "path":  # schemathesis sends path parameters as given: quote them like a client would
        case.path_parameters = {**case.path_parameters, key: quote(text, safe="") or "x"}
    elif where == "query":
        case.query = {**case.query, key: text}
    elif text and text == text.strip() and text.isascii() and text.isprintable():
        case.headers = {**(case.headers or {}), key: text[:500]}
    else:
        return case, False
    return case, True


def run_fuzz(seeded: Seeded, examples: int, seed: int = 0,
             log: Callable[[str], None] = lambda _line: None) -> FuzzReport:
    """Fuzz every operation in both modes with `examples` generated requests each (hypothesis may stop
    early when an operation has fewer distinct inputs)."""
    schema = schemathesis.openapi.from_wsgi("/v1/openapi.json", seeded.app)
    report = FuzzReport()
    dataset_id = seeded.ids["dataset_id"][0]
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = _with_real_ids(operation, mode, seeded.ids)
            # the real dataset would mend a negative case whose one invalid part is the dataset id
            if operation.method.upper() == "POST" and operation.path == "/v1/jobs" and mode.is_positive:
                strategy = st.tuples(strategy, st.booleans()).map(lambda t: _real_dataset(t[0], t[1], dataset_id))
            strategy = st.tuples(strategy, st.integers(0, 9)).map(lambda t: _authorized(t[0], t[1], seeded.auth))
            strategy = st.tuples(strategy, st.integers(0, 2), st.sampled_from(HOSTILE), st.integers(0, 50)).map(
                lambda t: _hostile(*t))

            check = _make_check(seeded, report, operation, strategy, examples, seed)
            label = f"{operation.label} [{mode.value}]"
            try:
                check()
            except (Exception, FailureGroup) as exc:  # collect and go on: report every failing operation
                if "Cannot generate" in str(exc) or type(exc).__name__ == "Unsatisfiable":
                    log(f"skip {label}: {str(exc).splitlines()[0]}")
                    continue
                report.failures.append(f"{label}: {''.join(traceback.format_exception_only(exc)).strip()}")
                log(f"FAIL {label}")
            else:
                log(f"ok   {label}")
    return report

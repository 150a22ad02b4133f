"""Recommendations that fit the run's spec: valid, and never what is already set.

A recommendation is `{field, value, why}` where `field` is a spec path and
`value` a valid value for it, so a client can apply it mechanically. The spec
is read with its defaults filled in (the parsed form), so "already set" also
covers values the user left at their default.
"""

from __future__ import annotations

import copy
import functools
import json
from typing import Any

from ..config import APPLIES_WHEN, JobSpec, SpecError, parse_spec, spec_to_dict
from .stats import finite

Rec = dict[str, Any]
RECURRENT = ("rnn", "gru", "lstm")
RELU_FAMILY = ("relu", "leaky_relu", "gelu", "silu", "elu")


def full_spec(spec: dict[str, Any] | None) -> dict[str, Any]:
    """The spec with every default filled in; the raw dict when it does not parse (e.g. a partial test spec)."""
    try:
        key = json.dumps(spec or {}, sort_keys=True)
    except (TypeError, ValueError):  # not JSON (a test's odd value): parse it uncached
        return _parsed_or_raw(spec or {})
    # A run's live diagnosis asks for the same spec every time: parse it once.
    return copy.deepcopy(_full_spec_of_json(key))


@functools.lru_cache(maxsize=64)
def _full_spec_of_json(key: str) -> dict[str, Any]:
    return _parsed_or_raw(json.loads(key))


def _parsed_or_raw(spec: dict[str, Any]) -> dict[str, Any]:
    try:
        return spec_to_dict(parse_spec(copy.deepcopy(spec)))
    except (SpecError, TypeError):
        return copy.deepcopy(spec)


def get(spec: dict[str, Any], path: str, default: Any = None) -> Any:
    """Value at a dotted path, or default."""
    node: Any = spec
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def rec(field: str, value: Any, why: str) -> Rec:
    """One recommendation."""
    return {"field": field, "value": value, "why": why}


def apply(spec: dict[str, Any], recs: list[Rec]) -> dict[str, Any]:
    """A copy of the spec with the recommendations applied; a dict value merges into a dict section
    (as the retry route applies them: {"mode": "norm", "max_norm": 1} keeps the section's other keys)."""
    out = copy.deepcopy(spec)
    for r in recs:
        node = out
        *parents, leaf = r["field"].split(".")
        for part in parents:
            node = node.setdefault(part, {})
        if isinstance(node.get(leaf), dict) and isinstance(r["value"], dict):
            node[leaf] = {**node[leaf], **copy.deepcopy(r["value"])}
        else:
            node[leaf] = copy.deepcopy(r["value"])
    return out


def already_set(spec: dict[str, Any], r: Rec) -> bool:
    """True when applying `r` changes nothing (for a section value: every key it names already has that value)."""
    current = get(spec, r["field"])
    if isinstance(r["value"], dict) and isinstance(current, dict):
        return all(_same(current.get(k), v) for k, v in r["value"].items())
    return _same(current, r["value"])


def _same(a: Any, b: Any) -> bool:
    if finite(a) and finite(b):
        return abs(a - b) <= 1e-12 * max(abs(a), abs(b), 1.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _parses(spec: dict[str, Any]) -> bool:
    try:
        parse_spec(spec)
    except (SpecError, TypeError):
        return False
    return True


def _default(path: str) -> Any:
    return get(spec_to_dict(JobSpec()), path)


def _with_resets(spec: dict[str, Any], kept: list[Rec], r: Rec) -> list[Rec] | None:
    """`r`, plus the options it leaves unread put back to their defaults; None when it cannot be valid.

    The spec refuses an option set where nothing reads it (config.APPLIES_WHEN): a switch from
    init "normal" to "kaiming_normal" needs init_std back at its default. Inside a section value
    (stabilization.clip) the reset joins the value, so one field still carries the whole change.
    """
    resets: list[Rec] = []
    for _ in range(8):
        try:
            parse_spec(apply(spec, [*kept, *resets, r]))
            return [*resets, r]
        except (SpecError, TypeError) as exc:
            path = getattr(exc, "path", "")
            if path not in APPLIES_WHEN or path == r["field"] or any(x["field"] == path for x in [*kept, *resets]):
                return None  # not a leftover option, or one an earlier recommendation sets: an alternative
            if isinstance(r["value"], dict) and path.startswith(r["field"] + "."):
                r = {**r, "value": {**r["value"], path.removeprefix(r["field"] + "."): _default(path)}}
            else:
                resets.append(rec(path, _default(path), f"back to its default: nothing reads it once "
                                                        f"{r['field']} is {r['value']}"))
    return None


def fitting(spec: dict[str, Any], recs: list[Rec]) -> list[Rec]:
    """The recommendations that change the spec and keep it valid, in order: each one applied after
    those before it (and so all of them together) gives a spec that parse_spec accepts.

    The first recommendation per field wins; one that would make the spec invalid (e.g. batchnorm
    for a transformer) is dropped rather than shown.
    """
    can_check = _parses(spec)
    kept: list[Rec] = []
    for r in recs:
        if any(k["field"] == r["field"] for k in kept) or already_set(spec, r):
            continue
        if not can_check:
            kept.append(r)
            continue
        valid = _with_resets(spec, kept, r)
        if valid is not None:
            kept += valid
    return kept


def round_sig(x: float, digits: int = 2) -> float:
    """x rounded to `digits` significant digits (spec values users read)."""
    return float(f"{x:.{digits}g}")


def lower_lr(spec: dict[str, Any], factor: float, why: str) -> Rec:
    """training.lr times factor (< 1)."""
    return rec("training.lr", round_sig(get(spec, "training.lr", 1e-3) * factor), why)


def longer_warmup(spec: dict[str, Any], why: str) -> Rec:
    """training.warmup_steps: twice the current, at least 5% of the run, never past max_steps."""
    max_steps = get(spec, "training.max_steps", 200)
    current = get(spec, "training.warmup_steps", 0) or 0
    return rec("training.warmup_steps", min(max_steps, max(2 * current, max_steps // 20, 1)), why)


def norm_for(spec: dict[str, Any]) -> str:
    """The normalization the architecture supports best (batchnorm is mlp-only)."""
    return "batchnorm" if get(spec, "model.arch") == "mlp" else "layernorm"


def add_norm(spec: dict[str, Any], why: str) -> list[Rec]:
    """model.norm when the net has none."""
    return [rec("model.norm", norm_for(spec), why)] if get(spec, "model.norm", "none") == "none" else []


def init_for_activation(spec: dict[str, Any]) -> list[Rec]:
    """The init matched to the activation: He for the ReLU family, Xavier for tanh; none for sigmoid.

    Xavier assumes an activation that is linear around 0 with slope 1; sigmoid's slope is
    0.25 and its output is not centred, so no init rescues a deep sigmoid stack.
    """
    activation = get(spec, "model.activation")
    init = get(spec, "model.init")
    if activation in RELU_FAMILY and init not in ("kaiming_normal", "kaiming_uniform"):
        return [rec("model.init", "kaiming_normal", "He init keeps the signal's variance constant through ReLU-family layers")]
    if activation == "tanh" and init not in ("xavier_normal", "xavier_uniform", "orthogonal"):
        return [rec("model.init", "xavier_normal",
                    "Xavier init (with tanh's gain 5/3) keeps the variance constant through tanh layers")]
    return []


def to_relu(spec: dict[str, Any], why: str) -> list[Rec]:
    """Switch a saturating activation to ReLU with He init (valid for mlp, transformer and rnn)."""
    if get(spec, "model.arch") in ("gru", "lstm"):
        return []  # gated cells' activations are fixed; model.activation does not apply
    return [rec("model.activation", "relu", why),
            rec("model.init", "kaiming_normal", "He init is the one matched to ReLU")]


def clip_norm(spec: dict[str, Any], max_norm: float, why: str) -> list[Rec]:
    """A fixed global-norm threshold, unless one at least as tight is already set."""
    clip = get(spec, "stabilization.clip") or {}
    if clip.get("mode") == "norm" and finite(clip.get("max_norm")) and clip["max_norm"] <= max_norm:
        return []
    return [rec("stabilization.clip", {"mode": "norm", "max_norm": round_sig(max_norm)}, why)]

"""The finding shape, health and the run inputs every detector reads."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from .spec import Rec, fitting
from .stats import finite

Finding = dict[str, Any]
SEVERITIES = ("critical", "warning", "info")
# A job's health from its findings: the worst severity wins; info alone is still ok.
HEALTH_OF_SEVERITY = {"critical": "critical", "warning": "warning", "info": "ok"}


def health_of(findings: list[Finding] | None) -> str:
    """The job's health: "critical", "warning" or "ok" (info findings or none)."""
    severities = {f.get("severity") for f in findings or [] if isinstance(f, dict)}
    for severity in SEVERITIES:
        if severity in severities:
            return HEALTH_OF_SEVERITY[severity]
    return "ok"


@dataclass
class Run:
    """What a diagnosis looks at: step rows, layer rows, events, activation rows and the full spec."""

    steps: list[dict[str, Any]]
    layers: list[dict[str, Any]]
    events: list[dict[str, Any]]
    activations: list[dict[str, Any]]
    spec: dict[str, Any]
    found: dict[str, Finding] = field(default_factory=dict)  # findings so far, by kind
    _series: dict[tuple[str, bool], list[tuple[int, float]]] = field(default_factory=dict)
    # results detectors share within one diagnosis (e.g. the loss trend over a window many sites have)
    memo: dict[Any, Any] = field(default_factory=dict)

    def series(self, key: str, *, trained_only: bool = False) -> list[tuple[int, float]]:
        """(step, value) of a step-row key where finite; trained_only leaves out skipped steps (cached)."""
        if (key, trained_only) not in self._series:
            self._series[key, trained_only] = [(int(r["step"]), float(r[key])) for r in self.steps
                                               if finite(r.get(key)) and not (trained_only and r.get("skipped"))]
        return self._series[key, trained_only]

    def events_of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("kind") == kind]

    def sites(self, key: str) -> dict[str, list[tuple[int, float]]]:
        """Per activation site, (step, value) of a key where finite, in record order."""
        out: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for row in self.activations:
            if finite(row.get(key)):
                out[row["site"]].append((int(row.get("step") or 0), float(row[key])))
        return dict(out)

    def site_kinds(self) -> dict[str, str]:
        return {row["site"]: row.get("kind", "") for row in self.activations}


def finding(run: Run, kind: str, severity: str, summary: str, steps: list[int], layers: list[str],
            evidence: dict[str, Any], recommendations: list[Rec]) -> Finding:
    """A finding whose recommendations fit the run's spec; steps.first is when the problem started."""
    return {
        "kind": kind,
        "severity": severity,
        "summary": summary,
        "steps": {"first": min(steps), "last": max(steps)} if steps else None,
        "layers": layers,
        "evidence": evidence,
        "recommendations": fitting(run.spec, recommendations),
    }


def late_half(points: list[tuple[int, float]]) -> list[float]:
    """Values of the later half of a series (at least one): what a site looks like now, not at init."""
    return [v for _, v in points[len(points) // 2:]] or [v for _, v in points]


def first_step_over(points: list[tuple[int, float]], threshold: float) -> int | None:
    """Step of the first value >= threshold."""
    return next((s for s, v in points if v >= threshold), None)

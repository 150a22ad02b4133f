"""Strict JSON fields: no string-to-number or number-to-bool coercion (mirrors the engine)."""

from __future__ import annotations

import math
from typing import Any

from marshmallow import fields

# Largest value of an Integer column (PostgreSQL int4): steps, event ids and the ints compared with them
DB_INT_MAX = 2**31 - 1
# Largest integer a spec may hold: JSON readers (orjson, JavaScript BigInt-free clients, torch) need int64
INT64_MAX = 2**63 - 1


class StrictInteger(fields.Integer):
    """A JSON integer that fits in 64 bits; booleans, floats and strings are rejected."""

    default_error_messages = {"too_large": "Number too large: at most 2**63 - 1 in magnitude."}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(strict=True, **kwargs)

    def _validated(self, value: Any) -> int:
        if isinstance(value, bool):
            raise self.make_error("invalid")
        number = super()._validated(value)
        if not -INT64_MAX <= number <= INT64_MAX:
            raise self.make_error("too_large")
        return number


class StrictFloat(fields.Float):
    """A finite JSON number (ints allowed); strings and booleans are rejected."""

    def __init__(self, allow_inf: bool = False, **kwargs: Any) -> None:
        self.allow_inf = allow_inf
        super().__init__(allow_nan=allow_inf, **kwargs)

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.make_error("invalid")
        if math.isnan(value) or (math.isinf(value) and not self.allow_inf):
            raise self.make_error("special")
        return float(value)


class StrictBoolean(fields.Boolean):
    """A JSON true/false only."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value

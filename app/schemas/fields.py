"""Strict JSON fields: no string-to-number or number-to-bool coercion (mirrors the engine)."""

from __future__ import annotations

import math
from typing import Any

from marshmallow import fields


class StrictInteger(fields.Integer):
    """A JSON integer; booleans, floats and strings are rejected."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(strict=True, **kwargs)

    def _validated(self, value: Any) -> int:
        if isinstance(value, bool):
            raise self.make_error("invalid")
        return super()._validated(value)


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

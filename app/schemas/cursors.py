"""The `cursor` query parameter of the keyset-paged job listings (see app.services.cursors)."""

from __future__ import annotations

import re

from marshmallow import ValidationError, fields
from marshmallow.validate import Length, Validator

from app.services import cursors


class CursorShape(Validator):
    """Accepts exactly the strings that match the listing's documented pattern (whole string)."""

    def __init__(self, listing: str) -> None:
        self.listing = listing
        self.regex = re.compile(cursors.PATTERNS[listing])  # apispec documents it as the `pattern`

    def __call__(self, value: str) -> str:
        if not cursors.matches(self.listing, value):
            raise ValidationError(f"Not a cursor of this listing: pass back the `next_cursor` of a previous page "
                                  f"unchanged (pattern {self.regex.pattern}).")
        return value


def cursor_field(listing: str, start_param: str | None = None) -> fields.String:
    """Optional `cursor`: the previous page's next_cursor; the page starts right after that row."""
    both = (f" With `{start_param}` too, both bounds apply (the page starts after the later of the two)."
            if start_param else "")
    return fields.String(load_default=None, validate=[Length(2, cursors.MAX_LENGTH), CursorShape(listing)],
                         metadata={"description": (
                             "Opaque: the `next_cursor` of the previous page, passed back unchanged; the page "
                             "starts right after the last row of that page." + both)})

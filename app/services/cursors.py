"""Keyset cursors of the paged job listings (step, layer and activation metrics, events).

A cursor holds the full sort key of the last row of a page, so the next page starts right after that row
even when the page ended inside a step (several layer rows share a step). Clients treat it as opaque
and pass `next_cursor` back as `?cursor=`.

Every string that matches a listing's documented pattern (`PATTERNS`, also the OpenAPI `pattern`) is a
cursor the server accepts, and nothing else is: a 422 for a malformed cursor is then always the client's
fault, and a fuzzer that generates from the document never sees a documented value refused. That is why
the format is a prefix, decimal integers and unpadded urlsafe base64 of the name rather than base64 of
JSON (not every base64 string is JSON, so a pattern could not say which ones are accepted):

    steps        s<step>                      s120
    events       e<id>                        e42
    layers       l<step>.<position|n>.<b64>   l120.3.aGVhZC53ZWlnaHQ   (n: a row recorded without position)
    activations  a<step>.<position>.<b64>     a120.3.aGVhZA
    newest       n<created_at in µs>.<id>     n1764748800000000.job_0123456789abcdef01234567
                 (the newest-first listings of jobs and datasets: keyset on (created_at, id))

A hand-made cursor that matches decodes to some key and the page starts after it (names that are not UTF-8
are decoded with replacement characters; a NUL becomes one too, as no stored name can hold it).
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

_INT = r"[0-9]{1,10}"
_B64 = r"(?:[A-Za-z0-9_-]{4})*(?:[A-Za-z0-9_-]{2,3})?"
# app.models.ID_PATTERN (not imported: the schemas load this module before the models exist; a test keeps
# the two the same)
SERVER_ID = r"(?:key|ds|job|smp|prb|wh|msg|dlv)_[0-9a-f]{24}"
PATTERNS = {
    "steps": rf"^s{_INT}$",
    "events": rf"^e{_INT}$",
    "layers": rf"^l{_INT}\.(?:n|{_INT})\.{_B64}$",
    "activations": rf"^a{_INT}\.{_INT}\.{_B64}$",
    # 17 digits of microseconds reach year 5138, inside what datetime can hold
    "newest": rf"^n[0-9]{{1,17}}\.{SERVER_ID}$",
}
# names are at most 200 characters (4 UTF-8 bytes each at worst): 1068 base64 characters plus the numbers
MAX_LENGTH = 1100
PREFIX = {"steps": "s", "events": "e", "layers": "l", "activations": "a", "newest": "n"}
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True)
class RowKey:
    """Sort key of a row: (step, position, name) for layer and activation rows; (number,) otherwise."""

    number: int
    position: int | None = None
    name: str = ""


def _b64(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode("utf-8")).decode("ascii").rstrip("=")


def _unb64(text: str) -> str:
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    return raw.decode("utf-8", errors="replace").replace("\x00", "\ufffd")


def encode(listing: str, key: RowKey) -> str:
    """The cursor of the row with this key in `listing` (one of PATTERNS)."""
    prefix = PREFIX[listing]
    if listing in ("steps", "events"):
        return f"{prefix}{key.number}"
    position = "n" if key.position is None else str(key.position)
    return f"{prefix}{key.number}.{position}.{_b64(key.name)}"


def matches(listing: str, cursor: str) -> bool:
    """True when `cursor` has the documented shape (the OpenAPI pattern, read as ECMAScript does: whole string)."""
    return len(cursor) <= MAX_LENGTH and re.fullmatch(PATTERNS[listing], cursor) is not None


def decode(listing: str, cursor: str) -> RowKey:
    """The key a cursor of `listing` holds; ValueError when it does not match the listing's pattern."""
    if not matches(listing, cursor):
        raise ValueError(f"not a {listing} cursor")
    body = cursor[1:]
    if listing in ("steps", "events"):
        return RowKey(int(body))
    number, position, name = body.split(".", 2)
    return RowKey(int(number), None if position == "n" else int(position), _unb64(name))


def encode_newest(created_at: datetime, record_id: str) -> str:
    """Cursor of a row of a newest-first listing: its created_at (UTC microseconds) and id."""
    stamp = created_at if created_at.tzinfo else created_at.replace(tzinfo=timezone.utc)
    return f"n{(stamp - _EPOCH) // _MICROSECOND}.{record_id}"


def decode_newest(cursor: str) -> tuple[datetime, str]:
    """(created_at, id) of a newest-first cursor; ValueError when it does not match the pattern."""
    if not matches("newest", cursor):
        raise ValueError("not a newest-first cursor")
    micros, record_id = cursor[1:].split(".", 1)
    return _EPOCH + int(micros) * _MICROSECOND, record_id

"""Cursor pagination of the list routes (docs/api.md, "Pagination").

A list route answers a JSON list of at most ``limit`` items (default 100, at most 1000). When more follow, the
answer carries the cursor of the next page in ``X-Next-Cursor`` and as a ``Link: <...>; rel="next"`` URL; the
body stays a plain list, so a client that reads one page reads what it always did. A cursor is opaque to clients:
base64url of the sort key of the page's last item (keyset pagination: a page costs an index range scan, however
deep it is), or for the lists built in memory, its position and identity.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Query, Request, Response
from sqlalchemy import ColumnElement, and_, or_

from edgefleet.errors import UsageError

__all__ = ["LIMIT_DEFAULT", "LIMIT_MAX", "PAGED", "Page", "PageQuery", "after", "finish", "in_memory"]

T = TypeVar("T")

LIMIT_DEFAULT = 100
LIMIT_MAX = 1000

PAGED: dict[str, Any] = {
    "responses": {
        200: {
            "headers": {
                "X-Next-Cursor": {
                    "description": "the cursor of the next page (pass it as `cursor`); absent on the last page",
                    "schema": {"type": "string"},
                },
                "Link": {
                    "description": 'the next page as `<URL>; rel="next"`; absent on the last page',
                    "schema": {"type": "string"},
                },
            }
        }
    }
}

_BAD = "cursor is not one this server gave out: pass the X-Next-Cursor of the previous page, or start without one"


def _encode(key: Sequence[Any]) -> str:
    items = [{"t": v.isoformat()} if isinstance(v, datetime) else v for v in key]
    raw = json.dumps(items, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode(cursor: str) -> list[Any]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        items = json.loads(raw)
        if not isinstance(items, list):
            raise ValueError
        return [datetime.fromisoformat(v["t"]) if isinstance(v, dict) and set(v) == {"t"} else v for v in items]
    except (ValueError, binascii.Error, TypeError, KeyError):
        raise UsageError(_BAD) from None


@dataclass(frozen=True)
class PageQuery:
    limit: int
    cursor: list[Any] | None

    def key(self, *types: type) -> list[Any] | None:
        """The previous page's last sort key, checked against the types of the route's sort columns."""
        if self.cursor is None:
            return None
        if len(self.cursor) != len(types) or not all(
            isinstance(v, tp) and not (tp is int and isinstance(v, bool))
            for v, tp in zip(self.cursor, types, strict=True)
        ):
            raise UsageError(_BAD)
        return self.cursor


def _page_query(
    limit: int = Query(LIMIT_DEFAULT, ge=1, le=LIMIT_MAX, description="items per page"),
    cursor: str | None = Query(
        None, max_length=2048, description="the X-Next-Cursor of the previous page; none for the first page"
    ),
) -> PageQuery:
    return PageQuery(limit, None if cursor is None else _decode(cursor))


Page = Annotated[PageQuery, Depends(_page_query)]


def after(cols: Sequence[Any], values: Sequence[Any], *, desc: bool = False) -> ColumnElement[bool]:
    """Rows past ``values`` in the order of ``cols`` (all ascending, or all descending): the row-value comparison
    ``(a, b) > (x, y)`` spelled out, so each value binds with its column's type on SQLite and PostgreSQL alike."""
    terms = []
    for i, col in enumerate(cols):
        same = [cols[j] == values[j] for j in range(i)]
        terms.append(and_(*same, col < values[i] if desc else col > values[i]))
    return or_(*terms)


def finish(
    request: Request, response: Response, page: PageQuery, rows: list[T], key: Callable[[T], Sequence[Any]]
) -> list[T]:
    """``rows``: up to ``limit + 1`` fetched in order; keeps ``limit`` and sets the next-page headers if more
    followed."""
    if len(rows) <= page.limit:
        return rows
    rows = rows[: page.limit]
    _next(request, response, page, _encode(key(rows[-1])))
    return rows


def in_memory(
    request: Request, response: Response, page: PageQuery, items: list[T], ident: Callable[[T], Sequence[Any]]
) -> list[T]:
    """Page a list built in memory (a catalogue, not the fleet): the cursor holds the position after the page and
    the identity of its last item, so a page goes on after that item even if items before it came or went."""
    start = 0
    got = page.key(int, list)
    if got is not None:
        pos, last = got
        ids = [list(ident(x)) for x in items]
        if 0 < pos <= len(items) and ids[pos - 1] == last:
            start = pos
        else:
            start = next((i + 1 for i, x in enumerate(ids) if x == last), min(max(pos, 0), len(items)))
    out = items[start : start + page.limit]
    if start + page.limit < len(items):
        _next(request, response, page, _encode([start + page.limit, list(ident(out[-1]))]))
    return out


def _next(request: Request, response: Response, page: PageQuery, cursor: str) -> None:
    response.headers["X-Next-Cursor"] = cursor
    # a relative reference (RFC 8288): right behind any proxy, whatever host name the client used
    url = request.url.include_query_params(cursor=cursor, limit=page.limit)
    response.headers["Link"] = f'<{url.path}?{url.query}>; rel="next"'

"""ngclient (the TUF client) is synchronous and runs in a worker thread; a transport injected into the agent is
asynchronous and bound to the agent's event loop. :class:`LoopFetcher` joins the two: each metadata request runs on
the loop, through the agent's client and so through its transport, while the thread waits for it. Imported only
when an update runs with an injected transport (TUF is resident memory a device pays for)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

import httpx
from tuf.api import exceptions as tuf_exc
from tuf.ngclient import FetcherInterface

__all__ = ["LoopFetcher"]

T = TypeVar("T")
_CHUNK = 1 << 16


class LoopFetcher(FetcherInterface):
    """ngclient's fetcher over ``http`` (an async client) on ``loop``. Call it from a thread other than the
    loop's (the agent runs ngclient in an executor); the loop must keep running meanwhile."""

    def __init__(self, http: httpx.AsyncClient, loop: asyncio.AbstractEventLoop) -> None:
        self._http = http
        self._loop = loop

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            r = self._run(self._http.send(self._http.build_request("GET", url), stream=True))
        except httpx.TimeoutException as err:
            raise tuf_exc.SlowRetrievalError(f"{url}: {err}") from err
        except httpx.HTTPError as err:
            raise tuf_exc.DownloadError(f"{url}: {type(err).__name__}: {err}") from err
        if r.status_code >= 400:
            self._run(r.aclose())
            raise tuf_exc.DownloadHTTPError(f"HTTP {r.status_code} for {url}", r.status_code)
        return self._chunks(url, r)

    def _chunks(self, url: str, r: httpx.Response) -> Iterator[bytes]:
        # ngclient stops reading past its length limit: the body is pulled chunk by chunk, never read whole
        body = r.aiter_bytes(_CHUNK)
        try:
            while (chunk := self._run(_next(body))) is not None:
                yield chunk
        except httpx.TimeoutException as err:
            raise tuf_exc.SlowRetrievalError(f"{url}: {err}") from err
        except httpx.HTTPError as err:
            raise tuf_exc.DownloadError(f"{url}: {type(err).__name__}: {err}") from err
        finally:
            self._run(r.aclose())


async def _next(body: AsyncIterator[bytes]) -> bytes | None:
    """The next chunk, None at the end (StopAsyncIteration does not cross a thread's future well)."""
    try:
        return await body.__anext__()
    except StopAsyncIteration:
        return None

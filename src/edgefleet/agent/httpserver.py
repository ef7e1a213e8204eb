"""A small HTTP/1.1 server for the local inference API: ``httptools`` (llhttp) parses, one asyncio protocol per
connection answers, each response leaves in **one** write on a TCP_NODELAY socket (ADR 0031).

Why not uvicorn: an ASGI server writes the status line and headers, then the body, in two writes, and runs
a task per request; on the infer hot path those cost more than the agent's own work. Here a request is parsed
in ``data_received`` and handed to a plain callback handler, which answers (now, or later from the worker
connection's callback) through ``respond``. Keep-alive, pipelining (answers stay in request order), chunked
request bodies, ``Expect: 100-continue``, a body size cap and back-pressure are handled; anything malformed is
a 400 with ``{"error": ...}`` and the connection closes.

:class:`HTTPProtocol` needs only a transport's ``write``/``close``/``is_closing``/``pause_reading``/
``resume_reading``/``get_extra_info``, so the inference worker runs it in its own small selectors loop
(``workerhttp.py``) without importing asyncio (ADR 0032). :class:`HTTPServer` accepts by itself rather than
through ``asyncio.Server`` so that it can stop and resume accepting on a listening socket it shares with the
worker (:meth:`HTTPServer.delegated`).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httptools

from edgefleet.errors import AgentError

if TYPE_CHECKING:
    import asyncio

__all__ = ["MAX_BODY", "HTTPProtocol", "HTTPServer", "Handler", "Respond", "serve_http"]

MAX_BODY = 64 * 1024 * 1024
MAX_PIPELINED = 32  # unanswered requests per connection before it stops reading

# respond(status, body, header_lines): header_lines is pre-encoded ``name: value\r\n`` text (content type etc.).
Respond = Callable[[int, bytes, bytes], None]
# handler(method, path, headers, body, respond); headers: lower-cased name -> value, only the last of repeats.
Handler = Callable[[str, str, dict[bytes, bytes], bytes, Respond], None]

JSON_HEADERS = b"content-type: application/json\r\n"
_REASONS = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_STATUS: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _STATUS.get(status)
    if line is None:
        line = _STATUS[status] = f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\n".encode()
    return line


class _Clock:
    """The Date header, formatted once a second rather than per response."""

    def __init__(self) -> None:
        self.second = -1
        self.header = b""

    def date(self) -> bytes:
        now = int(time.time())
        if now != self.second:
            self.second = now
            self.header = b"date: %s\r\n" % _http_date(now)
        return self.header


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _http_date(now: float) -> bytes:
    """RFC 9110 IMF-fixdate, as ``email.utils.formatdate(usegmt=True)`` (not imported: memory in the worker)."""
    t = time.gmtime(now)
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year:04d} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
    ).encode()


_CLOCK = _Clock()


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


class _Slot:
    """One request's place in the connection's answer order."""

    __slots__ = ("data", "keep_alive")

    def __init__(self, keep_alive: bool) -> None:
        self.keep_alive = keep_alive
        self.data: bytes | None = None


class HTTPProtocol:
    """One connection (an asyncio protocol by duck typing: asyncio is not imported in the worker)."""

    def __init__(self, handler: Handler, connections: set[HTTPProtocol] | None = None) -> None:
        self.handler = handler
        self.connections = connections
        self.parser = httptools.HttpRequestParser(self)
        self.transport: Any = None  # an asyncio.Transport, or the worker's selectors transport
        self.slots: collections.deque[_Slot] = collections.deque()
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.size = 0
        self.refused = False  # the current request's body went over the cap: answered, connection closing
        self.reading = True
        self.writable = True
        # Set when a worker takes the port over: this connection's next answer says "connection: close", so a
        # keep-alive client reconnects to the worker instead of staying on the agent's forwarding path for good.
        self.draining = False

    # ------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # asyncio sets it too; without it Nagle + delayed ACK add tens of milliseconds per request.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.connections is not None:
            self.connections.add(self)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.connections is not None:
            self.connections.discard(self)
        self.transport = None
        self.slots.clear()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Upgrades (h2c, websockets) are not offered: the request was answered; end the connection after it.
            if self.slots:
                self.slots[-1].keep_alive = False
            else:
                self._fail(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as err:
            if not self.refused:
                self._fail(400, f"malformed HTTP request: {err}")

    def pause_writing(self) -> None:
        self.writable = False
        self._pause_reading()

    def resume_writing(self) -> None:
        self.writable = True
        if len(self.slots) < MAX_PIPELINED:
            self._resume_reading()

    # ------------------------------------------------------------ parser callbacks

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = {}
        self.body = []
        self.size = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        length = self.headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY:
            self._refuse_body()
            return
        if self.headers.get(b"expect", b"").lower() == b"100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self.refused:
            return
        self.size += len(body)
        if self.size > MAX_BODY:
            self._refuse_body()
            return
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.refused:
            return
        slot = _Slot(self.parser.should_keep_alive())
        self.slots.append(slot)
        if len(self.slots) >= MAX_PIPELINED:
            self._pause_reading()
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self.body = []
        try:
            path = httptools.parse_url(self.url).path.decode("utf-8", "replace")
        except httptools.HttpParserInvalidURLError:
            self._answer(slot, 400, error_body(f"malformed URL {self.url[:200]!r}"), JSON_HEADERS)
            return
        method = self.parser.get_method().decode("ascii", "replace")

        def respond(status: int, payload: bytes, headers: bytes) -> None:
            self._answer(slot, status, payload, headers)

        try:
            self.handler(method, path, self.headers, body, respond)
        except Exception as err:  # a handler bug must cost one 500, not the connection
            if slot.data is None:
                self._answer(slot, 500, error_body(f"internal error: {type(err).__name__}: {err}"), JSON_HEADERS)

    # ------------------------------------------------------------ answering

    def _answer(self, slot: _Slot, status: int, body: bytes, headers: bytes) -> None:
        if slot.data is not None:
            return  # answered already (a late callback after an error answer)
        if self.draining:
            slot.keep_alive = False
        close = b"" if slot.keep_alive else b"connection: close\r\n"
        slot.data = b"".join(
            (_status_line(status), headers, b"content-length: ", str(len(body)).encode(), b"\r\n", _CLOCK.date(),
             close, b"\r\n", body)
        )  # fmt: skip
        self._flush()

    def _flush(self) -> None:
        transport = self.transport
        slots = self.slots
        if transport is None:
            return
        out: list[bytes] = []
        close = False
        while slots and slots[0].data is not None:
            slot = slots.popleft()
            out.append(slot.data)  # type: ignore[arg-type]
            if not slot.keep_alive:
                close = True
                break
        if not out:
            return
        if not transport.is_closing():
            transport.write(out[0] if len(out) == 1 else b"".join(out))  # one write per response (or burst)
        if close:
            transport.close()
            self.transport = None
        elif len(slots) < MAX_PIPELINED and self.writable:
            self._resume_reading()

    def _fail(self, status: int, message: str) -> None:
        """Answer a request the parser cannot go on with, then close the connection."""
        slot = _Slot(keep_alive=False)
        self.slots.append(slot)
        self._answer(slot, status, error_body(message), JSON_HEADERS)

    def _refuse_body(self) -> None:
        self.refused = True
        self.body = []
        self._fail(413, f"request body over {MAX_BODY} bytes")

    def _pause_reading(self) -> None:
        if self.reading and self.transport is not None:
            self.reading = False
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if not self.reading and self.transport is not None:
            self.reading = True
            self.transport.resume_reading()


class HTTPServer:
    """The listening socket and its open connections; :meth:`close` ends both.

    It accepts with its own reader on the socket, so that accepting can stop while an inference worker serves
    the same socket (:meth:`delegated`, ADR 0032) and resume the moment no worker does.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, handler: Handler) -> None:
        self.loop = loop
        self.sock = sock
        self.handler = handler
        self.connections: set[HTTPProtocol] = set()
        self.accepting = False
        self.closed = False
        self._delegates: set[object] = set()
        self._pending: set[asyncio.Task[Any]] = set()
        self._resume()

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def delegated(self, owner: object, serving: bool) -> None:
        """``owner`` (a worker) serves this socket itself now (``serving``) or no longer: the agent accepts only
        while no worker does."""
        if serving:
            self._delegates.add(owner)
        else:
            self._delegates.discard(owner)
        if self._delegates:
            self._pause()
        else:
            self._resume()

    def _pause(self) -> None:
        if self.accepting:
            self.accepting = False
            self.loop.remove_reader(self.sock.fileno())
        for conn in self.connections:
            conn.draining = True

    def _resume(self) -> None:
        if not self.accepting and not self.closed:
            self.accepting = True
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(64):
            try:
                conn, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return  # another process (the worker) took it, or the peer gave up
            except OSError as err:  # EMFILE and the like: keep listening, log once per burst
                import logging  # not at import: the worker imports this module and never logs (ADR 0032)

                logging.getLogger("edgefleet.agent").warning("accept failed: %s", err)
                return
            conn.setblocking(False)
            task = self.loop.create_task(
                self.loop.connect_accepted_socket(  # type: ignore[type-var]  # a protocol by duck typing
                    lambda: HTTPProtocol(self.handler, self.connections), conn
                )
            )
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    def close(self) -> None:
        self._pause()
        self.closed = True
        self.sock.close()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()

    async def wait_closed(self) -> None:
        import asyncio

        for task in list(self._pending):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 2.0)


def _listen(host: str, port: int) -> socket.socket:
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = info[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_http(handler: Handler | Any, host: str, port: int) -> HTTPServer:
    """Listen on ``host:port`` in this event loop. ``handler`` is a :data:`Handler` or has a ``handle`` method
    (an :class:`~edgefleet.agent.oip.OIPApp`)."""
    import asyncio

    fn: Handler = getattr(handler, "handle", handler)
    deadline = time.monotonic() + 3.0
    while True:
        try:
            sock = _listen(host, port)
            break
        except OSError as err:
            # A worker of an agent that was just killed may hold the port for a few more milliseconds.
            if err.errno == errno.EADDRINUSE and port and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                continue
            raise AgentError(f"the inference API could not listen on {host}:{port}: {err.strerror or err}")
    return HTTPServer(asyncio.get_running_loop(), sock, fn)

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
(``worker/httpserve.py``) without importing asyncio (ADR 0032). :class:`HTTPServer` accepts by itself rather than
through ``asyncio.Server`` so that it can stop and resume accepting on a listening socket it shares with the
worker (:meth:`HTTPServer.delegated`).

Limits (:class:`HTTPLimits`, the same in the agent and in a worker serving the port; docs/agent.md): the URL and
the header block are bounded (414/431) by counting raw bytes before they reach the parser, which would otherwise
buffer a header of any size; a request head and body must arrive within their timeouts (408) and an idle
keep-alive connection is closed; connections beyond the limit get a 503 and are closed at once; EMFILE and the
like pause accepting with a growing back-off instead of spinning; a body over its cap is refused (413) as soon as
its length is known — JSON bodies have a cap derived from the device's memory, binary tensor bodies a larger one.
An error answer that may leave request bytes unread shuts the write side and drains for a moment before closing,
so the client reads the answer instead of a reset.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import httptools

from edgefleet.errors import AgentError

if TYPE_CHECKING:
    import asyncio

__all__ = ["DEFAULT_LIMITS", "MAX_BODY", "HTTPLimits", "HTTPProtocol", "HTTPServer", "Handler", "Respond", "serve_http"]

MAX_BODY = 64 * 1024 * 1024
MAX_PIPELINED = 32  # unanswered requests per connection before it stops reading
LINGER_S = 2.0  # after an error answer that may leave request bytes unread: drain this long, then close
_HEAD_SLACK = 1024  # method, version, line ends: the raw head may exceed URL + headers by this much
# accept() errors that say "no resources right now": retrying at once would spin; pause accepting instead.
_ACCEPT_PAUSE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_BACKOFF = (0.05, 1.0)  # the first pause, and the longest (it doubles while accept keeps failing)


class HTTPLimits(NamedTuple):
    """What one client may cost the device; a NamedTuple, not a dataclass: the worker imports this module."""

    max_url_bytes: int = 8 * 1024
    max_header_bytes: int = 64 * 1024
    header_timeout_s: float = 10.0  # from a request's first byte (or the connection's start) to its last header
    body_timeout_s: float = 30.0  # from the last header to the body's last byte
    keepalive_timeout_s: float = 30.0  # an idle connection between requests
    max_connections: int = 256
    max_json_bytes: int = 16 * 1024 * 1024  # a body without Inference-Header-Content-Length, and that header
    max_binary_bytes: int = MAX_BODY  # a binary tensor body (JSON header + raw tensors)
    max_tensor_bytes: int = MAX_BODY  # the decoded input tensors of one request, together

    @classmethod
    def for_device(
        cls,
        memory_mb: int | None,
        *,
        max_body_bytes: int = MAX_BODY,
        max_json_bytes: int | None = None,
        max_tensor_bytes: int | None = None,
        **fixed: Any,
    ) -> HTTPLimits:
        """Caps derived from the device's memory (the machine's when ``memory_mb`` is None).

        Parsing JSON costs up to ~25× the body in Python objects (``[],`` is 3 bytes and a 64-byte list), so a
        JSON body gets 1/64 of the memory; decoded tensors 1/8; a binary body holds little more than its
        tensors, so its cap is the two together, never over ``max_body_bytes``.
        """
        if memory_mb is None:
            import psutil  # not at import: the worker never derives limits, it is handed them

            memory_mb = int(psutil.virtual_memory().total // 2**20)
        memory = memory_mb * 2**20
        json_cap = max_json_bytes or min(max_body_bytes, max(256 * 1024, memory // 64))
        tensor_cap = max_tensor_bytes or min(max_body_bytes, max(1024 * 1024, memory // 8))
        binary_cap = min(max_body_bytes, json_cap + tensor_cap)
        return cls(max_json_bytes=json_cap, max_binary_bytes=binary_cap, max_tensor_bytes=tensor_cap, **fixed)

    @classmethod
    def from_settings(cls, settings: Any) -> HTTPLimits:
        """From :class:`~edgefleet.config.AgentSettings` (its ``http_*`` fields and ``memory_mb``)."""
        return cls.for_device(
            settings.memory_mb,
            max_body_bytes=settings.http_max_body_bytes,
            max_json_bytes=settings.http_max_json_bytes,
            max_tensor_bytes=settings.http_max_tensor_bytes,
            max_url_bytes=settings.http_max_url_bytes,
            max_header_bytes=settings.http_max_header_bytes,
            header_timeout_s=settings.http_header_timeout_s,
            body_timeout_s=settings.http_body_timeout_s,
            keepalive_timeout_s=settings.http_keepalive_timeout_s,
            max_connections=settings.http_max_connections,
        )

    @classmethod
    def from_dict(cls, doc: Any) -> HTTPLimits:
        """Limits sent to a worker (the ``serve`` frame); anything missing or of the wrong type keeps its default."""
        if not isinstance(doc, dict):
            return DEFAULT_LIMITS
        values: dict[str, Any] = {}
        for name, default in DEFAULT_LIMITS._asdict().items():
            v = doc.get(name)
            if isinstance(v, int | float) and not isinstance(v, bool) and v > 0:
                values[name] = type(default)(v)
        return DEFAULT_LIMITS._replace(**values)

    @property
    def tick_s(self) -> float:
        """How often open connections are checked against their deadlines."""
        shortest = min(self.header_timeout_s, self.body_timeout_s, self.keepalive_timeout_s)
        return min(1.0, max(0.05, shortest / 4))


DEFAULT_LIMITS = HTTPLimits()

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
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
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


def _busy_response(limit: int) -> bytes:
    body = error_body(f"too many connections (limit {limit}); retry shortly")
    return (
        b"HTTP/1.1 503 Service Unavailable\r\n" + JSON_HEADERS + b"content-length: %d\r\nconnection: close\r\n\r\n%s"
    ) % (len(body), body)


def refuse_connection(conn: socket.socket, limit: int) -> None:
    """A connection over the limit: a 503 if the socket takes it at once, then closed (never queued)."""
    with contextlib.suppress(OSError):
        conn.setblocking(False)
        conn.send(_busy_response(limit))
        # What the client sent already is read and dropped: closing with unread bytes would reset the
        # connection, and the client might lose the 503.
        conn.recv(65536)
    conn.close()


def accept_burst(sock: socket.socket, take: Callable[[socket.socket], None], count: int) -> OSError | None:
    """Accept up to ``count`` waiting connections, handing each to ``take``. Returns the error that asks for a pause
    in accepting (EMFILE, ENFILE, ENOBUFS, ENOMEM: retrying at once would spin on the still-readable socket)."""
    for _ in range(count):
        try:
            conn, _addr = sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return None  # another process (the agent or the worker) took it, or the peer gave up
        except OSError as err:
            if err.errno in _ACCEPT_PAUSE:
                return err
            continue  # an error about this one connection (EPERM, EPROTO): it is gone, go on with the next
        take(conn)
    return None


_IDLE, _HEAD, _BODY, _LINGER = 1, 2, 3, 4


class _Stop(Exception):
    """Raised from a parser callback after the request was refused: parsing stops there."""


class _Slot:
    """One request's place in the connection's answer order."""

    __slots__ = ("data", "keep_alive", "linger")

    def __init__(self, keep_alive: bool, linger: bool = False) -> None:
        self.keep_alive = keep_alive
        self.linger = linger
        self.data: bytes | None = None


class HTTPProtocol:
    """One connection (an asyncio protocol by duck typing: asyncio is not imported in the worker)."""

    def __init__(
        self,
        handler: Handler,
        connections: set[HTTPProtocol] | None = None,
        limits: HTTPLimits = DEFAULT_LIMITS,
    ) -> None:
        self.handler = handler
        self.connections = connections
        self.limits = limits
        self.parser = httptools.HttpRequestParser(self)
        self.transport: Any = None  # an asyncio.Transport, or the worker's selectors transport
        self.slots: collections.deque[_Slot] = collections.deque()
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.size = 0
        self.cap = limits.max_json_bytes
        # Raw bytes the next request head may still take: counted before the parser sees them, because httptools
        # buffers a header's value whole before it calls on_header.
        self.head_room = limits.max_url_bytes + limits.max_header_bytes + _HEAD_SLACK
        self.in_head = True  # between requests, or inside a request's head
        self.in_request = False
        self.header_bytes = 0
        self.dead = False  # an error answer ends this connection: nothing after it is parsed
        self.reading = True
        self.writable = True
        self.deadline = 0.0  # monotonic; 0: none (an answer is awaited)
        self.expiry = _IDLE  # what the deadline is for
        self.stalled = 0.0  # since when the client has not read its answers (the write buffer is full)
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
        # A connection that never sends a request is closed when a request head would have timed out.
        self.deadline, self.expiry = time.monotonic() + self.limits.header_timeout_s, _IDLE

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.connections is not None:
            self.connections.discard(self)
        self.transport = None
        self.slots.clear()

    def data_received(self, data: bytes) -> None:
        if self.dead:
            return  # refused, answered, draining before the close: the rest of the request is dropped
        if self.in_head:
            room = self.head_room
            if len(data) > room:
                self._feed(data[:room])
                if self.dead:
                    return
                if self.in_head:
                    limit = self.limits.max_url_bytes + self.limits.max_header_bytes
                    self._fail(431, f"request line and headers over {limit} bytes", linger=True)
                    return
                self.data_received(data[room:])  # the head ended within its room: the rest is body or the next
                return
            self.head_room = room - len(data)
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Upgrades (h2c, websockets) are not offered: the request was answered; end the connection after it.
            if self.slots:
                self.slots[-1].keep_alive = False
            else:
                self._fail(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as err:
            if not self.dead:  # a refusal from a callback (_Stop) has answered already
                self._fail(400, f"malformed HTTP request: {err}")

    def pause_writing(self) -> None:
        self.writable = False
        self._pause_reading()

    def resume_writing(self) -> None:
        self.writable = True
        self.stalled = 0.0
        if len(self.slots) < MAX_PIPELINED:
            self._resume_reading()

    # ------------------------------------------------------------ deadlines

    def check(self, now: float) -> None:
        """Enforce this connection's deadline (called every :attr:`HTTPLimits.tick_s` by its server)."""
        transport = self.transport
        if transport is None:
            return
        if not self.writable:  # a client that does not read its answers holds memory: bounded like a body
            if not self.stalled:
                self.stalled = now
            elif now - self.stalled > self.limits.body_timeout_s:
                getattr(transport, "abort", transport.close)()
            return
        if not self.deadline or now < self.deadline:
            return
        expiry = self.expiry
        if expiry in (_HEAD, _BODY) and not self.reading:
            # Reading is paused while earlier answers are awaited: the client is not the slow one.
            self.deadline = now + (self.limits.header_timeout_s if expiry == _HEAD else self.limits.body_timeout_s)
            return
        self.deadline = 0.0
        if expiry in (_HEAD, _BODY):
            part = "head" if expiry == _HEAD else "body"
            seconds = self.limits.header_timeout_s if expiry == _HEAD else self.limits.body_timeout_s
            self._fail(408, f"the request {part} did not arrive within {seconds:g} s")
        else:
            transport.close()  # idle keep-alive, or the drain after a refusal: a close is the answer

    # ------------------------------------------------------------ parser callbacks

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = {}
        self.body = []
        self.size = 0
        self.header_bytes = 0
        self.in_request = True
        self.deadline, self.expiry = time.monotonic() + self.limits.header_timeout_s, _HEAD

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.limits.max_url_bytes:
            self._fail(414, f"URL over {self.limits.max_url_bytes} bytes", linger=True)
            raise _Stop

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value) + 4
        if self.header_bytes > self.limits.max_header_bytes:
            self._fail(431, f"headers over {self.limits.max_header_bytes} bytes", linger=True)
            raise _Stop
        self.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.deadline, self.expiry = time.monotonic() + self.limits.body_timeout_s, _BODY
        limits = self.limits
        binary = b"inference-header-content-length" in self.headers
        self.cap = limits.max_binary_bytes if binary else limits.max_json_bytes
        length = self.headers.get(b"content-length")
        if length is not None and length.isdigit() and (len(length) > 19 or int(length) > self.cap):
            self._refuse_body()
        if self.headers.get(b"expect", b"").lower() == b"100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > self.cap:
            self._refuse_body()
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.in_request = False
        self.in_head = True
        self.head_room = self.limits.max_url_bytes + self.limits.max_header_bytes + _HEAD_SLACK
        self.deadline = 0.0  # the answer is awaited: the model may take its time
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
        close = linger = False
        while slots and slots[0].data is not None:
            slot = slots.popleft()
            out.append(slot.data)  # type: ignore[arg-type]
            if not slot.keep_alive:
                close, linger = True, slot.linger
                break
        if not out:
            return
        if not transport.is_closing():
            transport.write(out[0] if len(out) == 1 else b"".join(out))  # one write per response (or burst)
        if close:
            if linger:
                self._linger()
            else:
                transport.close()
                self.transport = None
            return
        if not slots and not self.in_request:
            self.deadline, self.expiry = time.monotonic() + self.limits.keepalive_timeout_s, _IDLE
        if len(slots) < MAX_PIPELINED and self.writable:
            self._resume_reading()

    def _linger(self) -> None:
        """Close after an answer that may leave request bytes unread: closing now would reset the connection
        (and the client might lose the answer); shut the write side, drain a moment, then close."""
        transport = self.transport
        self.dead = True
        can = getattr(transport, "can_write_eof", None)
        if transport is None or can is None or not can() or transport.is_closing():
            if transport is not None:
                transport.close()
            self.transport = None
            return
        transport.write_eof()
        self.deadline, self.expiry = time.monotonic() + min(LINGER_S, self.limits.body_timeout_s), _LINGER
        self._resume_reading()

    def _fail(self, status: int, message: str, linger: bool = False) -> None:
        """Answer a request the parser cannot go on with, then close the connection."""
        self.dead = True
        self.deadline = 0.0
        slot = _Slot(keep_alive=False, linger=linger)
        self.slots.append(slot)
        self._answer(slot, status, error_body(message), JSON_HEADERS)

    def _refuse_body(self) -> None:
        self.body = []
        kind = "binary tensor" if self.cap == self.limits.max_binary_bytes else "JSON"
        self._fail(413, f"request body over {self.cap} bytes (the {kind} body cap of this device)", linger=True)
        raise _Stop

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

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        handler: Handler,
        limits: HTTPLimits = DEFAULT_LIMITS,
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.handler = handler
        self.limits = limits
        self.connections: set[HTTPProtocol] = set()
        self.accepting = False
        self.closed = False
        self.accept_errors = 0  # accept() failures that paused accepting (EMFILE and the like)
        self._backoff = 0.0
        self._backoff_timer: asyncio.TimerHandle | None = None
        self._delegates: set[object] = set()
        self._pending: set[asyncio.Task[Any]] = set()
        self._sweeper = loop.call_later(limits.tick_s, self._sweep)
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
        if not self.accepting and not self.closed and not self._delegates and self._backoff_timer is None:
            self.accepting = True
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def _accept(self) -> None:
        err = accept_burst(self.sock, self._take, 64)
        if err is None:
            self._backoff = 0.0
            return
        self.accept_errors += 1
        first = self._backoff == 0.0
        self._backoff = min(ACCEPT_BACKOFF[1], self._backoff * 2) if self._backoff else ACCEPT_BACKOFF[0]
        if first:
            import logging  # not at import: the worker imports this module and never logs (ADR 0032)

            logging.getLogger("edgefleet.agent").warning(
                "accept failed: %s; pausing new connections (up to %g s at a time)", err, ACCEPT_BACKOFF[1]
            )
        if self.accepting:
            self.accepting = False
            self.loop.remove_reader(self.sock.fileno())
        self._backoff_timer = self.loop.call_later(self._backoff, self._end_backoff)

    def _end_backoff(self) -> None:
        self._backoff_timer = None
        self._resume()

    def _take(self, conn: socket.socket) -> None:
        if len(self.connections) >= self.limits.max_connections:
            refuse_connection(conn, self.limits.max_connections)
            return
        conn.setblocking(False)
        # Counted from the accept on, not from connection_made: a burst of accepts must see the ones before it.
        proto = HTTPProtocol(self.handler, self.connections, self.limits)
        self.connections.add(proto)
        task = self.loop.create_task(
            self.loop.connect_accepted_socket(lambda: proto, conn)  # type: ignore[type-var]  # duck-typed protocol
        )
        self._pending.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._pending.discard(t)
            if t.cancelled() or t.exception() is not None:
                self.connections.discard(proto)

        task.add_done_callback(done)

    def _sweep(self) -> None:
        if self.closed:
            return
        now = time.monotonic()
        for conn in list(self.connections):
            conn.check(now)
        self._sweeper = self.loop.call_later(self.limits.tick_s, self._sweep)

    def close(self) -> None:
        self._pause()
        self.closed = True
        self._sweeper.cancel()
        if self._backoff_timer is not None:
            self._backoff_timer.cancel()
            self._backoff_timer = None
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


async def serve_http(handler: Handler | Any, host: str, port: int, limits: HTTPLimits | None = None) -> HTTPServer:
    """Listen on ``host:port`` in this event loop. ``handler`` is a :data:`Handler` or has a ``handle`` method
    (an :class:`~edgefleet.agent.oip.OIPApp`). ``limits``: the handler's own (an OIPApp's) when not given, else
    derived from the machine's memory."""
    import asyncio

    fn: Handler = getattr(handler, "handle", handler)
    if limits is None:
        limits = getattr(handler, "limits", None) or HTTPLimits.for_device(None)
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
    return HTTPServer(asyncio.get_running_loop(), sock, fn, limits)

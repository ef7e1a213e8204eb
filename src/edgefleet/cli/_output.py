"""Printing shared by every command: rich for people, JSON for scripts, one-line errors, progress.

User and server text (file names, device and token names, reasons, audit details) is never rich markup: it goes
through :func:`escape` or :func:`cell` (a :class:`~rich.text.Text`) before it reaches a console, so ``[/x]`` in a
name prints as typed instead of raising or vanishing. Our own styles (``[green]pass[/]``) stay markup."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol, TextIO

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape as _escape
from rich.text import Text

# Outside a terminal (a pipe, a CI log, a file) nobody's window bounds the lines: rich would wrap tables at 80
# columns and break every row in two. COLUMNS, when set, still wins.
_UNBOUNDED = 100_000


def _width(stream: TextIO) -> int | None:
    if os.environ.get("COLUMNS"):
        return None
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return None if tty else _UNBOUNDED


def _make(stderr: bool) -> Console:
    # emoji off: ":warning:" inside a reason is text, not a picture
    return Console(stderr=stderr, width=_width(sys.stderr if stderr else sys.stdout), emoji=False, highlight=False)


JsonOpt = typer.Option(False, "--json", help="Print JSON for scripts.")

console = _make(stderr=False)
err_console = _make(stderr=True)


def escape(text: object) -> str:
    """``text`` as rich markup that prints exactly as ``str(text)``."""
    return _escape(str(text))


def cell(value: object) -> Text:
    """A table cell that shows ``value`` as typed (``None`` as empty)."""
    return Text("" if value is None else str(value))


def wire(value: BaseModel | list[Any]) -> Any:
    """A response model (or a list of them) as the JSON the server sent: field names as on the wire, and only the
    keys it sent (a default the model fills in is not the server's answer)."""
    if isinstance(value, list):
        return [wire(v) for v in value]
    return value.model_dump(mode="json", by_alias=True, exclude_unset=True)


def to_jsonable(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    return obj


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(to_jsonable(obj), indent=2, default=str) + "\n")
    sys.stdout.flush()


def error(message: str) -> None:
    """``error: MESSAGE`` on stderr, one line, the message verbatim."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)


def report_error(message: str, code: int, as_json: bool) -> None:
    """An error as the command's output format wants it: ``{"error": ..., "code": N}`` on stdout for ``--json``
    (a script reads one stream and one shape), else :func:`error`."""
    if as_json:
        print_json({"error": message, "code": code})
    else:
        error(message)


class ProgressUpdate(Protocol):
    def __call__(self, what: str, completed: float | None = None) -> None: ...


class _Lines:
    """Progress as plain lines: the step in progress, printed once it has run for ``quiet_for`` seconds (a step that
    ends, or fails, sooner adds nothing to the output), then each new step as it starts."""

    def __init__(self, out: Console, total: float | None, quiet_for: float) -> None:
        self.out, self.total, self.quiet_for = out, total, quiet_for
        self.start = time.monotonic()
        self.current: tuple[str, float | None] | None = None
        self.printed: str | None = None
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.ticker = threading.Thread(target=self._tick, name="edgefleet-progress", daemon=True)

    def update(self, what: str, completed: float | None = None) -> None:
        with self.lock:
            self.current = (what, completed)
        self._flush()

    def _flush(self) -> None:
        if time.monotonic() - self.start < self.quiet_for:
            return
        with self.lock:
            if self.current is None or self.current[0] == self.printed:
                return
            what, completed = self.current
            self.printed = what
            done = f" ({completed / self.total:.0%})" if completed is not None and self.total else ""
            self.out.print(Text(f"{what}{done}"), soft_wrap=True)

    def _tick(self) -> None:
        while not self.done.wait(0.2):
            self._flush()


@contextlib.contextmanager
def progress(
    description: str, total: float | None, *, to: Console | None = None, quiet_for: float = 1.0
) -> Iterator[ProgressUpdate]:
    """Progress of a slow step: a live bar on a terminal, else one line per step (a bar is invisible in a CI log,
    and a silent minute reads as a hang). Yields ``update(description, completed)``; ``completed`` None advances
    by one."""
    out = to or err_console
    if out.is_terminal:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        columns = [TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn()]
        with Progress(*columns, console=out, transient=True) as bar:
            task = bar.add_task(escape(description), total=total)

            def live(what: str, completed: float | None = None) -> None:
                if completed is None:
                    bar.update(task, description=escape(what), advance=1)
                else:
                    bar.update(task, description=escape(what), completed=completed)

            yield live
        return
    lines = _Lines(out, total, quiet_for)
    lines.update(description)
    lines.ticker.start()
    try:
        yield lines.update
    finally:
        lines.done.set()
        lines.ticker.join()

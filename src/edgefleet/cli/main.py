"""Entry point: builds the typer app from the command-group modules and turns errors into one line + exit code."""

from __future__ import annotations

import contextlib
import faulthandler
import importlib
import io
import os
import signal
import sys
from typing import Any

import typer

from edgefleet import __version__
from edgefleet.cli._output import error
from edgefleet.errors import EdgefleetError

_app = typer.Typer(
    name="edgefleet",
    help="Take a trained model to a fleet of edge devices and keep it healthy there.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Each module owns one command group and exposes ``register(app)``; the commands each one adds. A run imports only
# the module of the command it names: a device running `edgefleet agent` never pays for the optimizer, the control
# plane or onnxruntime in its own process (RSS and start-up time are a device's budget).
_GROUPS: dict[str, tuple[str, ...]] = {
    "package": ("package", "inspect"),
    "keys": ("keys",),
    "repo": ("repo", "publish", "fetch"),
    "bench": ("bench",),
    "gate": ("gate",),
    "optimize": ("optimize",),
    "agent": ("agent", "serve"),
    "server": ("server", "devices", "rollout", "fleet", "audit", "models", "tokens"),
    "sim": ("simulate", "demo"),
}


def _groups_for(argv: list[str]) -> list[str]:
    command = next((a for a in argv if not a.startswith("-")), None)
    for module, commands in _GROUPS.items():
        if command in commands:
            return [module]
    return list(_GROUPS)  # --help, a typo, or no command: every group, so help and suggestions are complete


def _version(value: bool) -> None:
    if value:
        typer.echo(f"edgefleet {__version__}")
        raise typer.Exit()


@_app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """edgefleet: optimize, benchmark, gate, package, sign, roll out, serve and observe edge models."""


def register_groups(argv: list[str] | None = None) -> typer.Typer:
    """Add the command groups ``argv`` needs (all of them when ``argv`` is None) to the app."""
    for name in list(_GROUPS) if argv is None else _groups_for(argv):
        if name not in _registered:
            importlib.import_module(f"edgefleet.cli.{name}").register(_app)
            _registered.add(name)
    return _app


_registered: set[str] = set()


def __getattr__(name: str) -> Any:
    # ``from edgefleet.cli.main import app`` (tests, embedding) gets the app with every command group.
    if name == "app":
        return register_groups(None)
    raise AttributeError(name)


def run() -> None:
    if hasattr(signal, "SIGUSR1"):
        # `kill -USR1 <pid>` prints every thread's stack to stderr: how a hung agent or demo is diagnosed
        with contextlib.suppress(io.UnsupportedOperation, ValueError, AttributeError):  # stderr without a file
            faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        register_groups(sys.argv[1:])
        _app()
    except EdgefleetError as err:
        error(str(err))
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        error("interrupted")
        sys.exit(130)
    except Exception as err:  # a bug, not a user mistake: one line, the traceback on request
        if os.environ.get("EDGEFLEET_DEBUG"):
            raise
        first = str(err).splitlines()[0] if str(err) else ""
        error(f"internal error: {type(err).__name__}: {first} (EDGEFLEET_DEBUG=1 shows the traceback)")
        sys.exit(1)

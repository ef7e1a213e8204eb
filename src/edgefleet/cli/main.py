"""Entry point: builds the typer app from the command-group modules and turns errors into one line + exit code."""

from __future__ import annotations

import importlib
import sys

import typer

from edgefleet import __version__
from edgefleet.cli._output import error
from edgefleet.errors import EdgefleetError

app = typer.Typer(
    name="edgefleet",
    help="Take a trained model to a fleet of edge devices and keep it healthy there.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Each module owns one command group and exposes ``register(app)``.
_GROUPS = [
    "package",  # package, inspect
    "keys",  # keys device
    "repo",  # repo init/status/refresh/rotate-key, publish, fetch
    "bench",  # bench
    "gate",  # gate
    "optimize",  # optimize
    "agent",  # agent, serve
    "server",  # server, devices, rollout, fleet, audit, models
    "sim",  # simulate, demo
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"edgefleet {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """edgefleet: optimize, benchmark, gate, package, sign, roll out, serve and observe edge models."""


for _name in _GROUPS:
    importlib.import_module(f"edgefleet.cli.{_name}").register(app)


def run() -> None:
    try:
        app()
    except EdgefleetError as err:
        error(str(err))
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        error("interrupted")
        sys.exit(130)

"""Entry point: builds the typer app from the command-group modules and turns errors into one line + exit code.

The exit codes are the table in :mod:`edgefleet.errors` (and ``docs/cli.md``): 0 ok, 1 a failed verdict or check,
2 usage error, 3 not found / conflict, 4 unreachable server / refused credential, 70 internal error."""

from __future__ import annotations

import contextlib
import faulthandler
import importlib
import io
import os
import signal
import sys
from typing import Any, NoReturn

import typer

from edgefleet import __version__
from edgefleet.cli._output import error, report_error
from edgefleet.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, EdgefleetError

_app = typer.Typer(
    name="edgefleet",
    help="Take a trained model to a fleet of edge devices and keep it healthy there.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # help text is plain text: with rich markup a default such as "[sqlite:///edgefleet.db]" is read as a tag and
    # vanishes from --help
    rich_markup_mode=None,
    add_completion=True,
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
    "agent": ("agent",),
    "agent_bundle": ("agent-bundle",),
    "serve": ("serve",),
    "server": ("server", "devices", "rollout", "fleet", "audit", "models", "tokens"),
    "sim": ("simulate", "demo"),
    "samples": ("samples",),
}


def _groups_for(argv: list[str]) -> list[str]:
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is None and "--version" in argv and not {"-h", "--help"} & set(argv):
        return []  # the version needs no command group: a device install lacks the tools extra some import
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
    argv = sys.argv[1:]
    # a script that asked for JSON gets its errors as JSON too, on the stream it reads
    as_json = "--json" in argv
    if hasattr(signal, "SIGUSR1"):
        # `kill -USR1 <pid>` prints every thread's stack to stderr: how a hung agent or demo is diagnosed
        with contextlib.suppress(io.UnsupportedOperation, ValueError, AttributeError):  # stderr without a file
            faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        register_groups(argv)
        # not standalone: click's own errors come here, so they follow the exit-code table and --json
        code = _app(standalone_mode=False)
    except EdgefleetError as err:
        report_error(str(err), err.exit_code, as_json)
        sys.exit(err.exit_code)
    except typer.TyperException as err:  # typer's click: unknown option, missing argument, a value of the wrong type
        # (a bare command group raises one too, to print its help: that is shown as it is, with its own code)
        show = getattr(err, "show", None)
        if as_json and type(err).__name__ != "NoArgsIsHelpError":
            report_error(err.format_message(), EXIT_USAGE, True)
        elif show is not None:
            show()
        else:
            error(err.format_message())
        sys.exit(getattr(err, "exit_code", EXIT_USAGE) if type(err).__name__ == "NoArgsIsHelpError" else EXIT_USAGE)
    except (KeyboardInterrupt, typer.Abort):
        report_error("interrupted", EXIT_INTERRUPTED, as_json)
        sys.exit(EXIT_INTERRUPTED)
    except ModuleNotFoundError as err:
        extra = _EXTRAS.get((err.name or "").split(".")[0])
        if extra is None:
            _internal_error(err, as_json)
        msg = f"this command needs the {extra!r} extra (missing {err.name}): pip install 'edgefleet[{extra}]'"
        report_error(msg, EXIT_USAGE, as_json)
        sys.exit(EXIT_USAGE)
    except Exception as err:  # a bug, not a user mistake: one line, the traceback on request
        _internal_error(err, as_json)
    if code == EXIT_INTERRUPTED:  # typer turns Ctrl-C inside a command into this exit code
        report_error("interrupted", EXIT_INTERRUPTED, as_json)
    sys.exit(code if isinstance(code, int) else 0)


# A device installs the core only (docs/install.md): a command that needs more says which extra, in one line.
_EXTRAS = {
    **dict.fromkeys(("fastapi", "starlette", "uvicorn", "sqlalchemy", "alembic", "psycopg", "jinja2"), "server"),
    **dict.fromkeys(("cyclonedx", "sympy"), "tools"),
    **dict.fromkeys(("sklearn", "skl2onnx"), "demo"),
}


def _internal_error(err: BaseException, as_json: bool) -> NoReturn:
    """A bug, not a user mistake: one line and exit 70; ``EDGEFLEET_DEBUG=1`` re-raises for the traceback."""
    if os.environ.get("EDGEFLEET_DEBUG"):
        raise err
    first = str(err).splitlines()[0] if str(err) else ""
    report_error(
        f"internal error: {type(err).__name__}: {first}, please report (EDGEFLEET_DEBUG=1 shows the traceback)",
        EXIT_INTERNAL,
        as_json,
    )
    sys.exit(EXIT_INTERNAL)

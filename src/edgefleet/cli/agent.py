"""``edgefleet agent`` (the device daemon) and ``edgefleet serve`` (one model behind the OIP API, standalone)."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from edgefleet.errors import UsageError

if TYPE_CHECKING:
    from pydantic import ValidationError

    from edgefleet.config import AgentSettings


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO: one line per check-in would bury what the agent itself says.
    logging.getLogger("httpx").setLevel(logging.WARNING)


async def until_signal(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


# ``edgefleet agent`` option → AgentSettings field, where the names differ
_FIELD_OF = {
    "checkin_interval": "checkin_interval_s",
    "telemetry_interval": "telemetry_interval_s",
    "emulate_tier": "tier",
}
_FLAG_OF = {field: option for option, field in _FIELD_OF.items()}
# the AgentSettings fields `edgefleet agent` has a flag for; the others come from their variables only
_FLAGGED = frozenset(
    {"server", "token", "root", "ca_file", "insecure_http", "data_dir", "host", "port", "checkin_interval_s", "mqtt"}
    | {"telemetry_interval_s", "memory_mb", "chipset", "tier", "intra_op_threads", "buffer_max_records", "uds"}
)


def _default(field: str) -> Any:
    from edgefleet.config import AgentSettings

    return AgentSettings.model_fields[field].default


def env_names(field: str) -> list[str]:
    """The environment variables AgentSettings reads ``field`` from, the one that wins first."""
    from pydantic import AliasChoices

    from edgefleet.config import AgentSettings

    alias = AgentSettings.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices):
        return [str(a) for a in alias.choices]
    return [f"{AgentSettings.model_config.get('env_prefix', '')}{field}".upper()]


def _setting_error(err: ValidationError) -> str:
    """The first problem as one line, named as the user can set it: its flag (if any) and its variables."""
    from edgefleet.config import AgentSettings

    first = err.errors()[0]
    msg = str(first["msg"]).removeprefix("Value error, ")  # pydantic's prefix for a validator's own text
    name = str(first["loc"][0]) if first["loc"] else ""
    if name not in AgentSettings.model_fields:  # a variable read through an alias names itself
        return f"{name}: {msg}" if name else msg
    where = env_names(name)
    if name in _FLAGGED:
        where = ["--" + _FLAG_OF.get(name, name).replace("_", "-"), *where]
    return f"{' / '.join(where)}: {msg}"


def agent_settings(ctx: typer.Context) -> AgentSettings:
    """The agent's settings from a parsed ``edgefleet agent`` command line. Only the flags given on it are passed:
    AgentSettings is the one source of everything else (its ``EDGEFLEET_AGENT_*`` variables, then its defaults),
    so a flag beats a variable and a variable beats the default."""
    from pydantic import ValidationError

    from edgefleet.config import AgentSettings

    given = {
        _FIELD_OF.get(name, name): value
        for name, value in ctx.params.items()
        # by name: typer's click and the click package each have their own ParameterSource enum
        if getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"
    }
    try:
        return AgentSettings(**given)
    except ValidationError as err:
        raise UsageError(f"invalid agent setting {_setting_error(err)}") from None


def register(app: typer.Typer) -> None:
    """Add this group's commands to ``app``."""

    # Defaults and variable names come from AgentSettings, so --help shows what the agent will use; click reads
    # a variable only to validate and show it: a value that did not come from the command line is dropped, and
    # AgentSettings reads it again (agent_settings).
    def option(field: str, *names: str, **kw: Any) -> Any:
        return typer.Option(_default(field), *names, envvar=env_names(field), **kw)

    @app.command("agent")
    def agent(
        ctx: typer.Context,
        server: str | None = option(
            "server", "--server", help="Control plane base URL (required, from the flag or a variable)."
        ),
        token: str | None = option(
            "token",
            "--token",
            help="One-time enrollment token (needed on the first start only; the tier comes with it). A new token "
            "given to a device whose credential is refused (revoked, decommissioned) enrolls it again.",
        ),
        root: Path | None = option(
            "root",
            "--root",
            help="A TUF root.json given out of band: enrollment accepts only an answer carrying exactly this root "
            "[the pin in the token, if any].",
        ),
        ca_file: Path | None = option(
            "ca_file",
            "--ca-file",
            help="Trust only this CA (PEM) for the control plane and the repository (default: the system's CAs).",
        ),
        insecure_http: bool = option(
            "insecure_http",
            "--insecure-http",
            help="Allow http:// to a control plane that is not on this machine (the credential crosses in clear).",
        ),
        data_dir: Path = option(
            "data_dir", "--data-dir", help="State, slots, keys and the telemetry buffer live here."
        ),
        host: str = option("host", "--host", help="Address of the local inference API."),
        port: int = option("port", "--port", help="Port of the local inference API (OIP v2 + /metrics)."),
        uds: Path | None = option(
            "uds",
            "--uds",
            help="Also serve the local inference API on this Unix socket path (system shared memory: docs/agent.md).",
        ),
        checkin_interval: float = option(
            "checkin_interval_s",
            "--checkin-interval",
            min=0.05,
            help="Seconds between check-ins (until the configuration document says otherwise).",
        ),
        telemetry_interval: float = option(
            "telemetry_interval_s", "--telemetry-interval", min=0.05, help="Seconds per telemetry window."
        ),
        memory_mb: int | None = option(
            "memory_mb",
            "--memory-mb",
            min=16,
            help="Emulated device memory: the inference worker is killed (a real crash) when its RSS exceeds it.",
        ),
        chipset: str | None = option("chipset", "--chipset", help="Chipset reported at enrollment."),
        emulate_tier: str | None = option(
            "tier",
            "--emulate-tier",
            help="This machine only emulates TIER (a simulator, a test bench): enrollment with a token of TIER is "
            "accepted although the hardware differs, and the device is labelled emulated; its reports never "
            "verify the tier in the compatibility matrix. Read at enrollment only.",
        ),
        intra_op_threads: int = option(
            "intra_op_threads",
            "--intra-op-threads",
            min=1,
            help="onnxruntime threads per inference call (keep equal to the tier profile's).",
        ),
        buffer_max_records: int = option(
            "buffer_max_records", "--buffer-max-records", min=1, help="Telemetry buffer cap (records)."
        ),
        mqtt: str | None = option(
            "mqtt",
            "--mqtt",
            help="Check in at once when the control plane nudges this device through this MQTT broker, "
            "mqtt://[USER:PASSWORD@]HOST[:PORT] (docs/agent.md) (default: none; polling only).",
        ),
    ) -> None:
        """Run the device agent: serve the committed model, apply updates, report telemetry. Every setting can
        also come from its EDGEFLEET_AGENT_* variable (the server from EDGEFLEET_SERVER too); a flag beats it."""
        from edgefleet.agent import Agent
        from edgefleet.transport import check_url, verify_arg

        settings = agent_settings(ctx)
        if not settings.server:
            raise UsageError("no control plane given: --server URL (or EDGEFLEET_SERVER)")
        # Refuse here, as one line, before anything starts: inside the agent the check-in loop would only log it.
        check_url(settings.server, settings.insecure_http)
        verify_arg(settings.ca_file)
        if settings.root is not None and not settings.root.is_file():
            raise UsageError(f"--root {settings.root} does not exist")
        if settings.mqtt:
            from edgefleet.agent.nudge import require_paho

            require_paho()
        setup_logging()

        async def main() -> int:
            a = Agent(settings)
            # a signal stops it, and so does the agent itself (decommissioned, credential refused)
            await until_signal(a.stop_requested)
            await a.start()
            try:
                await a.stop_requested.wait()
            finally:
                await a.stop()
            return a.exit_code or 0

        code = asyncio.run(main())
        if code:
            raise typer.Exit(code)

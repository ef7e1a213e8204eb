"""``edgefleet agent`` (the device daemon) and ``edgefleet serve`` (one model behind the OIP API, standalone)."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import typer

from edgefleet.errors import UsageError


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO: one line per check-in would bury what the agent itself says.
    logging.getLogger("httpx").setLevel(logging.WARNING)


async def _until_signal(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


def register(app: typer.Typer) -> None:
    """Add this group's commands to ``app``."""

    @app.command("agent")
    def agent(
        server: str = typer.Option(..., envvar="EDGEFLEET_AGENT_SERVER", help="Control plane base URL."),
        token: str | None = typer.Option(
            None,
            envvar="EDGEFLEET_AGENT_TOKEN",
            help="One-time enrollment token (needed on the first start only; the tier comes with it). A new token "
            "given to a device whose credential is refused (revoked, decommissioned) enrolls it again.",
        ),
        root: Path | None = typer.Option(
            None,
            "--root",
            envvar="EDGEFLEET_AGENT_ROOT",
            help="A TUF root.json given out of band: enrollment accepts only an answer carrying exactly this root "
            "[the pin in the token, if any].",
        ),
        ca_file: Path | None = typer.Option(
            None,
            "--ca-file",
            envvar="EDGEFLEET_AGENT_CA_FILE",
            help="Trust only this CA (PEM) for the control plane and the repository (default: the system's CAs).",
        ),
        insecure_http: bool = typer.Option(
            False,
            "--insecure-http",
            envvar="EDGEFLEET_AGENT_INSECURE_HTTP",
            help="Allow http:// to a control plane that is not on this machine (the credential crosses in clear).",
        ),
        data_dir: Path = typer.Option(
            Path("edgefleet-agent"),
            envvar="EDGEFLEET_AGENT_DATA_DIR",
            help="State, slots, keys and the telemetry buffer live here.",
        ),
        host: str = typer.Option("127.0.0.1", help="Address of the local inference API."),
        port: int = typer.Option(8081, help="Port of the local inference API (OIP v2 + /metrics)."),
        checkin_interval: float = typer.Option(
            30.0, min=0.05, help="Seconds between check-ins (until the configuration document says otherwise)."
        ),
        telemetry_interval: float = typer.Option(60.0, min=0.05, help="Seconds per telemetry window."),
        memory_mb: int | None = typer.Option(
            None,
            min=16,
            help="Emulated device memory: the inference worker is killed (a real crash) when its RSS exceeds it.",
        ),
        chipset: str | None = typer.Option(None, help="Chipset reported at enrollment."),
        emulate_tier: str | None = typer.Option(
            None,
            "--emulate-tier",
            envvar="EDGEFLEET_AGENT_EMULATE_TIER",
            help="This machine only emulates TIER (a simulator, a test bench): enrollment with a token of TIER is "
            "accepted although the hardware differs, and the device is labelled emulated; its reports never "
            "verify the tier in the compatibility matrix. Read at enrollment only.",
        ),
        intra_op_threads: int = typer.Option(
            1, min=1, help="onnxruntime threads per inference call (keep equal to the tier profile's)."
        ),
        buffer_max_records: int = typer.Option(10_000, min=1, help="Telemetry buffer cap (records)."),
    ) -> None:
        """Run the device agent: serve the committed model, apply updates, report telemetry."""
        from edgefleet.agent import Agent
        from edgefleet.config import AgentSettings
        from edgefleet.transport import check_url, verify_arg

        # Refuse here, as one line, before anything starts: inside the agent the check-in loop would only log it.
        check_url(server, insecure_http)
        verify_arg(ca_file)
        if root is not None and not root.is_file():
            raise UsageError(f"--root {root} does not exist")
        _logging()
        settings = AgentSettings(
            server=server,
            token=token,
            root=root,
            ca_file=ca_file,
            insecure_http=insecure_http,
            data_dir=data_dir,
            host=host,
            port=port,
            checkin_interval_s=checkin_interval,
            telemetry_interval_s=telemetry_interval,
            memory_mb=memory_mb,
            chipset=chipset,
            tier=emulate_tier,
            intra_op_threads=intra_op_threads,
            buffer_max_records=buffer_max_records,
        )

        async def main() -> int:
            a = Agent(settings)
            # a signal stops it, and so does the agent itself (decommissioned, credential refused)
            await _until_signal(a.stop_requested)
            await a.start()
            try:
                await a.stop_requested.wait()
            finally:
                await a.stop()
            return a.exit_code or 0

        code = asyncio.run(main())
        if code:
            raise typer.Exit(code)

    @app.command("serve")
    def serve(
        path: Path = typer.Argument(..., help="A package (.efpkg) or an ONNX model (.onnx)."),
        host: str = typer.Option("127.0.0.1", help="Address to listen on."),
        port: int = typer.Option(8081, help="Port of the OIP v2 API."),
        device_key: Path | None = typer.Option(None, help="Device private key, for an encrypted package."),
        memory_mb: int | None = typer.Option(None, min=16, help="Kill the worker when its RSS exceeds this."),
        intra_op_threads: int = typer.Option(1, min=1, help="onnxruntime threads per inference call."),
    ) -> None:
        """Serve one model over the Open Inference Protocol v2, with no control plane."""
        from edgefleet.agent import serve_standalone

        if not path.is_file():
            raise UsageError(f"{path} does not exist")
        if path.suffix not in (".efpkg", ".onnx"):
            raise UsageError(f"{path} is neither a .efpkg package nor an .onnx model")
        _logging()

        async def main() -> None:
            stop = asyncio.Event()
            await _until_signal(stop)
            await serve_standalone(
                path,
                host=host,
                port=port,
                device_key=device_key,
                memory_mb=memory_mb,
                intra_op_threads=intra_op_threads,
                stop=stop,
            )

        asyncio.run(main())

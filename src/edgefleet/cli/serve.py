"""`edgefleet serve`: one model over OIP v2 with no control plane. Its own group, so a device that only serves
never loads the agent's settings machinery (pydantic-settings and what it pulls, ~1.7 MB of RSS)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer

from edgefleet.cli.agent import setup_logging, until_signal
from edgefleet.errors import UsageError


def register(app: typer.Typer) -> None:
    """Add this group's commands to ``app``."""

    @app.command("serve")
    def serve(
        path: Path = typer.Argument(
            ..., help="A package (.efpkg), an ONNX model (.onnx), a LiteRT model (.tflite) or an OpenVINO IR (.xml)."
        ),
        host: str = typer.Option("127.0.0.1", help="Address to listen on."),
        port: int = typer.Option(8081, help="Port of the OIP v2 API."),
        device_key: Path | None = typer.Option(None, help="Device private key, for an encrypted package."),
        memory_mb: int | None = typer.Option(None, min=16, help="Kill the worker when its RSS exceeds this."),
        intra_op_threads: int = typer.Option(1, min=1, help="onnxruntime threads per inference call."),
        uds: Path | None = typer.Option(
            None, help="Also serve the API on this Unix socket path (with system shared memory: docs/agent.md)."
        ),
        route: str = typer.Option(
            "local", help="Hybrid routing policy: local, fallback or confidence (docs/agent.md; needs --remote-url)."
        ),
        remote_url: str | None = typer.Option(None, help="Base URL of a remote OIP v2 server for --route."),
        remote_model: str | None = typer.Option(None, help="The model's name at the remote (default: the local one)."),
        remote_timeout: float = typer.Option(2.0, min=0.01, help="Seconds a remote call may take."),
        remote_budget: int = typer.Option(60, min=0, help="Remote calls at most per sliding minute."),
        route_queue_depth: int | None = typer.Option(
            None, min=1, help="fallback also when this many requests wait locally (default: the queue size, 64)."
        ),
    ) -> None:
        """Serve one model over the Open Inference Protocol v2, with no control plane."""
        from edgefleet.agent import serve_standalone

        if not path.is_file():
            raise UsageError(f"{path} does not exist")
        if path.suffix not in (".efpkg", ".onnx", ".tflite", ".xml"):
            raise UsageError(f"{path} is neither a .efpkg package nor a .onnx, .tflite or OpenVINO .xml model")
        from edgefleet.agent.routing import POLICIES, Policy

        if route not in POLICIES:
            raise UsageError(f"--route {route!r} is not one of {', '.join(POLICIES)}")
        if route != "local" and not remote_url:
            raise UsageError(f"--route {route} needs --remote-url (the remote OIP v2 server)")
        if remote_url is not None and not remote_url.startswith(("http://", "https://")):
            raise UsageError(f"--remote-url {remote_url!r} must start with http:// or https://")
        routing = Policy(
            route, remote_url.rstrip("/") if remote_url else None, remote_model, remote_timeout, remote_budget,
            route_queue_depth,
        )  # fmt: skip
        setup_logging()

        async def main() -> None:
            stop = asyncio.Event()
            await until_signal(stop)
            await serve_standalone(
                path,
                host=host,
                port=port,
                device_key=device_key,
                memory_mb=memory_mb,
                intra_op_threads=intra_op_threads,
                stop=stop,
                uds=uds,
                routing=routing,
            )

        asyncio.run(main())

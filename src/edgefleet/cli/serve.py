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
    ) -> None:
        """Serve one model over the Open Inference Protocol v2, with no control plane."""
        from edgefleet.agent import serve_standalone

        if not path.is_file():
            raise UsageError(f"{path} does not exist")
        if path.suffix not in (".efpkg", ".onnx", ".tflite", ".xml"):
            raise UsageError(f"{path} is neither a .efpkg package nor a .onnx, .tflite or OpenVINO .xml model")
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
            )

        asyncio.run(main())

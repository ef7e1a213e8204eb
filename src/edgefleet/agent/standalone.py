"""``edgefleet serve``: one package or ONNX file behind the OIP API, with no control plane.

A module of its own so that the standalone server imports only what serving needs (not the updater, the TUF
client, the telemetry buffer or the state machine).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from edgefleet.agent.httpserver import HTTPLimits, serve_http
from edgefleet.agent.oip import OIPApp
from edgefleet.agent.service import InferenceService
from edgefleet.agent.supervisor import Supervisor
from edgefleet.agent.worker import WorkerSpec

__all__ = ["serve_standalone"]

log = logging.getLogger("edgefleet.agent")


async def serve_standalone(
    path: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8081,
    device_key: Path | None = None,
    memory_mb: int | None = None,
    intra_op_threads: int = 1,
    stop: asyncio.Event | None = None,
) -> None:
    """``edgefleet serve``: one package or ONNX file behind the OIP API, no control plane."""
    sup = Supervisor(WorkerSpec(path, device_key, memory_mb=memory_mb, intra_op_threads=intra_op_threads))
    service = InferenceService()
    # The worker loads while the listener comes up (cold start); until it is ready the API answers 503.
    starting = asyncio.get_running_loop().create_task(sup.start())
    try:
        # caps follow --memory-mb (the device being served for), not this machine's memory
        server = await serve_http(OIPApp(service, limits=HTTPLimits.for_device(memory_mb)), host, port)
    except BaseException:
        starting.cancel()
        await sup.stop()
        raise
    try:
        try:
            info = await starting
        except BaseException:
            await sup.stop()
            raise
        service.set_backend(sup, info)
        service.attach_http(server)  # the worker serves the port itself from now on (ADR 0032)
        log.info("serving %s %s on http://%s:%d/v2", info.name, info.version, host, port)
        await (stop.wait() if stop else asyncio.Event().wait())
    finally:
        server.close()
        await server.wait_closed()
        await sup.stop()

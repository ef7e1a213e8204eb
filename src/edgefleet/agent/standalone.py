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
from edgefleet.agent.routing import Policy
from edgefleet.agent.service import InferenceService
from edgefleet.agent.supervisor import Supervisor
from edgefleet.agent.worker.spec import WorkerSpec

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
    uds: Path | None = None,
    routing: Policy | None = None,
) -> None:
    """``edgefleet serve``: one package or ONNX file behind the OIP API, no control plane; on ``uds`` (a Unix
    socket path) too when given."""
    sup = Supervisor(WorkerSpec(path, device_key, memory_mb=memory_mb, intra_op_threads=intra_op_threads))
    service = InferenceService()
    if routing is not None:
        service.set_routing(routing)  # hybrid edge/cloud routing (ADR 0105)
    # The worker loads while the listener comes up (cold start); until it is ready the API answers 503.
    starting = asyncio.get_running_loop().create_task(sup.start())
    try:
        # caps follow --memory-mb (the device being served for), not this machine's memory
        app = OIPApp(service, limits=HTTPLimits.for_device(memory_mb))
        server = await serve_http(app, host, port)
    except BaseException:
        starting.cancel()
        await sup.stop()
        raise
    servers = [server]
    try:
        if uds is not None:
            from edgefleet.agent.uds import serve_uds

            servers.append(await serve_uds(app, uds))
    except BaseException:
        server.close()
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
        service.attach_http(*servers)  # the worker serves the port itself from now on (ADR 0032)
        log.info("serving %s %s on http://%s:%d/v2", info.name, info.version, host, port)
        if uds is not None:
            log.info("and on the Unix socket %s", uds)
        await (stop.wait() if stop else asyncio.Event().wait())
    finally:
        for s in servers:
            s.close()
        for s in servers:
            await s.wait_closed()
        await sup.stop()
        service.shm.close()
        if service.router is not None:
            await service.router.aclose()

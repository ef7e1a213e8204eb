"""What a worker loads (:class:`WorkerSpec`) and what it reports once loaded (:class:`ModelInfo`): both sides'.

The agent builds the spec and reads the info from the worker's ``hello`` frame (a plain dict of these fields:
the lean worker sends the same shape without importing this module).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ModelInfo", "WorkerSpec"]


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker loads: a package (``.efpkg``) or a bare ONNX file."""

    path: Path
    device_key: Path | None = None
    role: str = "serve"  # serve | health
    memory_mb: int | None = None
    intra_op_threads: int = 1
    fault_file: Path | None = None  # where faulthandler writes the worker's traceback on a fatal signal


@dataclass
class ModelInfo:
    name: str
    version: str
    model_sha256: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    platform: str = "onnxruntime"  # the runtime that serves it: onnxruntime, litert, openvino
    provider: str = "CPUExecutionProvider"  # what runs it there: an execution provider, an OpenVINO device, ...
    load_seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    has_golden: bool = False

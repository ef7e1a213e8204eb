"""edgefleet: take a trained model to a fleet of edge devices and keep it healthy there.

``edgefleet.load(path)`` loads a model package (``.efpkg``) or a bare ``.onnx`` file for inference;
``edgefleet.Client(server, token)`` is the Python SDK of the control plane's operator API (docs/sdk.md).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from edgefleet.errors import EdgefleetError

if TYPE_CHECKING:
    from edgefleet.runtime import Model
    from edgefleet.sdk import Client

__all__ = ["Client", "EdgefleetError", "Model", "__version__", "load"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Imported on first use: `import edgefleet` must not load onnxruntime into processes that never run a model
    # (the agent's supervisor, the control plane, the CLI's --help).
    if name == "Model":
        from edgefleet.runtime import Model

        return Model
    if name == "Client":
        from edgefleet.sdk import Client

        return Client
    raise AttributeError(f"module 'edgefleet' has no attribute {name!r}")


def load(path: str | os.PathLike[str], *, device_key: Any = None, settings: Any = None) -> Model:
    """Load a ``.efpkg`` package (verified; decrypted with ``device_key`` if encrypted) or a bare model file: ``.onnx``,
    ``.tflite`` (LiteRT) or an OpenVINO IR ``.xml`` with its ``.bin`` beside it."""
    from pathlib import Path  # here, not at import: the lean inference worker imports this package (ADR 0032)

    p = Path(path)
    if p.suffix == ".efpkg":
        from edgefleet.package import open_package

        return open_package(p, device_key=device_key).load(settings=settings)
    from edgefleet.runtime import load_model

    return load_model(p, settings=settings)

"""Shared fixtures: small real models trained once per session from scikit-learn's bundled digits data."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet import examples


@pytest.fixture(scope="session")
def digits() -> examples.Digits:
    return examples.digits()


@pytest.fixture(scope="session")
def mlp_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64-unit MLP on digits as ONNX (input ``X`` float32[N, 64]; outputs ``label``, ``probabilities``)."""
    p = tmp_path_factory.mktemp("models") / "digits_mlp.onnx"
    p.write_bytes(examples.train_digits_mlp(hidden=(64,)))
    return p


@pytest.fixture(scope="session")
def digits_calls(digits: examples.Digits) -> dict[str, np.ndarray]:
    """Per-call arrays: 200 calls of ``X`` [1, 64]."""
    return {"X": digits.x_test[:200, None, :]}


@pytest.fixture(scope="session")
def silero_path() -> Path:
    """Silero VAD, a real pretrained ONNX model shipped in the ``silero-vad`` wheel (``make test`` installs it)."""
    p = examples.silero_vad_path()
    if p is None:
        pytest.skip("silero-vad is not installed (make test installs it with --no-deps)")
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The control plane's database, once per backend: SQLite in the test's folder, and a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'cp.db'}"
    else:
        from _cp_support import pg_schema_url

        yield from pg_schema_url()


@pytest.fixture
def cp(tmp_path: Path, db_url: str) -> Iterator[Any]:
    """A control plane in process on ``db_url`` (``_cp_support.CP``); modules with other needs define their own."""
    from _cp_support import CP

    c = CP(tmp_path, db_url)
    yield c
    c.close()

"""Shared fixtures: small real models trained once per session from scikit-learn's bundled digits data."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from edgefleet import examples
from edgefleet.sim.server import free_port  # noqa: F401  (tests import it from here)

F = TypeVar("F", bound=Callable[..., Any])

# The CLI wraps its lines at COLUMNS when that is set, as a terminal's user wants (cli/_output.py). pytest-xdist's
# workers inherit COLUMNS=80, so a one-line message asserted whole would break in two: the tests read the CLI as a
# script does, with no terminal width, in every process (the agents and servers they start inherit this).
os.environ.pop("COLUMNS", None)
os.environ.pop("LINES", None)

# The fast tier (`make test-fast`) runs `-m "not slow and not process"`. A test is `process` when it starts
# processes or servers (agents, the control plane, the demo, PostgreSQL, a browser): marked by hand, through a
# fixture decorated with `starts_processes`, or by carrying the `postgres` or `browser` marker.
_IMPLY_PROCESS = ("postgres", "browser")


def starts_processes(fixture: F) -> F:
    """Declare that a fixture starts processes or servers: every test using it, directly or through another
    fixture, is marked ``process``. Put it under ``@pytest.fixture``."""
    fixture._edgefleet_starts_processes = True  # type: ignore[attr-defined]  # a flag on the function object
    return fixture


def _uses_process_fixture(item: pytest.Item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    return any(
        getattr(d.func, "_edgefleet_starts_processes", False) for defs in info.name2fixturedefs.values() for d in defs
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.get_closest_marker(m) for m in _IMPLY_PROCESS) or _uses_process_fixture(item):
            item.add_marker(pytest.mark.process)


@pytest.fixture(scope="session", autouse=True)
def _unmarked_tests_start_no_processes(request: pytest.FixtureRequest) -> Iterator[None]:
    """In a run that leaves ``process`` tests out, a test (or a fixture of any scope) that starts a process anyway
    fails and says how to mark it, so the fast tier stays fast and the marks stay true."""
    if "not process" not in (request.config.option.markexpr or ""):
        yield
        return

    def refuse(self: subprocess.Popen[Any], args: Any, *rest: Any, **kw: Any) -> None:
        test = os.environ.get("PYTEST_CURRENT_TEST", "a test").rsplit(" (", 1)[0]
        pytest.fail(
            f"{test} starts a process ({str(args)[:100]}) but is not marked `process`: mark the test, or its "
            "fixture with conftest.starts_processes",
            pytrace=False,
        )

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(subprocess.Popen, "_execute_child", refuse)
        yield


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


@pytest.fixture
@starts_processes
def fleet(tmp_path: Path) -> Iterator[Any]:
    """The real control plane behind a faulty edge (``_fleet_support.Fleet``) on SQLite in ``tmp_path / "cp"``;
    modules that publish packages first or tear down more define their own."""
    from _fleet_support import Fleet

    f = Fleet(tmp_path / "cp")
    yield f
    f.close()

"""The agent updates itself (docs/operations.md, "Updating the agent"): agent bundles built from this working tree,
published to the control plane's TUF repository, installed side by side under the real ``agent-launch``.

Bundle A is the working tree; A' (0.1.1) and B (0.1.2) are A's edgefleet wheel with another version string
patched in, and B also ends ``edgefleet agent`` at startup. The device runs A, is told to run B, installs it,
restarts into it, sees it fail to start, falls back to A on its own and reports that from A; then it is told to
run A', which comes up healthy and stays.

Speed: the dependency wheels are downloaded once into ``~/.cache/edgefleet-tests/agent-wheelhouse`` (keyed by
constraints.txt) and taken from there offline afterwards; only the edgefleet wheel is built (once) and patched.
Environments are installed with ``--no-compile`` (a documented launcher option, recorded for later updates), which
saves tens of seconds of byte-compiling per environment on a loaded 2-core machine.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _fleet_support import Fleet, make_packages, state_of, wait_for
from conftest import free_port, starts_processes
from edgefleet.agent import launcher
from edgefleet.agent.selfupdate import AGENT_MODEL, wanted_version
from edgefleet.package.agent_bundle import BuiltBundle, build_agent_bundle, platform_tags

ROOT = Path(__file__).resolve().parents[1]
A, A2, B = "0.1.0", "0.1.1", "0.1.2"
# appended to B's edgefleet/cli/agent.py: `edgefleet agent` ends at startup, before it loads any state
_B_FAILS = (
    '\nimport sys as _sys\nif _sys.argv[1:2] == ["agent"]:\n    raise SystemExit("test build B: fails at startup")\n'
)


# ------------------------------------------------------------------------------------------------ pure parts


def test_choose_starts_current_without_a_trial() -> None:
    state = {"current": {"env": "a", "version": A}, "trial": None}
    env, new, note = launcher.choose(state, 100.0)
    assert env == {"env": "a", "version": A} and new == state and note == ""


def test_choose_tries_a_trial_and_starts_its_deadline_at_the_first_start() -> None:
    state = {"current": {"env": "a", "version": A}, "trial": {"env": "b", "version": B, "starts": 0, "deadline_s": 60}}
    env, new, _ = launcher.choose(state, 100.0, max_starts=3)
    assert env is not None and env["env"] == "b"
    assert new["trial"]["starts"] == 1 and new["trial"]["deadline"] == 160.0
    env, again, _ = launcher.choose(new, 110.0, max_starts=3)
    assert env is not None and env["env"] == "b" and again["trial"]["deadline"] == 160.0


@pytest.mark.parametrize(
    ("trial", "now", "says"),
    [
        ({"starts": 3, "last_exit": 1}, 100.0, "3 start(s), the last ended with exit code 1"),
        ({"starts": 1, "deadline": 150.0}, 150.0, "did not come up healthy within 60 s"),
    ],
)
def test_choose_rolls_back_a_trial_that_crashes_or_misses_its_deadline(
    trial: dict[str, Any], now: float, says: str
) -> None:
    state = {
        "current": {"env": "a", "version": A},
        "trial": {"env": "b", "version": B, "deadline_s": 60, **trial},
        "refused": [],
    }
    env, new, note = launcher.choose(state, now, max_starts=3)
    assert env == {"env": "a", "version": A}
    assert new["trial"] is None and new["refused"] == [B]
    assert new["last_trial"]["outcome"] == "rolled_back" and says in new["last_trial"]["reason"]
    assert not new["last_trial"]["reported"] and note.startswith(f"rolled back to agent {A}")


def test_promote_only_the_env_on_trial() -> None:
    state = {"current": {"env": "a", "version": A}, "trial": {"env": "b", "version": A2, "starts": 1}}
    assert launcher.promote(state, "a", 1.0) is None
    new = launcher.promote(state, "b", 1.0)
    assert new is not None
    assert new["current"]["env"] == "b" and new["previous"]["env"] == "a" and new["trial"] is None
    assert new["last_trial"]["outcome"] == "committed"


def test_wanted_version() -> None:
    assert wanted_version(None, A, [], True) == (None, None)
    assert wanted_version(A, A, [], True) == (None, None)
    assert wanted_version(B, A, [B], True) == (None, None)
    assert wanted_version(B, A, [], True) == (B, None)
    version, why = wanted_version(B, A, [], False)
    assert version is None and why is not None and "agent-launch" in why


def test_platform_tags_take_older_glibc_wheels() -> None:
    tags = platform_tags("manylinux_2_28_aarch64")
    assert tags[0] == "manylinux_2_28_aarch64" and "manylinux_2_17_aarch64" in tags and "manylinux2014_aarch64" in tags
    assert platform_tags("manylinux2014_x86_64")[0] == "manylinux_2_17_x86_64"
    from edgefleet.errors import UsageError

    with pytest.raises(UsageError, match="manylinux"):
        platform_tags("linux_armv7l")


def test_a_bundle_member_outside_its_layout_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        data = b"x"
        ti = tarfile.TarInfo("../escape")
        ti.size = len(data)
        tar.addfile(ti, io.BytesIO(data))
    with pytest.raises(launcher.BundleError, match="unexpected member"):
        launcher.read_bundle(bad, tmp_path / "out")


# ------------------------------------------------------------------------------------------------ end to end


def _patched_wheel(wheel: Path, version: str, out: Path, *, fail_at_start: bool) -> Path:
    """``wheel`` as version ``version`` (dist-info, METADATA, __version__, RECORD all agree), optionally with
    ``edgefleet agent`` ending at startup."""
    old = _wheel_version(wheel)
    old_info, new_info = f"edgefleet-{old}.dist-info/", f"edgefleet-{version}.dist-info/"
    files: dict[str, bytes] = {}
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            data = z.read(name)
            if name == "edgefleet/__init__.py":
                data = re.sub(rb'__version__ = "[^"]+"', f'__version__ = "{version}"'.encode(), data)
            elif name == "edgefleet/cli/agent.py" and fail_at_start:
                data += _B_FAILS.encode()
            elif name == old_info + "METADATA":
                data = re.sub(rb"(?m)^Version: .+$", f"Version: {version}".encode(), data)
            files[name.replace(old_info, new_info)] = data
    record = new_info + "RECORD"
    rows = io.StringIO()
    w = csv.writer(rows, lineterminator="\n")
    for name, data in files.items():
        if name == record:
            continue
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        w.writerow([name, f"sha256={digest}", len(data)])
    w.writerow([record, "", ""])
    files[record] = rows.getvalue().encode()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"edgefleet-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


def _wheel_version(wheel: Path) -> str:
    return wheel.name.split("-")[1]


def _wheelhouse() -> tuple[Path, bool]:
    """The dependency wheel cache and whether it is filled for the current constraints.txt."""
    key = hashlib.sha256((ROOT / "constraints.txt").read_bytes()).hexdigest()[:16]
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    wh = home / "edgefleet-tests" / f"agent-wheelhouse-{key}"
    return wh, (wh / ".filled").exists()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, BuiltBundle]:
    out = tmp_path_factory.mktemp("bundles")
    wh, filled = _wheelhouse()
    common: dict[str, Any] = {"constraints": ROOT / "constraints.txt", "wheelhouse": wh}
    a = build_agent_bundle(out / "A", source=ROOT, offline=filled, **common)
    (wh / ".filled").touch()
    with tarfile.open(a.path) as tar:
        tar.extract(f"wheels/edgefleet-{A}-py3-none-any.whl", out / "A-wheel", filter="data")
    wheel = out / "A-wheel" / "wheels" / f"edgefleet-{A}-py3-none-any.whl"
    built = {A: a}
    for version, fails in ((A2, False), (B, True)):
        patched = _patched_wheel(wheel, version, out / f"{version}-wheel", fail_at_start=fails)
        built[version] = build_agent_bundle(out / version, source=ROOT, offline=True, wheel=patched, **common)
    return built


@pytest.fixture
@starts_processes
def fleet_with_model(tmp_path: Path, mlp_path: Path, digits: Any) -> Iterator[Fleet]:
    f = Fleet(tmp_path / "cp")
    f.publish(*make_packages(mlp_path, digits.x_test, tmp_path / "pkgs", ["1.0.0"]).values())
    yield f
    f.close()


class Launched:
    """``agent-launch run`` (the copy installed into HOME, as on a device) supervising ``edgefleet agent``."""

    def __init__(self, home: Path, args: list[str]) -> None:
        self.home = home
        self.log = open(home.parent / "launch.log", "wb")  # noqa: SIM115  # closed in stop()
        self.proc = subprocess.Popen(
            # two failed starts are enough to give B up (the default, 3, allows for one unlucky start)
            [
                sys.executable,
                str(home / launcher.LAUNCHER),
                "run",
                "--home",
                str(home),
                "--max-starts",
                "2",
                "--",
                *args,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def state(self) -> dict[str, Any]:
        return launcher.load_state(self.home)

    def tail(self) -> str:
        return (self.home.parent / "launch.log").read_text(errors="replace")[-4000:]

    def wait(self, pred: Any, what: str, timeout: float = 90) -> Any:
        def alive_and(pred: Any = pred) -> Any:
            assert self.proc.poll() is None, f"agent-launch ended ({self.proc.returncode}): {self.tail()}"
            return pred()

        try:
            return wait_for(alive_and, timeout, what)
        except AssertionError as err:
            raise AssertionError(f"{err}\n--- agent-launch output:\n{self.tail()}") from None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return int(self.proc.returncode)


def _agent_events(cp: Fleet) -> list[tuple[str, str | None, str | None]]:
    from sqlalchemy import select

    from edgefleet.controlplane.db import UpdateEventRow

    with cp.store.db.session() as s:
        q = select(UpdateEventRow).where(UpdateEventRow.model == AGENT_MODEL).order_by(UpdateEventRow.id)
        return [(e.kind, e.version, e.reason) for e in s.scalars(q)]


@pytest.mark.process
def test_the_agent_updates_itself_falls_back_from_a_broken_agent_and_then_updates(
    bundles: dict[str, BuiltBundle], fleet_with_model: Fleet, tmp_path: Path
) -> None:
    cp = fleet_with_model
    # published with the CLI (B) and the library (A'), as an operator and a release job would
    r = subprocess.run(
        [str(Path(sys.executable).with_name("edgefleet")), "agent-bundle", "publish", str(bundles[B].path),
         "--repo", str(cp.settings.repo), "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["target"] == bundles[B].target
    from edgefleet.repository import Repository

    Repository(cp.settings.repo).add_target(bundles[A2].target, bundles[A2].path, {})

    # the device: bundle A installed with the launcher shipped inside it, as on a Raspberry Pi (docs/operations.md)
    home = tmp_path / "device" / "agent"
    home.mkdir(parents=True)
    with tarfile.open(bundles[A].path) as tar:
        tar.extract(launcher.LAUNCHER, tmp_path / "device", filter="data")
    r = subprocess.run(
        [sys.executable, str(tmp_path / "device" / launcher.LAUNCHER), "install", str(bundles[A].path),
         "--home", str(home), "--no-compile"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (home / launcher.LAUNCHER).is_file() and launcher.load_state(home)["current"]["version"] == A

    data_dir, port = tmp_path / "device" / "data", free_port()
    args = ["--server", cp.url, "--token", cp.enrollment_token(), "--data-dir", str(data_dir),
            "--port", str(port), "--checkin-interval", "0.2", "--telemetry-interval", "0.5"]  # fmt: skip
    dev = Launched(home, args)
    try:
        dev.wait(cp.device_ids, "enrollment")
        cp.pin("1.0.0", probation_seconds=0.3, probation_requests=1000)
        dev.wait(lambda: (state_of(data_dir).get("committed") or {}).get("version") == "1.0.0", "model committed")
        assert cp.record()["agent_version"] == A

        # B: installed, restarted into, fails to start; the launcher takes A back by itself
        cp.configure_group(agent_version=B)
        dev.wait(lambda: (dev.state().get("last_trial") or {}).get("outcome") == "rolled_back", "fallback to A")
        st = dev.state()
        assert st["current"]["version"] == A and st["trial"] is None and B in st["refused"]
        assert f"agent {B} did not come up" in st["last_trial"]["reason"]
        # ... and A, running again, reports it and checks in
        dev.wait(lambda: any(k == "rolled_back" and v == B for k, v, _ in _agent_events(cp)), "rollback reported")
        kinds = [k for k, v, _ in _agent_events(cp) if v == B]
        assert kinds[:4] == ["download_started", "verified", "staged", "switched"], kinds
        seen = cp.record()["last_seen"]
        dev.wait(lambda: cp.record()["last_seen"] != seen, "a check-in after the fallback")
        record = cp.record()
        assert record["agent_version"] == A and record["served"]["version"] == "1.0.0"

        # A': comes up healthy (state loaded, the model served, a check-in answered) and stays
        cp.configure_group(agent_version=A2)
        dev.wait(lambda: (dev.state().get("current") or {}).get("version") == A2, "A' current")
        assert dev.state()["previous"]["version"] == A
        dev.wait(lambda: cp.record()["agent_version"] == A2, "A' reporting")
        dev.wait(lambda: any(k == "committed" and v == A2 for k, v, _ in _agent_events(cp)), "A' committed")
        assert cp.record()["served"]["version"] == "1.0.0"
    finally:
        code = dev.stop()
    assert code == 0, dev.tail()

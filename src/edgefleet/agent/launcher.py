"""``agent-launch``: the small, stable program that starts the device agent from one of its virtual environments and
takes the previous environment back when a new agent does not come up (docs/operations.md, "Updating the agent").

Standard library only, and copied out of every environment when one is installed (``HOME/agent-launch``): it must
keep working whichever environment is current, including one that cannot even import ``edgefleet``.

``HOME`` holds the environments (``envs/<version>-<bundle hash>``) and ``launch.json``, the one state file, always
replaced atomically. Its writers never overlap: the launcher writes only while no agent runs, and an agent writes
only while it runs (to ask for a trial of a new environment, to promote itself once healthy, to mark a rollback
reported). A trial of a new environment ends in one of two ways:

* the new agent comes up (its state loaded, the committed model served, one check-in answered) and promotes itself:
  ``current`` becomes the new environment, ``previous`` the old one;
* it does not, within ``deadline_s`` of its first start or in ``max_starts`` starts (an agent that crashes at once):
  the launcher starts ``current`` again and records the trial ``rolled_back`` with why, which that agent reports.

``run`` supervises the agent as a child process (the fallback needs nothing else); ``run --exec`` replaces itself
with the agent instead and relies on a service manager that restarts it (systemd ``Restart=always``): the start
count then lives in ``launch.json`` and a trial agent ends itself at its deadline.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "BUNDLE_FORMAT",
    "EXIT_RESTART",
    "EXIT_TRIAL_FAILED",
    "BundleError",
    "bundle_target",
    "choose",
    "install_env",
    "load_state",
    "main",
    "promote",
    "read_bundle",
    "save_state",
]

BUNDLE_FORMAT = 1
BUNDLE_NAME = "edgefleet-agent"
BUNDLE_JSON = "bundle.json"
REQUIREMENTS = "requirements.txt"
LAUNCHER = "agent-launch"
STATE = "launch.json"
ENV_HOME = "EDGEFLEET_AGENT_HOME"  # set for the agent: where launch.json is
ENV_NAME = "EDGEFLEET_AGENT_ENV"  # set for the agent: the environment it was started from

EXIT_RESTART = 12  # the agent asked for a trial of a new environment: start again, into it
EXIT_TRIAL_FAILED = 13  # a trial agent not healthy by its deadline ended itself (the --exec mode's watchdog)
EXIT_FOR_GOOD = (10, 11)  # decommissioned, or its credential refused: restarting cannot help
DEFAULT_DEADLINE_S = 300.0
DEFAULT_MAX_STARTS = 3
MAX_REFUSED = 20
_COMPLETE = ".complete"  # written last into an environment: one without it is an install cut short


class BundleError(Exception):
    """An agent bundle that is malformed, does not match its own hashes, or does not install."""


def _log(msg: str) -> None:
    print(f"agent-launch: {msg}", file=sys.stderr, flush=True)


def bundle_target(version: str, platform: str) -> str:
    """The TUF target name of the agent bundle of ``version`` for ``platform`` (a wheel platform tag)."""
    return f"{BUNDLE_NAME}-{version}-{platform}.tar"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- bundles


def read_bundle(tar_path: Path, dest: Path) -> dict[str, Any]:
    """Unpack the bundle ``tar_path`` into ``dest`` and check it: only plain files of the expected names, every
    wheel listed in ``bundle.json`` with the SHA-256 it has. Returns the manifest."""
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for m in tar.getmembers():
                parts = Path(m.name).parts
                ok_name = m.name in (BUNDLE_JSON, REQUIREMENTS, LAUNCHER) or (
                    len(parts) == 2 and parts[0] == "wheels" and parts[1].endswith(".whl")
                )
                if not (m.isfile() and ok_name) and not (m.isdir() and m.name == "wheels"):
                    raise BundleError(f"{tar_path.name}: unexpected member {m.name!r}")
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError) as err:
        raise BundleError(f"{tar_path.name}: not a readable agent bundle: {err}") from None
    try:
        manifest = json.loads((dest / BUNDLE_JSON).read_text())
    except (OSError, ValueError) as err:
        raise BundleError(f"{tar_path.name}: no valid {BUNDLE_JSON}: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{tar_path.name}: bundle format {manifest.get('format')!r}, expected {BUNDLE_FORMAT}")
    listed = {w["file"]: w["sha256"] for w in manifest.get("wheels", [])}
    present = {p.name for p in (dest / "wheels").glob("*.whl")}
    if set(listed) != present:
        raise BundleError(f"{tar_path.name}: wheels {sorted(present ^ set(listed))} not both listed and present")
    for name, sha in listed.items():
        if _sha256(dest / "wheels" / name) != sha:
            raise BundleError(f"{tar_path.name}: {name} does not match its SHA-256 in {BUNDLE_JSON}")
    return manifest


def _pip_wheel(wheels: Path) -> Path:
    found = sorted(wheels.glob("pip-*.whl"))
    if not found:
        raise BundleError("the bundle carries no pip wheel to install itself with")
    return found[-1]


def install_env(
    tar_path: Path,
    home: Path,
    *,
    python: str | None = None,
    compile_bytecode: bool = True,
    timeout_s: float = 900.0,
) -> dict[str, Any]:
    """Install the bundle ``tar_path`` as a fresh virtual environment under ``HOME/envs`` (kept if that exact
    bundle is installed already) and return its record for ``launch.json``. Offline: pip runs from the bundle's own
    pip wheel, with no index and no pip configuration, and installs exactly the hashed wheels of the bundle."""
    envs = home / "envs"
    envs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".bundle-", dir=home) as tmp:
        unpacked = Path(tmp)
        manifest = read_bundle(tar_path, unpacked)
        name = f"{manifest['version']}-{_sha256(tar_path)[:12]}"
        record = {
            "env": name,
            "version": str(manifest["version"]),
            "platform": str(manifest["platform"]),
            "python": str(manifest["python"]),
        }
        final = envs / name
        if (final / _COMPLETE).exists():
            return record
        shutil.rmtree(final, ignore_errors=True)  # an install cut short: never started, so started afresh
        py = python or sys.executable
        environ = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        steps: list[list[str]] = [
            [py, "-m", "venv", "--without-pip", str(final)],
            [
                str(final / "bin" / "python"),
                str(_pip_wheel(unpacked / "wheels") / "pip"),
                "install",
                "--no-index",
                "--find-links",
                str(unpacked / "wheels"),
                "--no-deps",
                "--require-hashes",
                "--only-binary=:all:",
                "-r",
                str(unpacked / REQUIREMENTS),
                *([] if compile_bytecode else ["--no-compile"]),
            ],
            [str(final / "bin" / "python"), "-c", "import edgefleet.agent.agent"],
        ]
        for argv in steps:
            try:
                r = subprocess.run(argv, env=environ, capture_output=True, text=True, timeout=timeout_s)
            except (OSError, subprocess.TimeoutExpired) as err:
                shutil.rmtree(final, ignore_errors=True)
                raise BundleError(f"installing agent {manifest['version']} failed: {err}") from None
            if r.returncode != 0:
                shutil.rmtree(final, ignore_errors=True)
                tail = " ".join((r.stderr or r.stdout).strip().splitlines()[-3:])[-600:]
                raise BundleError(f"installing agent {manifest['version']} failed ({Path(argv[1]).name}): {tail}")
        (final / _COMPLETE).write_text(json.dumps(record))  # last: an environment without it never starts
        launcher = unpacked / LAUNCHER
        if not (home / LAUNCHER).exists() and launcher.exists():
            shutil.copyfile(launcher, home / LAUNCHER)
        return record


# ---------------------------------------------------------------------------------------------- state


def load_state(home: Path) -> dict[str, Any]:
    try:
        state = json.loads((home / STATE).read_text())
    except FileNotFoundError:
        return {"current": None, "previous": None, "trial": None, "last_trial": None, "refused": []}
    return dict(state)


def save_state(home: Path, state: dict[str, Any]) -> None:
    """Replace ``launch.json`` atomically and durably (a power cut leaves the old file or the new one)."""
    path = home / STATE
    fd, tmp = tempfile.mkstemp(dir=home, prefix=f".{STATE}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(state, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(home, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def choose(
    state: dict[str, Any], now: float, max_starts: int = DEFAULT_MAX_STARTS
) -> tuple[dict[str, Any] | None, dict[str, Any], str]:
    """Which environment to start now, the state to save before starting it, and what to say about it. Pure.

    A trial past its deadline, or started ``max_starts`` times already without promoting itself, is over: the
    current environment starts again and the trial is recorded ``rolled_back``. Otherwise a trial is started (its
    deadline runs from its first start)."""
    trial = state.get("trial")
    current = state.get("current")
    if trial is None:
        return current, state, ""
    starts = int(trial.get("starts", 0))
    deadline = trial.get("deadline")
    why = None
    if deadline is not None and now >= float(deadline):
        why = f"agent {trial['version']} did not come up healthy within {float(trial['deadline_s']):g} s"
    elif starts >= max_starts:
        why = f"agent {trial['version']} did not come up: {starts} start(s)"
    if why is not None:
        if trial.get("last_exit") is not None:
            why += f", the last ended with exit code {trial['last_exit']}"
        new = {
            **state,
            "trial": None,
            "last_trial": {
                "version": trial["version"],
                "env": trial["env"],
                "outcome": "rolled_back",
                "reason": why,
                "at": now,
                "reported": False,
            },
            "refused": [*state.get("refused", [])[-(MAX_REFUSED - 1) :], trial["version"]],
        }
        back = current["version"] if current else "nothing"
        return current, new, f"rolled back to agent {back}: {why}"
    trial = {**trial, "starts": starts + 1}
    if deadline is None:
        trial["deadline"] = now + float(trial.get("deadline_s", DEFAULT_DEADLINE_S))
    env = {k: trial[k] for k in ("env", "version", "platform", "python") if k in trial}
    return env, {**state, "trial": trial}, f"trying agent {trial['version']} (start {starts + 1} of {max_starts})"


def promote(state: dict[str, Any], env: str, now: float) -> dict[str, Any] | None:
    """The state after the trial of ``env`` came up healthy (None: ``env`` is not on trial). Pure."""
    trial = state.get("trial")
    if trial is None or trial.get("env") != env:
        return None
    record = {k: trial[k] for k in ("env", "version", "platform", "python") if k in trial}
    return {
        **state,
        "current": record,
        "previous": state.get("current"),
        "trial": None,
        "last_trial": {"version": trial["version"], "env": env, "outcome": "committed", "at": now, "reported": True},
    }


def _prune(home: Path, state: dict[str, Any]) -> None:
    """Remove environments nothing refers to any more (and installs cut short)."""
    keep = {r["env"] for r in (state.get("current"), state.get("previous"), state.get("trial")) if r}
    envs = home / "envs"
    if not envs.is_dir():
        return
    for p in envs.iterdir():
        if p.is_dir() and p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- running


def _agent_argv(home: Path, env: dict[str, Any], agent_args: Sequence[str]) -> list[str]:
    return [str(home / "envs" / env["env"] / "bin" / "edgefleet"), "agent", *agent_args]


def run(
    home: Path,
    agent_args: Sequence[str],
    *,
    exec_mode: bool = False,
    max_starts: int = DEFAULT_MAX_STARTS,
    poll_s: float = 0.25,
    clock: Callable[[], float] = time.time,
) -> int:
    """Start the agent from the environment :func:`choose` picks, again and again: after a restart into a new
    environment (exit :data:`EXIT_RESTART`), after a crash (with a growing pause), until it stops for good."""
    stopping: list[int] = []
    child: list[subprocess.Popen[bytes]] = []

    def on_signal(signum: int, _frame: Any) -> None:
        stopping.append(signum)
        if child and child[0].poll() is None:
            child[0].send_signal(signum)

    if not exec_mode:
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    pause = 1.0
    while True:
        state = load_state(home)
        env, state, note = choose(state, clock(), max_starts)
        _prune(home, state)
        save_state(home, state)
        if note:
            _log(note)
        if env is None:
            _log(f"no agent environment is installed in {home}: run `agent-launch install BUNDLE --home {home}`")
            return 2
        argv = _agent_argv(home, env, agent_args)
        environ = {**os.environ, ENV_HOME: str(home), ENV_NAME: env["env"]}
        if exec_mode:
            os.execve(argv[0], argv, environ)
        proc = subprocess.Popen(argv, env=environ)
        child[:] = [proc]
        code = _wait(home, proc, env["env"], poll_s, clock)
        child.clear()
        if stopping:
            return 0
        state = load_state(home)
        trial = state.get("trial")
        if trial is not None and trial.get("env") == env["env"]:
            save_state(home, {**state, "trial": {**trial, "last_exit": code}})
        if code in EXIT_FOR_GOOD:
            return code
        if code == EXIT_RESTART:
            pause = 1.0
            continue
        if code == 0:
            return 0
        on_trial = trial is not None and trial.get("env") == env["env"]
        _log(f"agent {env['version']} ended with exit code {code}; starting again in {0.2 if on_trial else pause:g} s")
        time.sleep(0.2 if on_trial else pause)
        pause = 1.0 if on_trial else min(pause * 2, 60.0)


def _wait(home: Path, proc: subprocess.Popen[bytes], env: str, poll_s: float, clock: Callable[[], float]) -> int:
    """Wait for the agent to end; a trial agent still on trial at its deadline is stopped (then killed)."""
    while True:
        try:
            return proc.wait(poll_s)
        except subprocess.TimeoutExpired:
            pass
        trial = load_state(home).get("trial")
        if trial is None or trial.get("env") != env or clock() < float(trial.get("deadline") or "inf"):
            continue
        _log(f"agent {trial['version']} is not healthy at its deadline: stopping it")
        proc.terminate()
        try:
            return proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="agent-launch", description="Start the edgefleet agent from its current virtual environment."
    )
    sub = p.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("install", help="install an agent bundle (.tar) as the current environment")
    ins.add_argument("bundle", type=Path)
    ins.add_argument("--home", type=Path, required=True, help="where the environments and launch.json live")
    ins.add_argument(
        "--no-compile", action="store_true", help="skip byte-compiling, here and in later updates (slower starts)"
    )
    ins.add_argument(
        "--deadline",
        type=float,
        default=None,
        help=f"seconds a new agent has to come up healthy before the previous one is started again, in later "
        f"updates (default {DEFAULT_DEADLINE_S:g})",
    )
    r = sub.add_parser("run", help="run the agent (arguments after -- go to `edgefleet agent`)")
    r.add_argument("--home", type=Path, required=True)
    r.add_argument("--exec", action="store_true", help="replace this process with the agent (needs a restarter)")
    r.add_argument("--max-starts", type=int, default=DEFAULT_MAX_STARTS, help="starts of a new agent before it is "
                   f"given up (default {DEFAULT_MAX_STARTS})")  # fmt: skip
    r.add_argument("agent_args", nargs=argparse.REMAINDER)
    st = sub.add_parser("status", help="print launch.json")
    st.add_argument("--home", type=Path, required=True)
    a = p.parse_args(argv)
    home = a.home.resolve()
    if a.command == "status":
        print(json.dumps(load_state(home), indent=1, sort_keys=True))
        return 0
    if a.command == "install":
        home.mkdir(parents=True, exist_ok=True)
        try:
            record = install_env(a.bundle, home, compile_bytecode=not a.no_compile)
        except BundleError as err:
            _log(str(err))
            return 2
        state = load_state(home)
        if (state.get("current") or {}).get("env") != record["env"]:
            state = {**state, "current": record, "previous": state.get("current"), "trial": None}
        state["compile"] = not a.no_compile
        if a.deadline is not None:
            state["deadline_s"] = a.deadline
        save_state(home, state)
        if not (home / LAUNCHER).exists():
            shutil.copyfile(__file__, home / LAUNCHER)
        _log(f"agent {record['version']} installed in {home / 'envs' / record['env']} and current")
        return 0
    args = list(a.agent_args)
    if args[:1] == ["--"]:
        args = args[1:]
    return run(home, args, exec_mode=a.exec, max_starts=max(1, a.max_starts))


if __name__ == "__main__":
    sys.exit(main())

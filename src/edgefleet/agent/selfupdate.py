"""The agent updates itself: A/B virtual environments under ``agent-launch`` (``agent/launcher.py``;
docs/operations.md, "Updating the agent").

When the configuration document names an agent version (``DeviceConfig.agent_version``: the group's, or the one an
agent rollout gives this device, which the control plane renders into the device's copy) other than this one, the
agent fetches the bundle ``edgefleet-agent-<version>-<platform>.tar`` through TUF (verified as a model package is),
installs it as a fresh environment beside its own, records the trial in ``launch.json`` and exits
with :data:`~edgefleet.agent.launcher.EXIT_RESTART`; the launcher starts the new environment. The new agent
promotes itself once it is healthy: started (its state loaded, the committed model served) and one check-in
answered. If it is not healthy in time, or does not start at all, the launcher starts the previous environment
again, and that agent reports the rollback. A version that failed is not tried again by this device.

Events go out as any update's do, with ``model`` :data:`AGENT_MODEL`: ``download_started``, ``verified``,
``staged`` and ``switched`` from the old agent, ``committed`` from the new one, or ``rolled_back`` (with the
launcher's reason) or ``refused`` from the old one (also when it cannot update itself, not started by agent-launch).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet import __version__
from edgefleet.agent import launcher
from edgefleet.agent.updater import Offline
from edgefleet.protocol import DesiredState, EventKind

if TYPE_CHECKING:
    from edgefleet.agent.agent import Agent

__all__ = ["AGENT_MODEL", "SelfUpdater", "wanted_version"]

log = logging.getLogger("edgefleet.agent")

AGENT_MODEL = "edgefleet-agent"  # the ``model`` of the agent's own update events


def wanted_version(
    desired: str | None, running: str, refused: list[str], launched: bool
) -> tuple[str | None, str | None]:
    """The agent version to install now (or None) and, when one is wanted but cannot be, why. Pure."""
    if desired is None or desired == running:
        return None, None
    if desired in refused:
        return None, None  # failed here before: reported then, not tried again
    if not launched:
        return None, (
            f"agent {desired} is wanted, but this agent was not started by agent-launch and cannot update itself "
            "(docs/operations.md, Updating the agent)"
        )
    return desired, None


class SelfUpdater:
    """One agent's side of the A/B update. ``home`` is the launcher's folder (None: not started by it)."""

    def __init__(self, agent: Agent, home: Path | None = None, env: str | None = None) -> None:
        self.agent = agent
        given = os.environ.get(launcher.ENV_HOME)
        self.home = home or (Path(given) if given else None)
        self.env = env or os.environ.get(launcher.ENV_NAME)
        self.on_trial = False
        self._task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._said: str | None = None

    def _state(self) -> dict[str, Any]:
        assert self.home is not None
        return launcher.load_state(self.home)

    def on_start(self) -> None:
        """Report how the last trial ended (once), and arm the deadline when this agent is itself on trial."""
        if self.home is None or self.env is None:
            return
        state = self._state()
        trial = state.get("trial")
        self.on_trial = trial is not None and trial.get("env") == self.env
        last = state.get("last_trial")
        if last and not last.get("reported") and last.get("outcome") == "rolled_back":
            self.agent.event(EventKind.rolled_back, last.get("reason"), AGENT_MODEL, last.get("version"))
            log.warning("agent %s was rolled back: %s", last.get("version"), last.get("reason"))
            launcher.save_state(self.home, {**state, "last_trial": {**last, "reported": True}})
        if self.on_trial and trial is not None and trial.get("deadline") is not None:
            # the supervising launcher stops a trial at its deadline; under `agent-launch --exec` nobody else would
            self._watchdog = asyncio.get_running_loop().create_task(self._deadline(float(trial["deadline"])))

    async def _deadline(self, deadline: float) -> None:
        await asyncio.sleep(max(0.0, deadline - time.time()))
        if self.on_trial:
            self.agent.exit_code = launcher.EXIT_TRIAL_FAILED
            self.agent.exit_message = f"agent {__version__} is not healthy at its deadline"
            log.error("%s: ending, for agent-launch to start the previous agent", self.agent.exit_message)
            self.agent.request_stop()

    def stop(self) -> None:
        for t in (self._task, self._watchdog):
            if t is not None:
                t.cancel()

    def after_checkin(self, d: DesiredState | None) -> None:
        """Called after each answered check-in: promote this agent if it is on trial and healthy, and start an
        update of the agent when the desired state wants another version."""
        if self.on_trial and self._healthy():
            self._promote()
        want = self.agent.config.agent_version
        refused = self._state().get("refused", []) if self.home is not None else []
        version, why = wanted_version(want, __version__, refused, self.home is not None and self.env is not None)
        if why is not None and why != self._said:
            self._said = why
            log.warning("%s", why)
            # once per process: an agent rollout that wants this version hears why it never comes (a failure)
            self.agent.event(EventKind.refused, why, AGENT_MODEL, want)
        if version is None or d is None or self._task is not None or self.on_trial:
            return
        self._task = asyncio.get_running_loop().create_task(self._update(d, version))

    def _healthy(self) -> bool:
        a = self.agent
        return a.state.active is None or a.service.ready

    def _promote(self) -> None:
        assert self.home is not None and self.env is not None
        new = launcher.promote(self._state(), self.env, time.time())
        self.on_trial = False
        if self._watchdog is not None:
            self._watchdog.cancel()
        if new is None:
            return
        launcher.save_state(self.home, new)
        self.agent.event(EventKind.committed, f"agent {__version__} came up healthy", AGENT_MODEL, __version__)
        log.info("agent %s came up healthy: it is the current environment now", __version__)

    async def _update(self, d: DesiredState, version: str) -> None:
        assert self.home is not None
        home = self.home
        a = self.agent
        loop = asyncio.get_running_loop()
        current = self._state().get("current") or {}
        platform = current.get("platform")
        try:
            if not platform:
                raise launcher.BundleError(f"{launcher.STATE} names no current environment to take the platform of")
            name = launcher.bundle_target(version, platform)
            a.event(EventKind.download_started, None, AGENT_MODEL, version)
            client = await a.pipeline.refresh_metadata(d)
            downloads = self.home / "downloads"
            path = await loop.run_in_executor(None, client.download, name, downloads)
            a.event(EventKind.verified, None, AGENT_MODEL, version)
            compile_bytecode = bool(self._state().get("compile", True))
            try:
                record = await loop.run_in_executor(
                    None, lambda: launcher.install_env(path, home, compile_bytecode=compile_bytecode)
                )
            finally:
                path.unlink(missing_ok=True)
            if record["version"] != version:
                raise launcher.BundleError(f"{name} holds agent {record['version']}, not {version}")
            a.event(EventKind.staged, f"installed in {record['env']}", AGENT_MODEL, version)
            state = self._state()
            deadline_s = float(state.get("deadline_s", launcher.DEFAULT_DEADLINE_S))
            launcher.save_state(self.home, {**state, "trial": {**record, "starts": 0, "deadline_s": deadline_s}})
            a.event(EventKind.switched, f"restarting into agent {version}", AGENT_MODEL, version)
            log.info("agent %s installed: restarting into it", version)
            a.exit_code, a.exit_message = launcher.EXIT_RESTART, f"restarting into agent {version}"
            a.request_stop()
        except asyncio.CancelledError:
            raise
        except Offline as err:
            log.warning("agent update to %s waits: %s", version, err)
        except Exception as err:
            reason = f"agent {version} refused: {err}"
            log.warning("%s", reason)
            a.event(EventKind.refused, reason, AGENT_MODEL, version)
            state = self._state()
            launcher.save_state(self.home, {**state, "refused": [*state.get("refused", [])[-19:], version]})
        finally:
            self._task = None

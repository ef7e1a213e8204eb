"""Hybrid edge/cloud routing: where one request is answered, as a pure decision (ADR 0105, docs/agent.md).

:func:`route` takes the policy (:class:`Policy`, from the group's ``DeviceConfig.routing`` or the standalone
flags) and what is true right now (:class:`Facts`: is a local worker up, how many requests wait, is a rollback
under way, the local answer's top-1 probability and the package's threshold, whether the remote budget has room)
and says ``local``, ``remote`` or ``none`` (nothing can answer: a 503). It does no I/O; :class:`Budget` is the
sliding minute of remote calls, with the time passed in. The agent (``service.py``, ``remote.py``) gathers the
facts, spends the budget and makes the call.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["POLICIES", "Budget", "Facts", "Policy", "Route", "route", "top1_probability"]

POLICIES = ("local", "fallback", "confidence")
Target = Literal["local", "remote", "none"]


@dataclass(frozen=True)
class Policy:
    """Where requests may go. ``remote_url`` None: always local, whatever ``policy`` says."""

    policy: str = "local"  # local | fallback | confidence
    remote_url: str | None = None
    remote_model: str | None = None  # the model's name at the remote; None: the local model's
    timeout_s: float = 2.0
    budget_per_minute: int = 60
    queue_depth: int | None = None  # None: the agent's queue size

    @property
    def remote(self) -> bool:
        """Whether any request may go remote under this policy."""
        return self.remote_url is not None and self.policy != "local"

    @classmethod
    def from_doc(cls, doc: Any) -> Policy:
        """From a ``protocol.RemoteRouting`` (or None: local only)."""
        if doc is None:
            return cls()
        return cls(
            policy=doc.policy,
            remote_url=doc.remote_url,
            remote_model=doc.remote_model,
            timeout_s=doc.timeout_s,
            budget_per_minute=doc.budget_per_minute,
            queue_depth=doc.queue_depth,
        )


@dataclass(frozen=True)
class Facts:
    """What is true for one request when it is routed."""

    worker_up: bool = True  # a local worker can take it now
    queued: int = 0  # requests waiting for the local worker
    queue_limit: int = 64  # the agent's queue size: at it, the local answer is a 503 (overloaded)
    rolling_back: bool = False  # probation failed and the committed version is not serving yet
    confidence: float | None = None  # the local answer's top-1 probability, when there is one
    threshold: float | None = None  # the package's ``remote_below`` (a ``confidence`` post-processing step)
    budget_left: bool = True  # the sliding minute of remote calls has room


@dataclass(frozen=True)
class Route:
    to: Target
    reason: str
    unsent: bool = False  # routing wanted the remote and did not send (the budget is spent): counted


def route(policy: Policy, facts: Facts) -> Route:
    """Where this request is answered. ``none`` only when the remote is wanted, cannot be had and no local worker
    can answer either (the caller answers 503, naming the reason)."""
    queue_at = min(policy.queue_depth or facts.queue_limit, facts.queue_limit)
    overloaded = facts.queued >= queue_at
    local_can = facts.worker_up and facts.queued < facts.queue_limit
    if not policy.remote:
        return Route("local", "routing policy: local only")
    why: str | None = None
    if not facts.worker_up:
        why = "the local worker is down"
    elif facts.rolling_back:
        why = "a probation rollback is under way"
    elif overloaded:
        why = f"{facts.queued} requests wait locally (fallback at {queue_at})"
    elif (
        policy.policy == "confidence"
        and facts.confidence is not None
        and facts.threshold is not None
        and facts.confidence < facts.threshold
    ):
        why = f"local top-1 probability {facts.confidence:.3g} is under {facts.threshold:g}"
    if why is None:
        return Route("local", "the local worker answers")
    if facts.budget_left:
        return Route("remote", why)
    spent = f"{why}, but the remote budget of {policy.budget_per_minute} calls a minute is spent"
    return Route("local" if local_can else "none", spent, unsent=True)


class Budget:
    """At most ``per_minute`` remote calls in any 60 s: the times of the calls in the last minute (monotonic
    seconds, passed in), so the bound holds over every sliding minute, not per calendar minute."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._calls: deque[float] = deque()

    def _expire(self, now: float) -> None:
        calls = self._calls
        while calls and calls[0] <= now - 60.0:
            calls.popleft()

    def left(self, now: float) -> int:
        self._expire(now)
        return max(0, self.per_minute - len(self._calls))

    def spend(self, now: float) -> bool:
        """Take one call if the minute has room; False (nothing taken) when it has not."""
        if self.left(now) <= 0:
            return False
        self._calls.append(now)
        return True


def top1_probability(probs: Any, axis: int = -1) -> float | None:
    """The lowest, over a batch, of each item's top-1 probability along ``axis`` (a batch goes remote when any of
    its items is unsure). None for an empty tensor or one that is not numeric."""
    import numpy as np

    arr = np.asarray(probs)
    if arr.size == 0 or arr.dtype.kind not in "fiu":
        return None
    try:
        return float(np.min(np.max(arr, axis=axis)))
    except (ValueError, np.exceptions.AxisError):
        return None

"""Staged rollouts gated on runtime metrics: plan, start, pause, roll back — of a model version, or (``kind``
agent) of the agent bundle (controlplane/agent_rollout.py)."""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import Field, model_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefleet.controlplane import agent_rollout, audit, reconciler, registry, schemas
from edgefleet.controlplane.agent_rollout import AGENT_MODEL, KIND_AGENT, KIND_MODEL
from edgefleet.controlplane.api._paging import PAGED, Page, after, finish
from edgefleet.controlplane.api._shared import _OUT, _In, _Override, _release_check, _who
from edgefleet.controlplane.context import Context
from edgefleet.controlplane.db import (
    Rollout,
    RolloutDevice,
    RolloutTransition,
    utcnow,
)
from edgefleet.controlplane.rollout import RolloutPlan, RolloutPolicy, RolloutState
from edgefleet.errors import ConflictError, NotFoundError

router = APIRouter()


class RolloutCreate(_Override):
    kind: str = Field(
        KIND_MODEL,
        pattern="^(model|agent)$",
        description="model: a model version; agent: the agent bundle of agent version `version` (no model)",
    )
    model: str | None = Field(None, min_length=1, max_length=128, description="the model (kind model)")
    version: str = Field(min_length=1, max_length=64)
    tier: str | None = Field(None, max_length=64)
    channel: str | None = Field(None, pattern="^(dev|canary|stable)$")
    policy: RolloutPolicy = Field(default_factory=RolloutPolicy)

    @model_validator(mode="after")
    def _target(self) -> RolloutCreate:
        if self.kind == KIND_AGENT:
            if self.model not in (None, AGENT_MODEL):
                raise ValueError(f"an agent rollout names no model (it rolls out {AGENT_MODEL})")
            self.model = AGENT_MODEL
        elif self.model is None:
            raise ValueError("a model rollout needs `model`")
        elif self.model == AGENT_MODEL:
            raise ValueError(f'{AGENT_MODEL} is the agent: start it with "kind": "agent"')
        return self

    @property
    def target(self) -> str:
        assert self.model is not None  # set by the validator
        return self.model


class ActionBody(_In):
    reason: str | None = Field(None, max_length=2000)


def rollout_dict(s: Any, r: Rollout, *, full: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "rollout_id": r.id,
        "kind": r.kind or KIND_MODEL,
        "model": r.model,
        "version": r.version,
        "tier": r.tier,
        "channel": r.channel,
        "state": r.state,
        "wave": r.wave,
        "waves": r.policy.get("waves"),
        "reason": r.reason,
        "created_at": r.created_at.isoformat(),
        "created_by": r.created_by,
        "wave_started_at": r.wave_started_at.isoformat(),
        "blocked": r.reason if r.state == RolloutState.blocked.value else None,
        # the last error of this rollout's own reconcile step (None once a step goes through again)
        "step_error": r.step_error,
    }
    if full:
        out["policy"] = r.policy
        out["devices"] = [
            {"device_id": x.device_id, "wave": x.wave, "previous_version": x.previous_version, "reverted": x.reverted}
            for x in s.scalars(select(RolloutDevice).where(RolloutDevice.rollout_id == r.id))
        ]
        out["transitions"] = [
            {
                "seq": t.seq,
                "from": t.from_state,
                "to": t.to_state,
                "wave": t.wave,
                "reason": t.reason,
                "actor": t.actor,
                "at": t.at.isoformat(),
            }
            for t in s.scalars(
                select(RolloutTransition).where(RolloutTransition.rollout_id == r.id).order_by(RolloutTransition.seq)
            )
        ]
        out["shadow"] = shadow_dict(s, r)
    return out


def shadow_dict(s: Any, r: Rollout) -> dict[str, Any] | None:
    """The rollout's shadow phase, tier by tier (controlplane/shadow.py); None without one."""
    if r.shadow_state is None:
        return None
    return {
        "state": r.shadow_state,
        "started_at": r.shadow_started_at.isoformat() if r.shadow_started_at else None,
        "tiers": [
            {
                "tier": t.tier,
                "devices": t.devices,
                "compared": t.compared,
                "agreed": t.agreed,
                "agreement": t.agreement,
                "errors": t.errors,
                "dropped": t.dropped,
                "p95_ms": t.p95_ms,
                "halves": [{"compared": c, "agreed": a} for c, a in t.halves],
            }
            for t in reconciler.shadow_figures(s, r)
        ],
    }


_ACTIVE = (RolloutState.running.value, RolloutState.paused.value, RolloutState.blocked.value)


def plan_dict(p: RolloutPlan, waves: list[float]) -> dict[str, Any]:
    return {
        "waves": [
            {"wave": i, "percent": pct, "devices": list(ids)}
            for i, (pct, ids) in enumerate(zip(waves, p.waves, strict=True))
        ],
        "devices": p.devices,
        "already_on_version": list(p.already),
        "excluded": dict(sorted(p.excluded.items())),
        "blocked": p.blocked,
    }


def _agent_platforms(ctx: Context, version: str) -> frozenset[str]:
    """The platforms agent ``version``'s bundle is published for; NotFoundError when it is not in the repository."""
    bundles = agent_rollout.bundle_versions((t.name, t.custom) for t in ctx.repo.targets())
    platforms = bundles.get(version)
    if not platforms:
        have = ", ".join(sorted(bundles)) or "none"
        raise NotFoundError(
            f"no agent bundle {version} in the repository (published: {have}): build it with `edgefleet agent-bundle "
            "build` and sign it in with `edgefleet agent-bundle publish`"
        )
    return platforms


def _other_kind_active(s: Session, kind: str) -> None:
    """One change judged at a time: an agent rollout and a model rollout running together would each read the
    other's effect in its treatment's telemetry."""
    q = select(Rollout.id, Rollout.model).where(Rollout.state.in_(_ACTIVE))
    q = q.where(Rollout.kind == KIND_AGENT) if kind == KIND_MODEL else q.where(Rollout.kind != KIND_AGENT)
    row = s.execute(q.limit(1)).first()
    if row is not None:
        what = "an agent rollout" if kind == KIND_MODEL else f"a rollout of {row[1]}"
        raise ConflictError(
            f"{what} ({row[0]}) is still active: finish, abort or roll it back first (both at once would confound "
            "their judgements)"
        )


@router.post("/rollouts/plan", response_model=schemas.RolloutPlanPreview, tags=["rollouts"], **_OUT)
def plan_rollout(body: RolloutCreate, ctx: Context) -> dict[str, Any]:
    """``rollout start --dry-run``: the devices each wave would move on today's fleet; starts nothing."""
    if body.kind == KIND_AGENT:
        platforms = _agent_platforms(ctx, body.version)
        with ctx.store.db.session() as s:
            p = reconciler.plan(
                s,
                AGENT_MODEL,
                body.version,
                tier=body.tier,
                channel=body.channel,
                policy=body.policy,
                agent_platforms=platforms,
            )
            return {
                "kind": KIND_AGENT,
                "model": AGENT_MODEL,
                "version": body.version,
                "tier": body.tier,
                "channel": body.channel,
                **plan_dict(p, body.policy.waves),
                # the release policy judges model packages (gate, bench); an agent bundle has neither
                "release": {"allowed": True, "refusal": None},
            }
    with ctx.store.db.session() as s:
        mv = registry.get_version(s, body.target, body.version)
        p = reconciler.plan(s, body.target, body.version, tier=body.tier, channel=body.channel, policy=body.policy)
        refusal = registry.release_refusal_of(s, mv)
        return {
            "kind": KIND_MODEL,
            "model": body.model,
            "version": body.version,
            "tier": body.tier,
            "channel": body.channel,
            **plan_dict(p, body.policy.waves),
            "release": {"allowed": refusal is None, "refusal": refusal},
        }


@router.post("/rollouts", status_code=201, response_model=schemas.RolloutStarted, tags=["rollouts"], **_OUT)
def start_rollout(body: RolloutCreate, request: Request, ctx: Context) -> dict[str, Any]:
    st = ctx.store
    who = _who(request)
    agent = body.kind == KIND_AGENT
    platforms = _agent_platforms(ctx, body.version) if agent else None
    with st.db.session() as s:
        forced = None
        if not agent:  # the release policy judges model packages (gate, bench); an agent bundle has neither
            mv = registry.get_version(s, body.target, body.version)
            forced = _release_check(s, mv, body, who, "rollout.start")
        active = s.scalar(select(Rollout.id).where(Rollout.model == body.target, Rollout.state.in_(_ACTIVE)))
        if active is not None:
            raise ConflictError(f"rollout {active} of {body.target} is still active: finish, abort or roll it back")
        _other_kind_active(s, body.kind)
        now = utcnow()
        r = Rollout(
            id="ro-" + secrets.token_hex(6),
            kind=body.kind,
            model=body.target,
            version=body.version,
            tier=body.tier,
            channel=body.channel,
            policy=body.policy.model_dump(mode="json"),
            state=RolloutState.draft.value,
            wave=0,
            wave_started_at=now,
            created_by=who.actor,
            created_at=now,
        )
        s.add(r)
        s.flush()
        audit.record(
            s,
            who.actor,
            "rollout.start",
            r.id,
            kind=body.kind,
            model=body.target,
            version=body.version,
            tier=body.tier,
            channel=body.channel,
            policy=r.policy,
            forced=forced is not None,
        )
        why = f"started by {who.actor}"
        if forced is not None:
            why += f", overriding the release policy: {(body.reason or '').strip()}"
        reconciler.transition(s, r, RolloutState.running, why, who.actor)
        p = reconciler.plan(
            s,
            body.target,
            body.version,
            tier=body.tier,
            channel=body.channel,
            policy=body.policy,
            agent_platforms=platforms,
        )
        if p.blocked is not None:
            # say so now: the operator who started it is the one to hear that it reaches no device
            reconciler.transition(s, r, RolloutState.blocked, p.blocked, who.actor)
        out = rollout_dict(s, r)
        out["plan"] = plan_dict(p, body.policy.waves)
        out["warning"] = p.blocked
    st.wake()
    return out


@router.get("/rollouts", response_model=list[schemas.Rollout], tags=["rollouts"], **_OUT, **PAGED)
def list_rollouts(ctx: Context, page: Page, request: Request, response: Response) -> list[dict[str, Any]]:
    """Newest first, a page at a time."""
    order = (Rollout.created_at, Rollout.id)
    q = select(Rollout).order_by(*(c.desc() for c in order)).limit(page.limit + 1)
    if (last := page.key(datetime, str)) is not None:
        q = q.where(after(order, last, desc=True))
    with ctx.store.db.session() as s:
        rows = finish(request, response, page, list(s.scalars(q)), lambda r: (r.created_at, r.id))
        return [rollout_dict(s, r) for r in rows]


@router.get("/rollouts/{rollout_id}", response_model=schemas.RolloutDetail, tags=["rollouts"], **_OUT)
def get_rollout(rollout_id: str, ctx: Context) -> dict[str, Any]:
    with ctx.store.db.session() as s:
        r = s.get(Rollout, rollout_id)
        if r is None:
            raise NotFoundError(f"no rollout {rollout_id}: `edgefleet rollout list` shows them")
        return rollout_dict(s, r, full=True)


def _action(action: str) -> Any:
    def handler(rollout_id: str, request: Request, ctx: Context, body: ActionBody | None = None) -> dict[str, Any]:
        st = ctx.store
        out = reconciler.operator_action(st, rollout_id, action, _who(request).actor, body.reason if body else None)
        st.wake()
        return out

    handler.__name__ = f"{action}_rollout"
    return handler


for _a in ("pause", "resume", "abort", "rollback"):
    router.add_api_route(
        f"/rollouts/{{rollout_id}}/{_a}",
        _action(_a),
        methods=["POST"],
        name=f"{_a}_rollout",
        response_model=schemas.RolloutAction,
        tags=["rollouts"],
        **_OUT,
    )

"""``edgefleet server`` and the operator commands that talk to it: devices, rollout, models, fleet, audit, tokens.

Every client command takes ``--server URL`` and ``--api-token T`` (env ``EDGEFLEET_SERVER``,
``EDGEFLEET_API_TOKEN``); against a server on this machine the admin token file ``./admin-token`` is read when no
token is given."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table

from edgefleet.cli._output import JsonOpt, cell, console, err_console, escape, print_json, wire
from edgefleet.cli.connection import ServerOpt, TokenOpt, client
from edgefleet.cli.evidence import attach_evidence, judged_package, print_release, read_bench_report, read_gate_verdict
from edgefleet.durations import parse_duration
from edgefleet.errors import UsageError, validation_summary

if TYPE_CHECKING:
    from pydantic import BaseModel

    from edgefleet.controlplane.schemas import RolloutPlanPreview


devices_app = typer.Typer(help="Enroll, list, pin and revoke devices.", no_args_is_help=True)
rollout_app = typer.Typer(help="Roll a version out in waves, gated on runtime metrics.", no_args_is_help=True)
models_app = typer.Typer(
    help="The model registry: versions, channels, promotion, release evidence and policy.", no_args_is_help=True
)
fleet_app = typer.Typer(help="Fleet health: KPIs, the compatibility matrix.", no_args_is_help=True)
tokens_app = typer.Typer(help="Operator API tokens (admin only).", no_args_is_help=True)


ForceOpt = typer.Option(
    False, "--force", help="Release even though the release policy refuses (admin; needs --reason; audited)."
)
ReasonOpt = typer.Option(None, "--reason", help="Why --force (goes to the audit log).")


def _table(rows: list[dict[str, Any]], cols: list[str], title: str | None = None) -> None:
    t = Table(title=title)
    for c in cols:
        t.add_column(c)
    for r in rows:
        # cells are plain text: a device or token name like "[red]x" must show as typed, not as markup
        t.add_row(*[cell(r.get(c)) for c in cols])
    console.print(t)


def _fields(doc: dict[str, Any], title: str | None = None) -> None:
    """One record as a two-column table; nested values as compact JSON (``--json`` gives the structure)."""
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column("field", style="bold")
    t.add_column("value", overflow="fold")
    for k, v in doc.items():
        t.add_row(cell(k), cell(json.dumps(v, default=str) if isinstance(v, dict | list) else v))
    console.print(t)


def _say(text: str, json_: bool, doc: Any) -> None:
    """The result of an action: ``doc`` as JSON for scripts, else ``text`` (verbatim: it holds user names)."""
    if json_:
        print_json(doc)
    else:
        console.print(text, markup=False, soft_wrap=True)


# ------------------------------------------------------------------------------------------------ server


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


class LogFormat(StrEnum):
    text = "text"
    json = "json"


def server(
    db: str = typer.Option(None, "--db", help="SQLAlchemy URL, postgresql://… for scale [sqlite:///edgefleet.db]."),
    repo: str = typer.Option(
        None,
        "--repo",
        help="TUF repository folder the server signs and serves, or s3://BUCKET/PREFIX to sign into object storage "
        "(endpoint and credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...; needs --repo-keys and "
        "--repository-url) (default tuf-repo).",
    ),
    repo_keys: Path = typer.Option(
        None, "--repo-keys", help="Folder of the online signing keys (default REPO/keys; required for s3://)."
    ),
    repository_url: str = typer.Option(
        None,
        "--repository-url",
        help="Base URL devices fetch the repository from: a CDN or the bucket's public endpoint "
        "(default: this server's /tuf).",
    ),
    host: str = typer.Option(None, "--host", help="Address to bind [127.0.0.1]."),
    port: int = typer.Option(None, "--port", min=1, max=65535, help="Port [8700]."),
    reconcile_interval: float = typer.Option(None, "--reconcile-interval", help="Seconds between reconciles [5]."),
    tls_cert: Path = typer.Option(
        None, "--tls-cert", help="Serve https with this PEM certificate (chain) (default: plain http)."
    ),
    tls_key: Path = typer.Option(None, "--tls-key", help="PEM private key of --tls-cert."),
    forwarded_allow_ips: str = typer.Option(
        None,
        "--forwarded-allow-ips",
        help="Behind a TLS-terminating proxy: trust X-Forwarded-* headers from these addresses (comma-separated, "
        "or *) (default: none trusted).",
    ),
    mqtt: str = typer.Option(
        None,
        "--mqtt",
        help="Publish check-in nudges to this broker, mqtt://[USER:PASSWORD@]HOST[:PORT] (docs/controlplane.md) "
        "(default: none; devices learn changes at their next poll).",
    ),
    log_level: LogLevel = typer.Option(
        LogLevel.info, "--log-level", case_sensitive=False, help="Least severe log record written to stderr."
    ),
    log_format: LogFormat = typer.Option(
        LogFormat.text,
        "--log-format",
        case_sensitive=False,
        help="text for a person; json: one object per line (time, level, logger, message, exc_info).",
    ),
) -> None:
    """Run the control plane: registry, check-ins, rollouts, KPIs, TUF repository under /tuf/."""
    import logging

    import uvicorn

    from edgefleet.config import ServerSettings
    from edgefleet.controlplane import logs
    from edgefleet.controlplane.app import admin_token_path, create_app
    from edgefleet.transport import check_server_tls, is_loopback

    given: dict[str, Any] = {
        "db": db,
        "repo": repo,
        "repo_keys": repo_keys,
        "repository_url": repository_url,
        "host": host,
        "port": port,
        "reconcile_interval_s": reconcile_interval,
        "tls_cert": tls_cert,
        "tls_key": tls_key,
        "forwarded_allow_ips": forwarded_allow_ips,
        "mqtt": mqtt,
    }
    from pydantic import ValidationError

    try:
        settings = ServerSettings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as err:
        raise UsageError(f"invalid server settings: {validation_summary(err)}") from None
    tls = check_server_tls(settings.tls_cert, settings.tls_key)
    # before the app is built: building it already logs (the admin token file, where root keys sit)
    log_config = logs.configure(log_level.value, log_format.value)
    log = logging.getLogger(__name__)
    app = create_app(settings)
    scheme = "https" if tls else "http"
    log.info(
        "edgefleet control plane on %s://%s:%s  db=%s  repo=%s  admin token file: %s",
        scheme,
        settings.host,
        settings.port,
        app.state.context.db.url.split("@")[-1],
        settings.repo_s3 or settings.repo,
        admin_token_path(settings),
    )
    if not tls and settings.forwarded_allow_ips is None and not is_loopback(settings.host):
        log.warning(
            "cleartext http on %s: tokens cross the network unencrypted; give --tls-cert/--tls-key, or run behind "
            "a TLS proxy with --forwarded-allow-ips (docs/security/tls.md)",
            settings.host,
        )
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=log_config,
        log_level=log_level.value,
        access_log=False,
        ssl_certfile=str(settings.tls_cert) if tls else None,
        ssl_keyfile=str(settings.tls_key) if tls else None,
        # uvicorn trusts X-Forwarded-* from loopback by default; here only the proxies the operator names count
        proxy_headers=settings.forwarded_allow_ips is not None,
        forwarded_allow_ips=settings.forwarded_allow_ips,
    )


# ------------------------------------------------------------------------------------------------ devices


@devices_app.command("token")
def devices_token(
    tier: str = typer.Option(..., "--tier", help="Device tier the enrolling device gets (fixed by the token)."),
    expires: str = typer.Option("1h", "--expires", help="Lifetime, e.g. 30m, 1h, 7d."),
    group: str = typer.Option(None, "--group", help="Device group to join."),
    server_: str = ServerOpt,
    token: str = TokenOpt,
    json_: bool = JsonOpt,
) -> None:
    """Make a one-time, expiring enrollment token."""
    expires_s = parse_duration(expires, flag="--expires", allow_zero=False)
    with client(server_, token) as c:
        out = c.enrollment.create_token(tier, group=group, expires_s=expires_s)
    if json_:
        print_json(wire(out))
    else:
        console.print(out.token, markup=False, soft_wrap=True)


@devices_app.command("list")
def devices_list(server_: str = ServerOpt, token: str = TokenOpt, json_: bool = JsonOpt) -> None:
    """The inventory: tier, runtime, served version, last seen, overdue."""
    with client(server_, token) as c:
        rows = wire(c.devices.list())
    if json_:
        print_json(rows)
        return
    flat = [
        {
            **r,
            "served": f"{r['served']['model'] or '-'} {r['served']['version'] or ''}",
            "desired": f"{r['desired']['version'] or '-'}",
            "pin": (r["pinned"] or {}).get("version"),
        }
        for r in rows
    ]
    _table(
        flat,
        [
            "device_id",
            "tier",
            "runtime_version",
            "state",
            "served",
            "desired",
            "pin",
            "last_seen",
            "overdue",
            "revoked",
        ],
    )


@devices_app.command("show")
def devices_show(device_id: str, server_: str = ServerOpt, token: str = TokenOpt, json_: bool = JsonOpt) -> None:
    """One device, with the desired state it is served."""
    with client(server_, token) as c:
        doc = wire(c.devices.get(device_id))
    if json_:
        print_json(doc)
    else:
        _fields(doc, title=f"device {escape(device_id)}")


@devices_app.command("logs")
def devices_logs(
    device_id: str,
    since: str = typer.Option("1h", "--since", help="How far back the lines go, e.g. 30m, 2h."),
    wait: str = typer.Option("2m", "--wait", help="How long to wait for the device's answer (its next check-in)."),
    last: bool = typer.Option(False, "--last", help="Show the latest upload without asking the device again."),
    server_: str = ServerOpt,
    token: str = TokenOpt,
    json_: bool = JsonOpt,
) -> None:
    """A device's recent log lines (its secrets scrubbed on the device). Asks the device, which answers on its next
    check-in; its group must consent (`remote_logs` in the group's configuration document). Audited."""
    import time

    from edgefleet.errors import EdgefleetError

    since_s = parse_duration(since, flag="--since", allow_zero=False)
    wait_s = parse_duration(wait, flag="--wait")
    with client(server_, token) as c:
        if last:
            got = c.devices.logs(device_id)
        else:
            asked = c.devices.request_logs(device_id, since_s=since_s)
            err_console.print(
                f"asked device {device_id} for its log lines of the last {since}; waiting up to {wait} for its "
                "next check-in",
                markup=False,
                highlight=False,
            )
            deadline = time.monotonic() + wait_s
            while True:
                got = c.devices.logs(device_id)
                if got.upload is not None and got.upload.requested_at == asked.requested_at:
                    break
                if time.monotonic() >= deadline:
                    raise EdgefleetError(
                        f"device {device_id} did not answer within {wait} (it answers on its next check-in: "
                        f"`edgefleet devices show {device_id}` says when it was last seen); the request stays open, "
                        f"`edgefleet devices logs {device_id} --last` shows the answer once it comes"
                    )
                time.sleep(1.0)
    if json_:
        print_json(wire(got))
        return
    if got.upload is None:
        console.print(f"device {device_id} has sent no log lines yet", markup=False, highlight=False)
        return
    for line in got.upload.lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    if got.upload.dropped:
        err_console.print(f"({got.upload.dropped} older line(s) left out)", markup=False, highlight=False)


@devices_app.command("crashes")
def devices_crashes(
    device_id: str,
    limit: int = typer.Option(10, "--limit", min=1, max=200, help="How many reports, newest first."),
    server_: str = ServerOpt,
    token: str = TokenOpt,
    json_: bool = JsonOpt,
) -> None:
    """A device's worker crash reports: how the worker ended, its Python traceback (faulthandler), its last sampled
    RSS and the model it served. Devices upload them while their group consents (`crash_reports` in the group's
    configuration document); without it they stay on the device."""
    with client(server_, token) as c:
        got = c.devices.crashes(device_id, limit=limit)
    if json_:
        print_json(wire(got))
        return
    say = lambda text: console.print(text, markup=False, highlight=False, soft_wrap=True)  # noqa: E731
    if not got.crashes:
        consent = "" if got.consent else " (its group has not consented to crash reports: set crash_reports)"
        say(f"device {device_id} has uploaded no crash reports{consent}")
        return
    for r in got.crashes:
        how = r.signal or ("ended" if r.exit_code is None else f"exit {r.exit_code}")
        rss = "RSS not sampled"
        if r.rss_bytes is not None:
            rss = f"RSS {r.rss_bytes / 2**20:.1f} MiB (sampled {r.rss_age_s or 0:.1f} s before)"
        up = f", up {r.uptime_s:.1f} s" if r.uptime_s is not None else ""
        say(f"{r.at}  {how}  {r.model or '-'} {r.version or ''}  {rss}{up}")
        say(f"  {r.reason}")
        if r.fault:
            cut = f"  ({r.fault_dropped} earlier character(s) left out)\n" if r.fault_dropped else ""
            say(cut + "\n".join(f"  | {line}" for line in r.fault.rstrip().splitlines()))
        else:
            say("  (no traceback: the signal cannot be caught, or none came)")
    if not got.consent:
        err_console.print(
            "its group no longer consents to crash reports: newer ones stay on the device",
            markup=False,
            highlight=False,
        )


@devices_app.command("keys")
def devices_keys(
    tier: str = typer.Option(None, "--tier", help="Only devices of this tier (default: every tier)."),
    group: str = typer.Option(None, "--group", help="Only devices of this group (default: every group)."),
    server_: str = ServerOpt,
    token: str = TokenOpt,
    json_: bool = JsonOpt,
) -> None:
    """The X25519 public keys of active devices, to encrypt a package for (`package --encrypt-for-group`)."""
    params = {k: v for k, v in (("tier", tier), ("group", group)) if v is not None}
    with client(server_, token) as c:
        rows = wire(c.devices.keys(tier=tier, group=group))
    if json_:
        print_json(rows)
        return
    if not rows:
        where = " and ".join(f"{k} {v}" for k, v in params.items()) or "the fleet"
        console.print(f"no active device in {where}", highlight=False, markup=False)
        return
    _table(rows, ["device_id", "tier", "group", "key_id", "public_key"])


@devices_app.command("pin")
def devices_pin(
    device_id: str,
    version: str,
    model: str = typer.Option(None, "--model", help="Model name [the served one]."),
    server_: str = ServerOpt,
    token: str = TokenOpt,
    json_: bool = JsonOpt,
) -> None:
    """Pin a device to a version: rollouts leave it alone."""
    with client(server_, token) as c:
        out = c.devices.pin(device_id, version, model=model)
    _say(f"pinned {device_id} to {version}", json_, wire(out))


@devices_app.command("unpin")
def devices_unpin(device_id: str, server_: str = ServerOpt, token: str = TokenOpt, json_: bool = JsonOpt) -> None:
    """Remove a device's pin."""
    with client(server_, token) as c:
        out = c.devices.unpin(device_id)
    _say(f"unpinned {device_id}", json_, wire(out))


@devices_app.command("revoke")
def devices_revoke(device_id: str, server_: str = ServerOpt, token: str = TokenOpt, json_: bool = JsonOpt) -> None:
    """Revoke a device's credential: it stops working at once."""
    with client(server_, token) as c:
        out = c.devices.revoke(device_id)
    _say(f"revoked {device_id}", json_, wire(out))


@devices_app.command("decommission")
def devices_decommission(
    device_id: str, server_: str = ServerOpt, token: str = TokenOpt, json_: bool = JsonOpt
) -> None:
    """Retire a device: its record stays for the audit, its next check-in wipes it, its credential then stops."""
    with client(server_, token) as c:
        out = c.devices.decommission(device_id)
    _say(f"decommissioned {device_id}: it wipes itself on its next check-in", json_, wire(out))


def _rotate(what: str, device_id: str | None, group: str | None, server_: str, token: str, json_: bool) -> None:
    if (device_id is None) == (group is None):
        raise UsageError("name one device (ID) or one --group")
    out: BaseModel
    with client(server_, token) as c:
        if device_id is not None:
            rotate = c.devices.rotate_key if what == "key" else c.devices.rotate_credential
            one = rotate(device_id)
            out, ids = one, [one.device_id]
        else:
            assert group is not None
            many = c.groups.rotate_credentials(group, key=what == "key")
            out, ids = many, many.devices
    if json_:
        print_json(wire(out))
    else:
        console.print(
            f"asked {len(ids)} device(s) to rotate their {what}: each does it at its next check-in",
            highlight=False,
            markup=False,
        )


@devices_app.command("rotate-credential")
def devices_rotate_credential(
    device_id: str = typer.Argument(None, help="The device (or: every live device of --group)."),
    group: str = typer.Option(None, "--group", help="Every live device of this group."),
    server_: str = ServerOpt,
    token: str = TokenOpt,
    json_: bool = JsonOpt,
) -> None:
    """Give a device a new credential; the old one works until the new one is first used."""
    _rotate("credential", device_id, group, server_, token, json_)


@devices_app.command("rotate-key")
def devices_rotate_key(
    device_id: str = typer.Argument(None, help="The device (or: every live device of --group)."),
    group: str = typer.Option(None, "--group", help="Every live device of this group."),
    server_: str = ServerOpt,
    token: str = TokenOpt,
    json_: bool = JsonOpt,
) -> None:
    """Make a device generate a new X25519 key pair (it keeps the old private key while a package needs it)."""
    _rotate("key", device_id, group, server_, token, json_)


# ------------------------------------------------------------------------------------------------ rollout


@rollout_app.command("start")
def rollout_start(
    name: str = typer.Argument(None, help="The model (none with --agent)."),
    version: str = typer.Argument(None, help="Its version (none with --agent)."),
    agent: str = typer.Option(
        None,
        "--agent",
        metavar="VERSION",
        help="Roll out the agent bundle of this agent version instead of a model (published with `edgefleet "
        "agent-bundle publish`).",
    ),
    tier: str = typer.Option(None, "--tier", help="Only devices of this tier."),
    channel: str = typer.Option(None, "--channel", help="Only devices whose group follows this channel."),
    waves: str = typer.Option("1,10,50,100", "--waves", help="Cumulative wave percentages ending at 100."),
    bake: str = typer.Option("5m", "--bake", help="Bake time per wave, e.g. 90s, 5m."),
    sample_wait: str = typer.Option(
        "0s",
        "--sample-wait",
        help="How much longer than the bake a wave short of --min-devices/--min-requests waits before it pauses.",
    ),
    device_timeout: str = typer.Option(
        "15m",
        "--device-timeout",
        help="A moved device that took the update, then went silent this long without a commit or a failure, counts "
        "as failed (0: never).",
    ),
    min_devices: int = typer.Option(3, "--min-devices", help="Committed devices needed to judge a wave."),
    min_requests: int = typer.Option(100, "--min-requests", help="Inference requests needed to judge a wave."),
    max_failure: str = typer.Option("5%", "--max-failure", help="Update failures + rollbacks allowed."),
    p95_budget_ms: float = typer.Option(None, "--p95-budget-ms", help="Absolute p95 budget (first rollout)."),
    auto_rollback: bool = typer.Option(False, "--auto-rollback", help="On failure, return moved devices to A."),
    compat_fail_devices: int = typer.Option(
        2, "--compat-fail-devices", help="Distinct failing devices before a compatibility cell blocks a tier."
    ),
    shadow: str = typer.Option(
        None,
        "--shadow",
        metavar="PERCENT",
        help="Start with a shadow phase on this share of each tier's devices (at least one each): the candidate runs "
        "on copies of live requests, never answering one, and the canary starts only if it agrees with the served "
        "model. Default: no shadow phase.",
    ),
    shadow_for: str = typer.Option("10m", "--shadow-for", help="The shadow phase lasts at least this long."),
    shadow_agreement: str = typer.Option(
        "98%", "--shadow-agreement", help="Agreement with the served model each tier needs in shadow."
    ),
    shadow_samples: int = typer.Option(200, "--shadow-samples", help="Mirrored requests compared per tier to judge."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the devices of each wave; start nothing."),
    force: bool = ForceOpt,
    reason: str = ReasonOpt,
    server_: str = ServerOpt,
    token: str = TokenOpt,
    json_: bool = JsonOpt,
) -> None:
    """Start a rollout of NAME VERSION, or of agent VERSION with --agent (or, with --dry-run, show whom each wave
    would move). The release policy must admit a model version (by default: a passing gate verdict for its
    package, see `edgefleet models attach`); an agent rollout is judged by the same waves and rules."""
    from pydantic import ValidationError

    from edgefleet.controlplane.rollout import RolloutPolicy, parse_percent
    from edgefleet.controlplane.shadow import ShadowPolicy

    if agent is not None and (name is not None or version is not None):
        raise UsageError("give NAME VERSION or --agent VERSION, not both")
    if agent is None and (name is None or version is None):
        raise UsageError("give the model and version to roll out (NAME VERSION), or --agent VERSION")

    try:
        wave_list = [float(w) for w in waves.split(",")]
    except ValueError:
        raise UsageError(f"--waves {waves!r}: give comma-separated percentages ending at 100, e.g. 1,10,50,100")
    bake_s = parse_duration(bake, flag="--bake")
    sample_wait_s = parse_duration(sample_wait, flag="--sample-wait")
    device_timeout_s = parse_duration(device_timeout, flag="--device-timeout")
    try:
        policy = RolloutPolicy(
            waves=wave_list,
            bake_s=bake_s,
            max_sample_wait_s=sample_wait_s,
            device_timeout_s=device_timeout_s,
            min_devices=min_devices,
            min_requests=min_requests,
            max_failure=parse_percent(max_failure),
            auto_rollback=auto_rollback,
            p95_budget_ms=p95_budget_ms,
            compat_fail_devices=compat_fail_devices,
            shadow=None
            if shadow is None
            else ShadowPolicy(
                percent=_shadow_percent(shadow),
                duration_s=parse_duration(shadow_for, flag="--shadow-for"),
                min_agreement=parse_percent(shadow_agreement),
                min_samples=shadow_samples,
            ),
        )
    except ValidationError as exc:
        raise UsageError(f"bad rollout policy: {validation_summary(exc)}") from None
    except ValueError as exc:  # parse_percent
        raise UsageError(f"bad rollout policy: {' '.join(str(exc).split())}") from None
    with client(server_, token) as c:
        if dry_run:
            plan = c.rollouts.plan(name, version, agent=agent, tier=tier, channel=channel, policy=policy)
        else:
            started = c.rollouts.start(
                name, version, agent=agent, tier=tier, channel=channel, policy=policy, force=force, reason=reason
            )
    what = f"agent {agent}" if agent is not None else f"{name} {version}"
    if json_:
        print_json(wire(plan if dry_run else started))
        return
    if dry_run:
        _print_plan(plan, what)
        return
    console.print(f"rollout {started.rollout_id} of {what}: {started.state}", markup=False)
    if started.warning:
        console.print(f"[yellow]warning:[/] {escape(started.warning)}")


def _shadow_percent(text: str) -> float:
    """``--shadow 5`` and ``--shadow 5%`` both mean five percent of each tier."""
    from edgefleet.controlplane.rollout import parse_percent

    t = text.strip()
    try:
        return parse_percent(t if t.endswith("%") else t + "%") * 100
    except ValueError:
        raise UsageError(f"--shadow {text!r}: give a percentage of each tier's devices, e.g. 5 or 5%") from None


def _print_plan(p: RolloutPlanPreview, what: str) -> None:
    console.print(f"dry run: a rollout of {what} would move {p.devices} device(s); nothing was started", markup=False)
    _table(
        [{"wave": w.wave, "percent": w.percent, "devices": ", ".join(w.devices) or "-"} for w in p.waves],
        ["wave", "percent", "devices"],
        title="waves",
    )
    if p.already_on_version:
        console.print(f"already on the version: {', '.join(p.already_on_version)}", markup=False)
    if p.excluded:
        _table(
            [{"device_id": k, "why": v} for k, v in p.excluded.items()], ["device_id", "why"], title="never targeted"
        )
    if p.blocked:
        console.print(f"[yellow]warning:[/] {escape(p.blocked)}")
    if p.release is not None and p.release.refusal:
        console.print(f"[yellow]warning: the release policy refuses it:[/] {escape(p.release.refusal)}")


@rollout_app.command("list")
def rollout_list(server_: str = ServerOpt, token: str = TokenOpt, json_: bool = JsonOpt) -> None:
    """All rollouts, newest first."""
    with client(server_, token) as c:
        rows = wire(c.rollouts.list())
    if json_:
        print_json(rows)
    else:
        _table(rows, ["rollout_id", "kind", "model", "version", "state", "wave", "tier", "reason"])


@rollout_app.command("status")
def rollout_status(rollout_id: str, server_: str = ServerOpt, token: str = TokenOpt, json_: bool = JsonOpt) -> None:
    """One rollout: wave, devices moved, every transition with its reason."""
    with client(server_, token) as c:
        r = wire(c.rollouts.get(rollout_id))
    if json_:
        print_json(r)
        return
    console.print(
        f"{escape(r['rollout_id'])}  {escape(r['model'])} {escape(r['version'])}  [bold]{escape(r['state'])}[/]  "
        f"wave {r['wave']} of {r['waves']}  devices moved: {len(r['devices'])}"
    )
    console.print(f"reason: {r['reason']}", markup=False)
    if r.get("step_error"):
        console.print(f"[red]last reconcile step failed:[/] {escape(r['step_error'])}")
    if r.get("shadow"):
        sh = r["shadow"]
        rows = [
            {
                **t,
                "agreement": "-" if t["agreement"] is None else f"{t['agreement']:.1%}",
                "halves": " / ".join(f"{h['agreed']}/{h['compared']}" for h in t["halves"]),
            }
            for t in sh["tiers"]
        ]
        cols = ["tier", "devices", "compared", "agreement", "halves", "errors", "dropped", "p95_ms"]
        _table(rows, cols, title=f"shadow phase: {sh['state']}")
    _table(r["transitions"], ["seq", "at", "from", "to", "wave", "actor", "reason"], title="transitions")


def _rollout_action(action: str) -> Any:
    def cmd(
        rollout_id: str,
        reason: str = typer.Option(None, "--reason", help="Why (goes to the audit log)."),
        server_: str = ServerOpt,
        token: str = TokenOpt,
        json_: bool = JsonOpt,
    ) -> None:
        with client(server_, token) as c:
            out = getattr(c.rollouts, action)(rollout_id, reason=reason)
        _say(f"{rollout_id}: {out.state}", json_, wire(out))

    cmd.__doc__ = {
        "pause": "Halt a rollout (devices keep what they run).",
        "resume": "Resume a paused rollout; the current wave bakes afresh.",
        "abort": "End a rollout for good; devices keep what they run.",
        "rollback": "End a rollout and return every moved device to its previous version.",
    }[action]
    return cmd


for _a in ("pause", "resume", "abort", "rollback"):
    rollout_app.command(_a)(_rollout_action(_a))


# ------------------------------------------------------------------------------------------------ models


@models_app.command("list")
def models_list(server_: str = ServerOpt, token: str = TokenOpt, json_: bool = JsonOpt) -> None:
    """Models and their versions with channel and gate verdict."""
    with client(server_, token) as c:
        rows = wire(c.models.list())
    if json_:
        print_json(rows)
        return
    _table([v for m in rows for v in m["versions"]], ["model", "version", "channel", "gate", "package_sha256"])


@models_app.command("show")
def models_show(
    name: str,
    version: str = typer.Argument(None),
    server_: str = ServerOpt,
    token: str = TokenOpt,
    json_: bool = JsonOpt,
) -> None:
    """A model, or one version with lineage, gate verdict and bench results."""
    with client(server_, token) as c:
        doc = wire(c.models.version(name, version) if version else c.models.get(name))
    if json_:
        print_json(doc)
    else:
        _fields(doc, title=escape(f"{name} {version}" if version else name))


@models_app.command("promote")
def models_promote(
    name: str,
    version: str,
    to: str = typer.Option(None, "--to", help="dev, canary or stable [next one]."),
    force: bool = ForceOpt,
    reason: str = ReasonOpt,
    server_: str = ServerOpt,
    token: str = TokenOpt,
    json_: bool = JsonOpt,
) -> None:
    """Promote a version along dev → canary → stable (the release policy must admit it)."""
    with client(server_, token) as c:
        out = c.models.promote(name, version, to=to, force=force, reason=reason)
    _say(f"{name} {version} is now in {out.channel}", json_, wire(out))


@models_app.command("attach")
def models_attach(
    name: str,
    version: str,
    gate: Path = typer.Option(None, "--gate", help="Verdict JSON of `edgefleet gate --package PKG --json`."),
    bench: Path = typer.Option(None, "--bench", help="BENCH.json of `edgefleet bench`."),
    package: Path = typer.Option(
        None, "--package", help="The .efpkg the verdict judged [the one the verdict names, if it is here]."
    ),
    server_: str = ServerOpt,
    token: str = TokenOpt,
    json_: bool = JsonOpt,
) -> None:
    """Attach release evidence to NAME VERSION: a gate verdict, bound to the SHA-256 of the package it judged,
    and/or bench results. The server refuses evidence for another package or model."""
    if gate is None and bench is None:
        raise UsageError("give --gate gate.json and/or --bench bench.json")
    verdict = read_gate_verdict(gate) if gate is not None else None
    report = read_bench_report(bench) if bench is not None else None
    sha = None
    if verdict is not None:
        sha = judged_package(verdict, package)
        if sha is None:
            raise UsageError(
                f"{gate} does not say which package it judged: pass --package PKG (the .efpkg it judged), "
                "or gate with `edgefleet gate --package PKG`"
            )
    with client(server_, token) as c:
        release = attach_evidence(c, name, version, gate=verdict, bench=report, package_sha256=sha)
    if json_:
        print_json(release)
        return
    print_release(f"{name} {version}", release)


@models_app.command("policy")
def models_policy(
    name: str = typer.Argument(None, help="A model (its override); none: the global policy."),
    require_gate: bool = typer.Option(
        None, "--require-gate/--no-require-gate", help="Require a passing gate verdict for the package."
    ),
    require_bench: bool = typer.Option(
        None, "--require-bench/--no-require-bench", help="Require bench results for the model."
    ),
    inherit: bool = typer.Option(False, "--inherit", help="Drop NAME's override: it follows the global policy."),
    reason: str = typer.Option(None, "--reason", help="Why (goes to the audit log)."),
    server_: str = ServerOpt,
    token: str = TokenOpt,
    json_: bool = JsonOpt,
) -> None:
    """Show or set the release policy: what a version needs before it is promoted or rolled out. Setting it
    needs an admin token."""
    changes = {k: v for k, v in (("require_gate", require_gate), ("require_bench", require_bench)) if v is not None}
    if inherit and (name is None or changes):
        raise UsageError("--inherit drops a model's override: give NAME and no --require-* flag")
    with client(server_, token) as c:
        rp = c.release_policy
        if inherit:
            doc = rp.clear_model(name)
        elif changes:
            doc = rp.set(**changes, reason=reason) if name is None else rp.set_model(name, **changes, reason=reason)
        else:
            doc = rp.get() if name is None else rp.get_model(name)
    out = wire(doc)
    if json_:
        print_json(out)
        return
    eff, src = out["effective"], out["source"]
    console.print(
        f"release policy{' of ' + name if name else ''}: "
        + ", ".join(f"{k} = {str(v).lower()} ({src[k]})" for k, v in eff.items()),
        markup=False,
    )
    if out["models"]:
        _table(
            [{"model": m, **row} for m, row in out["models"].items()],
            ["model", "require_gate", "require_bench", "updated_by", "updated_at"],
            title="per-model overrides (empty: inherited)",
        )


# ------------------------------------------------------------------------------------------------ fleet, audit, tokens


@fleet_app.command("status")
def fleet_status(server_: str = ServerOpt, token: str = TokenOpt, json_: bool = JsonOpt) -> None:
    """Fleet KPIs: p95 per version and tier, crash-free rate, update success, fragmentation, drift, overdue, field
    accuracy."""
    with client(server_, token) as c:
        k = wire(c.fleet.kpis())
    if json_:
        print_json(k)
        return
    d = k["devices"]
    u = k["updates"]
    console.print(
        f"devices: {d['active']} active, {d['overdue']} overdue, {d['revoked']} revoked   "
        f"crash-free: {k['crash_free_rate']}   update success: {k['update_success_rate']}   "
        f"fragmentation index: {k['fragmentation_index']}   drift alerts: {len(k['drift_alerts'])}",
        markup=False,
    )
    console.print(
        f"updates: {u['committed']} committed, {u['failed']} failed, {u['rolled_back']} rolled back, "
        f"{u['reverted']} reverted, {u['cancelled']} cancelled",
        markup=False,
    )
    _table(k["latency"], ["model", "version", "tier", "p95_ms", "requests", "error_rate"], title="latency")
    if k["drift"]:
        _table(
            [{**x, "psi": "not enough data" if x["psi"] is None else x["psi"]} for x in k["drift"]],
            ["model", "version", "feature", "n", "psi"],
            title="drift (fleet PSI on merged counts)",
        )
    if k.get("field_accuracy"):
        _table(
            [{**x, "accuracy": "no feedback" if x["accuracy"] is None else x["accuracy"]} for x in k["field_accuracy"]],
            ["model", "version", "tier", "accuracy", "matched", "unmatched"],
            title="field accuracy (ground-truth feedback, docs/operations.md)",
        )
    if k["rollouts"]:
        _table(
            k["rollouts"],
            ["rollout_id", "version", "state", "devices_moved", "time_to_halt_s", "time_to_rollback_s"],
            title="rollouts",
        )


@fleet_app.command("compat-clear")
def fleet_compat_clear(
    tier: str = typer.Option(..., "--tier", help="Device tier of the cell."),
    runtime_version: str = typer.Option(..., "--runtime-version", help="Runtime version of the cell."),
    model: str = typer.Option(..., "--model", help="Model name."),
    version: str = typer.Option(..., "--version", help="Model version."),
    reason: str = typer.Option(None, "--reason", help="Why (goes to the audit log)."),
    server_: str = ServerOpt,
    token: str = TokenOpt,
    json_: bool = JsonOpt,
) -> None:
    """Clear a compatibility cell: its failures stop blocking the tier; only evidence from now on counts."""
    with client(server_, token) as c:
        out = c.compat.clear(tier=tier, runtime_version=runtime_version, model=model, version=version, reason=reason)
    if json_:
        print_json(wire(out))
    else:
        console.print(
            f"{model} {version} on tier {tier} with runtime {runtime_version}: {out.previous_status} -> {out.status}",
            markup=False,
        )


def audit(
    limit: int = typer.Option(50, "--limit", help="Newest N entries."),
    server_: str = ServerOpt,
    token: str = TokenOpt,
    json_: bool = JsonOpt,
) -> None:
    """The append-only audit log: every mutating call and every rollout transition."""
    with client(server_, token) as c:
        rows = wire(c.audit.list(limit=limit))
    if json_:
        print_json(rows)
        return
    _table(
        [{**r, "detail": r["detail"].get("reason") or r["detail"]} for r in rows],
        ["id", "at", "actor", "action", "target", "detail"],
    )


@tokens_app.command("create")
def tokens_create(
    role: str = typer.Option(..., "--role", help="admin, operator or viewer."),
    name: str = typer.Option("api", "--name", help="A label for the token."),
    expires: str = typer.Option(
        None, "--expires", help="Lifetime, e.g. 30d, 12h [the server's token_expires_s: 90d unless set]."
    ),
    server_: str = ServerOpt,
    token: str = TokenOpt,
    json_: bool = JsonOpt,
) -> None:
    """Create an operator API token (shown once). It expires: rotate it with `edgefleet tokens rotate ID`."""
    if role not in ("admin", "operator", "viewer"):
        raise UsageError(f"unknown role {role!r}: use admin, operator or viewer")
    expires_s = None if expires is None else parse_duration(expires, flag="--expires", allow_zero=False)
    with client(server_, token) as c:
        out = c.tokens.create(role, name=name, expires_s=expires_s)
    if json_:
        print_json(wire(out))
    else:
        console.print(out.token, highlight=False, markup=False, soft_wrap=True)


@tokens_app.command("rotate")
def tokens_rotate(
    token_id: int = typer.Argument(..., help="The token's id (`edgefleet tokens list`)."),
    grace: str = typer.Option(
        "0s", "--grace", help="How long the old secret keeps working, e.g. 10m, 1d [0s: refused at once]."
    ),
    expires: str = typer.Option(
        None,
        "--expires",
        help="Lifetime of the new secret [a never-expiring token stays so; else the server's token_expires_s].",
    ),
    server_: str = ServerOpt,
    token: str = TokenOpt,
    json_: bool = JsonOpt,
) -> None:
    """Issue a new secret for a token's name and role (shown once); the old one stops after --grace."""
    grace_s = parse_duration(grace, flag="--grace")
    expires_s = None if expires is None else parse_duration(expires, flag="--expires", allow_zero=False)
    with client(server_, token) as c:
        out = c.tokens.rotate(token_id, grace_s=grace_s, expires_s=expires_s)
    if json_:
        print_json(wire(out))
        return
    console.print(out.token, highlight=False, markup=False, soft_wrap=True)
    console.print(
        f"token {out.id} replaces token {out.replaces}, which works until {wire(out)['old_valid_until']}",
        highlight=False,
        markup=False,
        style="dim",
    )


@tokens_app.command("list")
def tokens_list(server_: str = ServerOpt, token: str = TokenOpt, json_: bool = JsonOpt) -> None:
    """API tokens (never their secrets), with their expiry ("never": the bootstrap or configured admin token)."""
    with client(server_, token) as c:
        rows = wire(c.tokens.list())
    if json_:
        print_json(rows)
        return
    shown = [
        {
            **r,
            "expires": "never" if r.get("never_expires") else r.get("expires_at"),
            "replaced by": r.get("replaced_by"),
        }
        for r in rows
    ]
    _table(shown, ["id", "name", "role", "created_at", "expires", "status", "replaced by"])


def register(app: typer.Typer) -> None:
    """Add this group's commands to ``app``."""
    app.command("server")(server)
    app.command("audit")(audit)
    app.add_typer(devices_app, name="devices")
    app.add_typer(rollout_app, name="rollout")
    app.add_typer(models_app, name="models")
    app.add_typer(fleet_app, name="fleet")
    app.add_typer(tokens_app, name="tokens")

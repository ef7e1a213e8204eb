"""``edgefleet repo init|status|refresh|rotate-key|targets``, ``edgefleet publish`` and ``edgefleet fetch``."""

from __future__ import annotations

import contextlib
from datetime import timedelta
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from edgefleet.cli._output import cell, console, err_console, escape, print_json, wire
from edgefleet.durations import parse_timedelta
from edgefleet.errors import UsageError
from edgefleet.repository import ROLES, Repository, RepoStatus, default_root_keys_dir, fetch_package
from edgefleet.repository.repo import DEFAULT_DELTAS
from edgefleet.repository.status import human_duration
from edgefleet.repository.storage import is_s3

repo_app = typer.Typer(help="The TUF-signed model repository.", no_args_is_help=True)

_PASSPHRASE_ENV = "EDGEFLEET_REPO_PASSPHRASE"
_ROOT_PASSPHRASE_ENV = "EDGEFLEET_ROOT_PASSPHRASE"


def _passphrase(ask: bool, env: str | None, *, confirm: bool = False, what: str = "key passphrase") -> str | None:
    if ask:
        return str(typer.prompt(what, hide_input=True, confirmation_prompt=confirm))
    return env or None


def _where(value: str) -> Path | str:
    """A repository argument: ``s3://bucket/prefix`` as given, anything else a folder."""
    return value if is_s3(value) else Path(value)


def _root_dir(path: Path | str, given: Path | None, keys_dir: Path | None = None) -> Path | None:
    """``--root-keys-dir``, else ``<REPO>.root-keys`` (``<KEYS>.root-keys`` for object storage) when it exists
    (where `repo init` puts them), else ``None``: the root keys are looked up next to the online keys, as in
    repositories made before root keys moved out."""
    if given is not None:
        return given
    default = default_root_keys_dir(path, keys_dir)
    return default if default.is_dir() else None


def _open(
    path: Path | str,
    keys_dir: Path | None,
    root_keys_dir: Path | None,
    ask: bool,
    env: str | None,
    ask_root: bool = False,
    root_env: str | None = None,
) -> Repository:
    return Repository(
        path,
        _passphrase(ask, env),
        keys_dir=keys_dir,
        root_keys_dir=_root_dir(path, root_keys_dir, keys_dir),
        root_passphrase=_passphrase(ask_root, root_env, what="root key passphrase"),
    )


def _expiry(values: list[str]) -> dict[str, timedelta]:
    out: dict[str, timedelta] = {}
    for v in values:
        role, sep, dur = v.partition("=")
        if not sep or role not in ROLES:
            raise UsageError(
                f"--expiry {v!r}: use ROLE=DURATION with ROLE one of {', '.join(ROLES)}, e.g. timestamp=1d"
            )
        out[role] = parse_timedelta(dur, flag="--expiry", allow_zero=False)
    return out


def _status_table(st: RepoStatus) -> Table:
    t = Table(title=f"repository {escape(st.path)}  ({st.targets} targets)", title_justify="left")
    for col in ("role", "version", "expires (UTC)", "period", "keys", "threshold", "status"):
        t.add_column(col)
    for r in st.roles:
        status = (
            "[green]ok[/]"
            if r.warning is None
            else ("[red]expired[/]" if "EXPIRED" in r.warning else "[yellow]expires soon[/]")
        )
        t.add_row(
            cell(r.role),
            str(r.version),
            f"{r.expires:%Y-%m-%d %H:%M}",
            human_duration(r.period),
            f"{r.keys_available}/{r.keys} here",
            str(r.threshold),
            status,
        )
    return t


def _show_status(st: RepoStatus, as_json: bool) -> None:
    if as_json:
        print_json(st.to_dict())
        return
    console.print(_status_table(st))
    for w in st.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(w)}", soft_wrap=True)


_DIR = typer.Argument(..., help="repository folder, or s3://BUCKET/PREFIX (object storage; needs --keys DIR)")
_ASK = typer.Option(False, "--ask-passphrase", help="prompt for the key passphrase")
_PASS = typer.Option(None, envvar=_PASSPHRASE_ENV, hidden=True)
_KEYS = typer.Option(
    None, "--keys", help="folder of the online private keys [REPO/keys; required for an s3:// repository]"
)
_ROOT_DIR = typer.Option(
    None,
    "--root-keys-dir",
    help="folder of the root private keys, e.g. removable media [REPO.root-keys (KEYS.root-keys for s3://) when it "
    "exists, else the --keys folder]",
)
_ASK_ROOT = typer.Option(
    False, "--ask-root-passphrase", help="prompt for the root keys' passphrase (default: the key passphrase)"
)
_ROOT_PASS = typer.Option(None, envvar=_ROOT_PASSPHRASE_ENV, hidden=True)


@repo_app.command("init")
def init_command(
    path: str = _DIR,
    root_keys: int = typer.Option(1, "--root-keys", min=1, help="number of root keys"),
    root_threshold: int = typer.Option(1, "--root-threshold", min=1, help="root signatures required"),
    expiry: list[str] = typer.Option([], "--expiry", help="ROLE=DURATION, e.g. timestamp=1d; repeat"),
    ask_passphrase: bool = _ASK,
    passphrase_env: str | None = _PASS,
    keys_dir: Path | None = _KEYS,
    root_keys_dir: Path | None = typer.Option(
        None,
        "--root-keys-dir",
        help="where the root private keys are written, outside the repository (e.g. removable media) [REPO.root-keys; "
        "KEYS.root-keys for s3://]",
    ),
    ask_root_passphrase: bool = _ASK_ROOT,
    root_passphrase_env: str | None = _ROOT_PASS,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Create a repository: root keys with a threshold (written outside the repository, to be kept offline),
    separate targets/snapshot/timestamp keys for the server (files 0600)."""
    where = _where(path)
    root_dir = root_keys_dir or default_root_keys_dir(where, keys_dir)
    repo = Repository.init(
        where,
        root_keys=root_keys,
        root_threshold=root_threshold,
        passphrase=_passphrase(ask_passphrase, passphrase_env, confirm=True),
        expiry=_expiry(expiry),
        keys_dir=keys_dir,
        root_keys_dir=root_dir,
        root_passphrase=_passphrase(ask_root_passphrase, root_passphrase_env, confirm=True, what="root key passphrase"),
    )
    _show_status(repo.status(), as_json)
    if not as_json:
        console.print(
            f"clients trust {repo.location}/metadata/root.json; the server needs only {repo.keys_dir} (keep it "
            f"private); root keys are in {repo.root_keys_dir}: move them offline (docs/security/keys.md)",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )


@repo_app.command("status")
def status_command(
    path: str = _DIR,
    keys_dir: Path | None = _KEYS,
    root_keys_dir: Path | None = _ROOT_DIR,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Versions and expiry dates of every role; warns when one is within 25 % of its period of expiring."""
    where = _where(path)
    repo = Repository(where, keys_dir=keys_dir, root_keys_dir=_root_dir(where, root_keys_dir, keys_dir))
    _show_status(repo.status(), as_json)


@repo_app.command("refresh")
def refresh_command(
    path: str = _DIR,
    force: bool = typer.Option(False, "--force", help="re-sign even if nothing is close to expiring"),
    role: str | None = typer.Option(
        None, "--role", help=f"re-sign only this role now, e.g. root in a key ceremony (one of {', '.join(ROLES)})"
    ),
    ask_passphrase: bool = _ASK,
    passphrase_env: str | None = _PASS,
    keys_dir: Path | None = _KEYS,
    root_keys_dir: Path | None = _ROOT_DIR,
    ask_root_passphrase: bool = _ASK_ROOT,
    root_passphrase_env: str | None = _ROOT_PASS,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Re-sign timestamp/snapshot (and targets, root when its keys are at hand) before they expire."""
    repo = _open(
        _where(path), keys_dir, root_keys_dir, ask_passphrase, passphrase_env, ask_root_passphrase, root_passphrase_env
    )
    done = repo.resign(role) if role is not None else repo.refresh(force=force)
    if as_json:
        print_json({"resigned": done, "status": repo.status().to_dict()})
        return
    console.print(f"re-signed: {', '.join(done)}" if done else "nothing was close to expiring", markup=False)


@repo_app.command("rotate-key")
def rotate_command(
    path: str = _DIR,
    role: str = typer.Argument(..., help=f"one of {', '.join(ROLES)}"),
    key: str | None = typer.Option(None, "--key", help="rotate only the key whose id starts with this"),
    ask_passphrase: bool = _ASK,
    passphrase_env: str | None = _PASS,
    keys_dir: Path | None = _KEYS,
    root_keys_dir: Path | None = _ROOT_DIR,
    ask_root_passphrase: bool = _ASK_ROOT,
    root_passphrase_env: str | None = _ROOT_PASS,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Replace a role's key(s) (revoking a compromised one with --key); a new root version signed by the old root
    threshold (and, for root, the new keys) carries the change. Needs the root keys (--root-keys-dir)."""
    repo = _open(
        _where(path), keys_dir, root_keys_dir, ask_passphrase, passphrase_env, ask_root_passphrase, root_passphrase_env
    )
    new = repo.rotate_key(role, keyid=key)
    if as_json:
        print_json({"role": role, "new_keyids": new, "root_version": repo.status().roles[0].version})
        return
    console.print(
        f"{role}: new key(s) {', '.join(k[:16] for k in new)}; root is now version {repo.status().roles[0].version}",
        markup=False,
    )


@repo_app.command("targets")
def targets_command(
    path: str = _DIR,
    keys_dir: Path | None = _KEYS,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List the signed targets with their manifest summaries."""
    targets = Repository(_where(path), keys_dir=keys_dir).targets()
    if as_json:
        print_json([t.__dict__ for t in targets])
        return
    t = Table(title=f"targets of {escape(path)}", title_justify="left")
    for col in ("name", "bytes", "sha256", "tiers", "encrypted"):
        t.add_column(col)
    for x in targets:
        req = x.custom.get("requirements", {})
        delta = x.custom.get("delta")
        if isinstance(delta, dict):  # a transport for its full package, whose requirements apply
            t.add_row(cell(x.name), f"{x.length:,}", x.sha256[:16], cell(f"delta to {delta.get('target')}"), "–")
            continue
        t.add_row(
            cell(x.name),
            f"{x.length:,}",
            x.sha256[:16],
            cell(", ".join(req.get("tiers") or []) or "any"),
            "yes" if x.custom.get("encrypted") else "no",
        )
    console.print(t)


def _from_env(ctx: typer.Context, param: str) -> bool:
    """Whether ``param`` came from its environment variable, not the command line."""
    # by name: typer's click and the click package each have their own ParameterSource enum
    return getattr(ctx.get_parameter_source(param), "name", None) == "ENVIRONMENT"


def publish_command(
    ctx: typer.Context,
    package: Path = typer.Argument(..., help="the .efpkg to publish"),
    repo: str | None = typer.Option(
        None, "--repo", help="repository folder, or s3://BUCKET/PREFIX with --keys DIR, to sign it into"
    ),
    server: str | None = typer.Option(
        None, "--server", envvar="EDGEFLEET_SERVER", help="control plane URL (uploads instead of --repo)"
    ),
    api_token: str | None = typer.Option(None, "--api-token", envvar="EDGEFLEET_API_TOKEN", help="operator token"),
    gate: Path | None = typer.Option(
        None, "--gate", help="with --server: attach this verdict of `edgefleet gate --package PKG --json`"
    ),
    bench: Path | None = typer.Option(None, "--bench", help="with --server: attach this BENCH.json"),
    deltas: int = typer.Option(
        DEFAULT_DELTAS,
        "--deltas",
        min=0,
        max=100,
        help="with --repo: also publish deltas from this many previous versions of the model (0: none); a control "
        "plane uses its own setting (repo_deltas)",
    ),
    ask_passphrase: bool = _ASK,
    passphrase_env: str | None = _PASS,
    keys_dir: Path | None = _KEYS,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Add a package to the repository as a signed target (or upload it to a control plane with --server, and
    attach its release evidence with --gate/--bench)."""
    if repo is not None and server is not None and _from_env(ctx, "server"):
        server = None  # EDGEFLEET_SERVER names the default control plane; an explicit --repo DIR wins over it
    if (repo is None) == (server is None):
        raise UsageError("give exactly one of --repo DIR (sign locally) or --server URL (upload to a control plane)")
    if server is not None:
        # The control plane signs with its own online keys: the upload goes through the SDK.
        from edgefleet.cli.connection import client
        from edgefleet.cli.evidence import (
            attach_evidence,
            judged_package,
            print_release,
            read_bench_report,
            read_gate_verdict,
        )

        # every file is read and checked before the upload, so a wrong one publishes nothing
        verdict = read_gate_verdict(gate) if gate is not None else None
        report = read_bench_report(bench) if bench is not None else None
        sha = judged_package(verdict, package) if verdict is not None and package.is_file() else None
        with client(server, api_token, timeout=300.0) as c:
            result: dict[str, Any] = wire(c.models.publish(package))
            if verdict is not None or report is not None:
                result["release"] = attach_evidence(
                    c, result["model"], result["version"], gate=verdict, bench=report, package_sha256=sha
                )
        if as_json:
            print_json(result)
            return
        console.print(f"uploaded {package} to {c.server}", markup=False)
        if "release" in result:
            print_release(f"{result['model']} {result['version']}", result["release"])
        return
    if gate is not None or bench is not None:
        raise UsageError("--gate and --bench attach evidence on a control plane: use them with --server URL")
    assert repo is not None
    signer = Repository(_where(repo), _passphrase(ask_passphrase, passphrase_env), keys_dir=keys_dir)
    info = signer.publish(package, deltas=0)
    with console.status("making deltas…") if deltas and not as_json else contextlib.nullcontext():
        made = signer.publish_deltas(info, deltas)
    if as_json:
        print_json(info.__dict__ | {"deltas": [d.__dict__ for d in made]})
        return
    console.print(
        f"published [bold]{escape(info.name)}[/] ({info.length:,} bytes, sha256 {info.sha256[:16]}…) to {escape(repo)}"
    )
    for d in made:
        console.print(f"  delta {escape(d.name)}: {d.length:,} bytes ({d.length / info.length:.1%} of the package)")


def fetch_command(
    name: str = typer.Argument(..., help="package name"),
    version: str = typer.Argument(..., help="package version"),
    repo: str = typer.Option(..., "--repo", help="repository base URL or folder (e.g. a USB stick copy)"),
    root: Path = typer.Option(..., "--root", help="the root.json you trust"),
    out: Path = typer.Option(..., "--out", "-o", help="folder to put the package in"),
    metadata_dir: Path | None = typer.Option(
        None, "--metadata-dir", help="client metadata cache (default: ~/.cache/edgefleet/tuf/<repo hash>)"
    ),
    device_key: Path | None = typer.Option(None, "--device-key", help="check the package decrypts with this key"),
    ca_file: Path | None = typer.Option(
        None, "--ca-file", envvar="EDGEFLEET_CA_FILE", help="trust only this CA for https (default: the system's CAs)"
    ),
    insecure_http: bool = typer.Option(
        False,
        "--insecure-http",
        envvar="EDGEFLEET_INSECURE_HTTP",
        help="allow http:// to another machine (refused by default)",
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Download a package verified by TUF from the root you trust; nothing is written unless it verifies."""
    path = fetch_package(
        name,
        version,
        repo,
        root,
        out,
        metadata_dir=metadata_dir,
        device_key=device_key,
        ca_file=ca_file,
        insecure_http=insecure_http,
    )
    if as_json:
        print_json({"path": str(path)})
        return
    console.print(f"fetched and verified [bold]{escape(path)}[/]")


def register(app: typer.Typer) -> None:
    """Add this group's commands to ``app``."""
    app.add_typer(repo_app, name="repo")
    app.command("publish")(publish_command)
    app.command("fetch")(fetch_command)

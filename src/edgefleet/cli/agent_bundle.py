"""``edgefleet agent-bundle build|publish``: the agent's own distribution as a TUF target (docs/operations.md,
"Updating the agent")."""

from __future__ import annotations

from pathlib import Path

import typer

from edgefleet.cli._output import console, print_json
from edgefleet.errors import UsageError

bundle_app = typer.Typer(
    help="The agent bundle: edgefleet and its pinned dependencies as wheels, which devices update themselves to.",
    no_args_is_help=True,
)


@bundle_app.command("build")
def build(
    out: Path = typer.Option(..., "--out", help="folder to write edgefleet-agent-VERSION-PLATFORM.tar into"),
    platform: str | None = typer.Option(
        None,
        "--platform",
        help="the devices' wheel platform: manylinux_2_28_aarch64 (64-bit Raspberry Pi OS), manylinux_2_28_x86_64 "
        "(older glibc tags such as manylinux2014_aarch64 are taken too) [this machine's arch at glibc 2.28]",
    ),
    python: str = typer.Option("3.11", "--python", help="the devices' Python version (the wheels' ABI)"),
    source: Path = typer.Option(Path("."), "--source", help="the edgefleet source tree to build the wheel of"),
    wheel: Path | None = typer.Option(None, "--wheel", help="bundle this edgefleet wheel instead of building one"),
    constraints: Path | None = typer.Option(
        None, "--constraints", help="the dependency pins [SOURCE/constraints.txt when it exists]"
    ),
    wheelhouse: Path | None = typer.Option(
        None, "--wheelhouse", help="keep the dependency wheels here between builds (a download cache)"
    ),
    offline: bool = typer.Option(False, "--offline", help="take the dependencies from --wheelhouse alone (no index)"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Build the agent bundle of the source tree: edgefleet without extras (what `edgefleet agent` needs) and its
    dependencies at the constraints' pins, as wheels for PLATFORM and PYTHON, with a manifest of their hashes."""
    from edgefleet.package.agent_bundle import build_agent_bundle

    if constraints is None and (source / "constraints.txt").is_file():
        constraints = source / "constraints.txt"
    built = build_agent_bundle(
        out,
        source=source,
        platform=platform,
        python=python,
        constraints=constraints,
        wheelhouse=wheelhouse,
        offline=offline,
        wheel=wheel,
    )
    if as_json:
        print_json(built.to_dict())
        return
    console.print(
        f"built {built.path} (agent {built.version}, {built.platform}, Python {built.python}, {built.wheels} wheels, "
        f"{built.size / 2**20:.1f} MiB)"
    )


@bundle_app.command("publish")
def publish(
    bundle: Path = typer.Argument(..., help="the edgefleet-agent-*.tar to publish"),
    repo: str = typer.Option(..., "--repo", help="repository folder, or s3://BUCKET/PREFIX with --keys DIR"),
    keys_dir: Path | None = typer.Option(None, "--keys", help="folder of the online private keys [REPO/keys]"),
    passphrase_env: str | None = typer.Option(
        None, envvar="EDGEFLEET_REPO_PASSPHRASE", hidden=True, help="passphrase of the online keys"
    ),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Sign an agent bundle into the TUF repository as target edgefleet-agent-VERSION-PLATFORM.tar; devices whose
    group's configuration names that agent_version then update themselves to it."""
    from edgefleet.package.agent_bundle import bundle_target, read_manifest
    from edgefleet.repository import Repository
    from edgefleet.repository.storage import is_s3

    if not bundle.is_file():
        raise UsageError(f"{bundle} does not exist")
    m = read_manifest(bundle)
    name = bundle_target(str(m["version"]), str(m["platform"]))
    where: Path | str = repo if is_s3(repo) else Path(repo)
    custom = {"agent_bundle": {k: m[k] for k in ("version", "platform", "python")}}
    info = Repository(where, passphrase_env or None, keys_dir=keys_dir).add_target(name, bundle, custom)
    if as_json:
        print_json({"target": info.name, "sha256": info.sha256, "length": info.length, **custom["agent_bundle"]})
        return
    console.print(f"published {info.name} ({info.length} bytes, sha256 {info.sha256[:16]}…)")


def register(app: typer.Typer) -> None:
    """Add this group's commands to ``app``."""
    app.add_typer(bundle_app, name="agent-bundle")

"""``edgefleet keys``: device key pairs for package encryption, and the signing keys of a repository."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from edgefleet.cli._output import cell, console, escape, print_json
from edgefleet.package import generate_device_keypair

keys_app = typer.Typer(help="Device keys and repository signing keys.", no_args_is_help=True)


@keys_app.command("device")
def device_command(
    out: Path = typer.Option(..., "--out", "-o", help="folder for <name>.key (mode 0600) and <name>.pub"),
    name: str = typer.Option("device", "--name", help="file name stem"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing key"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Make an X25519 key pair that packages can be encrypted for (`edgefleet package --encrypt-for`)."""
    pair = generate_device_keypair(out, name=name, overwrite=force)
    if as_json:
        print_json(
            {"private_key": str(pair.private_key_path), "public_key": pair.public_key_hex, "key_id": pair.key_id}
        )
        return
    console.print(f"private key  {pair.private_key_path} (mode 0600; keep it on the device)", markup=False)
    console.print(f"public key   {pair.public_key_hex}", markup=False)
    console.print(f"key id       {pair.key_id}", markup=False)


@keys_app.command("list")
def list_command(
    repo: Path = typer.Option(..., "--repo", help="repository folder"),
    keys_dir: Path | None = typer.Option(None, "--keys", help="folder of private keys (default: <repo>/keys)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List the signing keys per role of a repository and whether their private keys are at hand."""
    from edgefleet.repository import Repository

    rows = Repository(repo, keys_dir=keys_dir).keys()
    if as_json:
        print_json(rows)
        return
    t = Table(title=f"signing keys of {escape(repo)}", title_justify="left")
    for col in ("role", "key id", "type", "threshold", "private key"):
        t.add_column(col)
    for r in rows:
        t.add_row(
            cell(r["role"]),
            cell(r["keyid"]),
            cell(r["keytype"]),
            cell(r["threshold"]),
            "[green]present[/]" if r["private_key"] else "[yellow]offline/missing[/]",
        )
    console.print(t)


def register(app: typer.Typer) -> None:
    """Add this group's commands to ``app``."""
    app.add_typer(keys_app, name="keys")

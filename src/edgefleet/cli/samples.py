"""``edgefleet samples``: consented input sampling (docs/operations.md, "Input sampling") — the operator's key pair,
what a device samples, and pulling the samples down, decrypted with the private key (the control plane cannot)."""

from __future__ import annotations

import hashlib
import json
import re
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer

from edgefleet.cli._output import JsonOpt, console, err_console, print_json, wire
from edgefleet.cli.connection import ServerOpt, TokenOpt, client
from edgefleet.errors import DecryptionError, UsageError

samples_app = typer.Typer(
    help="Input sampling: the operator's key, what devices sampled, and pulling it decrypted.", no_args_is_help=True
)

_SAFE = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,63}")


class Format(StrEnum):
    npz = "npz"
    json = "json"


def _say(text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _file_name(text: str) -> str:
    """A name the device or server chose, safe as one path segment (else its hash): never ``..`` or a slash."""
    return text if _SAFE.fullmatch(text) else "x" + hashlib.sha256(text.encode()).hexdigest()[:32]


@samples_app.command("keygen")
def keygen_command(
    out: Path = typer.Option(Path("."), "--out", "-o", help="Folder for <name>.key (mode 0600) and <name>.pub"),
    name: str = typer.Option("samples", "--name", help="File name stem."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing key."),
    json_: bool = JsonOpt,
) -> None:
    """Make the X25519 key pair input samples are encrypted to: the public key goes into the group's configuration
    document (sample_public_key); the private key stays with whoever may read the inputs."""
    from edgefleet.package import generate_device_keypair

    pair = generate_device_keypair(out, name=name, overwrite=force)
    doc = {"private_key": str(pair.private_key_path), "public_key": pair.public_key_hex, "key_id": pair.key_id}
    if json_:
        print_json(doc)
        return
    _say(f"private key  {pair.private_key_path} (mode 0600; `samples pull --key` reads it)")
    _say(f"public key   {pair.public_key_hex}")
    _say(f"key id       {pair.key_id}")
    config = {"input_sampling": True, "sample_rate_per_min": 1, "sample_public_key": pair.public_key_hex}
    _say(f"to sample a group's inputs, add to its configuration document: {json.dumps(config)}")


@samples_app.command("list")
def list_command(
    device_id: str,
    limit: int = typer.Option(20, "--limit", min=1, max=100, help="How many samples, newest first."),
    server_: str = ServerOpt,
    token: str = TokenOpt,
    json_: bool = JsonOpt,
) -> None:
    """Whether a device samples its served inputs and at what rate, and the samples it uploaded (encrypted)."""
    with client(server_, token) as c:
        got = c.devices.samples(device_id, limit=limit)
    if json_:
        print_json(wire(got))
        return
    st = got.sampling
    if st.consent:
        _say(f"input sampling on: at most {st.rate_per_min:g} a minute, encrypted to key {st.key_id}")
    else:
        _say("input sampling off: the device's group has not consented (input_sampling)")
    dropped = "" if st.dropped_on_device is None else f"; {st.dropped_on_device} dropped on the device (spool full)"
    _say(f"{st.stored} sample(s) stored{dropped}")
    for x in got.samples:
        _say(f"{x.at}  {x.sample_id}  {x.model or '-'} {x.version or ''}  {x.bytes} bytes  key {x.key_id}")


def _write(folder: Path, sample_id: str, opened: Any, extra: dict[str, Any], fmt: Format) -> Path:
    from edgefleet.agent.sampling import npz_bytes

    folder.mkdir(parents=True, exist_ok=True)
    meta = {**opened.meta, **extra}
    tensors = opened.tensors
    stem = folder / _file_name(sample_id)
    if fmt is Format.json:
        doc = {
            **meta,
            "tensors": {
                n: {"dtype": str(a.dtype), "shape": list(a.shape), "data": a.tolist()} for n, a in tensors.items()
            },
        }
        path = stem.with_suffix(".json")
        path.write_text(json.dumps(doc))
        return path
    path = stem.with_suffix(".npz")
    path.write_bytes(npz_bytes(tensors))
    doc = {**meta, "tensors": {n: {"dtype": str(a.dtype), "shape": list(a.shape)} for n, a in tensors.items()}}
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    return path


@samples_app.command("pull")
def pull_command(
    device_id: str = typer.Argument(None, help="The device whose samples to pull (or --group)."),
    group: str = typer.Option(None, "--group", help="Pull the samples of every device of this group."),
    key: Path = typer.Option(..., "--key", help="The private key the samples are encrypted to (samples keygen)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder: <out>/<device>/<sample>.npz and .json."),
    limit: int = typer.Option(100, "--limit", min=1, max=100, help="Newest samples per device."),
    fmt: Format = typer.Option(Format.npz, "--format", help="npz (and a .json of metadata) or json."),
    server_: str = ServerOpt,
    token: str = TokenOpt,
    json_: bool = JsonOpt,
) -> None:
    """Download input samples and decrypt them with the private key: one file per sample, tensor name → array,
    with the model, version and time it was served. A sample pulled before is left as it is."""
    from edgefleet.agent.sampling import open_sample
    from edgefleet.package.keys import key_id, load_device_private_key, public_key_hex
    from edgefleet.protocol import InputSample

    if (device_id is None) == (group is None):
        raise UsageError("give a DEVICE or --group GROUP (one of them)")
    private = load_device_private_key(key)
    mine = key_id(public_key_hex(private))
    written: list[str] = []
    present = 0
    others: dict[str, int] = {}  # key id → samples encrypted to it, not to this key
    with client(server_, token) as c:
        devices = [device_id] if device_id else [d.device_id for d in c.devices.list() if d.group == group]
        if not devices:
            raise UsageError(f"group {group} has no devices")
        for dev in devices:
            folder = out / _file_name(dev)
            for x in c.devices.samples(dev, limit=limit).samples:
                if x.key_id != mine:
                    others[x.key_id] = others.get(x.key_id, 0) + 1
                    continue
                if (folder / (_file_name(x.sample_id) + f".{fmt.value}")).exists():
                    present += 1
                    continue
                got = c.devices.sample(dev, x.sample_id)
                sealed = InputSample.model_validate(got.sample.model_dump())
                opened = open_sample(sealed, private)
                extra = {"device_id": dev, "received_at": got.received_at, "key_id": x.key_id}
                written.append(str(_write(folder, x.sample_id, opened, extra, fmt)))
    skipped = sum(others.values())
    if skipped and not written and not present:
        kinds = ", ".join(sorted(others))
        raise DecryptionError(
            f"none of the {skipped} sample(s) is encrypted to {key} (key id {mine}) but to key {kinds}: pull with the "
            "private key whose public key the group's sample_public_key names"
        )
    if json_:
        print_json({"devices": devices, "written": written, "already_pulled": present, "other_key": skipped})
        return
    where = f"device {device_id}" if device_id else f"group {group} ({len(devices)} device(s))"
    _say(f"pulled {len(written)} sample(s) of {where} into {out}" + (f"; {present} pulled before" if present else ""))
    if skipped:
        err_console.print(
            f"{skipped} sample(s) are encrypted to another key ({', '.join(sorted(others))}): not pulled",
            markup=False,
            highlight=False,
        )


def register(app: typer.Typer) -> None:
    """Add this group's commands to ``app``."""
    app.add_typer(samples_app, name="samples")

"""The agent bundle: the agent's own distribution as one file a device can install offline, published to the TUF
repository like a model package (docs/operations.md, "Updating the agent").

A bundle is an uncompressed tar (its members are wheels, compressed already) named
``edgefleet-agent-<version>-<platform>.tar``::

    bundle.json        format, version, platform, python, and every wheel with its SHA-256 and size
    requirements.txt   every wheel pinned by name, version and hash (pip's --require-hashes)
    agent-launch       the launcher (edgefleet/agent/launcher.py): installs a bundle, starts and falls back
    wheels/*.whl       edgefleet without extras (what `edgefleet agent` needs: no server, tools or demo package),
                       its dependencies at the pins of constraints.txt, and pip itself (a bundle installs itself)

Building needs pip and an index (or a wheelhouse folder filled before, with ``offline``): wheels only, for the
target's platform and Python, never built from source on the device.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform as _platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edgefleet.errors import UsageError

__all__ = [
    "BUNDLE_FORMAT",
    "BuiltBundle",
    "build_agent_bundle",
    "bundle_target",
    "default_platform",
    "platform_tags",
    "read_manifest",
]

BUNDLE_FORMAT = 1  # as edgefleet.agent.launcher.BUNDLE_FORMAT, which reads it (a layer above: not imported here)
BUNDLE_NAME = "edgefleet-agent"
# the launcher ships inside every bundle: read as a file, it is the agent layer's and not imported from here
_LAUNCHER = Path(__file__).resolve().parents[1] / "agent" / "launcher.py"
_MANYLINUX = re.compile(r"^manylinux_(\d+)_(\d+)_(\w+)$")
_LEGACY = {"manylinux2014": 17, "manylinux2010": 12, "manylinux1": 5}
_PYTHON = re.compile(r"^3\.\d{1,2}$")


def bundle_target(version: str, platform: str) -> str:
    """The TUF target name of an agent bundle (as the launcher's ``bundle_target``)."""
    return f"{BUNDLE_NAME}-{version}-{platform}.tar"


def default_platform() -> str:
    """This machine's architecture at glibc 2.28 (Debian 10+, Raspberry Pi OS bookworm, Ubuntu 20.04+): the oldest
    glibc for which the pinned onnxruntime and numpy publish wheels."""
    arch = _platform.machine() or "x86_64"
    return f"manylinux_2_28_{'aarch64' if arch == 'arm64' else arch}"


def platform_tags(platform: str) -> list[str]:
    """Every wheel platform tag a system of ``platform`` runs: a manylinux tag takes the wheels of every older
    glibc too (pip's ``--platform`` takes each tag literally). Raises UsageError for a tag it does not know."""
    legacy = platform.split("_", 1)
    if legacy[0] in _LEGACY and len(legacy) == 2:
        platform = f"manylinux_2_{_LEGACY[legacy[0]]}_{legacy[1]}"
    m = _MANYLINUX.match(platform)
    if m is None or m.group(1) != "2":
        raise UsageError(
            f"--platform {platform}: give a manylinux tag such as manylinux_2_28_aarch64 (a 64-bit Raspberry Pi) "
            "or manylinux_2_28_x86_64"
        )
    glibc, arch = int(m.group(2)), m.group(3)
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(glibc, 4, -1)]
    tags += [f"{name}_{arch}" for name, minor in _LEGACY.items() if minor <= glibc]
    return tags


@dataclass(frozen=True)
class BuiltBundle:
    path: Path
    target: str
    version: str
    platform: str
    python: str
    sha256: str
    size: int
    wheels: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "target": self.target,
            "version": self.version,
            "platform": self.platform,
            "python": self.python,
            "sha256": self.sha256,
            "size": self.size,
            "wheels": self.wheels,
        }


def _pip(args: list[str], what: str) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        lines = [ln for ln in (r.stderr or r.stdout).strip().splitlines() if ln.startswith("ERROR")] or (
            r.stderr or r.stdout
        ).strip().splitlines()[-2:]
        raise UsageError(f"{what} failed: {' '.join(lines)[-800:]}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _clean_copy(source: Path, dest: Path) -> Path:
    """The project's top-level files and ``src/``, without build leftovers: setuptools never removes what an
    earlier build left in ``build/``, and a module deleted since would ship again."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    dest.mkdir(parents=True)
    for p in source.iterdir():
        if p.is_file():
            shutil.copy2(p, dest / p.name)
    if (source / "src").is_dir():
        shutil.copytree(source / "src", dest / "src", ignore=skip)
    return dest


def _wheel_name_version(filename: str) -> tuple[str, str]:
    name, version = filename.split("-")[:2]
    return re.sub(r"[-_.]+", "-", name).lower(), version


def build_agent_bundle(
    out_dir: Path,
    *,
    source: Path,
    platform: str | None = None,
    python: str = "3.11",
    constraints: Path | None = None,
    wheelhouse: Path | None = None,
    offline: bool = False,
    pip_version: str | None = None,
    wheel: Path | None = None,
) -> BuiltBundle:
    """Build the bundle of the project at ``source`` (a source tree, e.g. this checkout) into ``out_dir``.

    ``constraints`` pins the dependencies (the project's constraints.txt); ``wheelhouse`` keeps the dependency
    wheels between builds, and with ``offline`` they come from it alone (no index). ``pip_version`` is the pip
    the bundle installs itself with (default: the constraints' pin, else this pip's version). ``wheel`` is an
    edgefleet wheel built before (by CI, say) to bundle instead of building one from ``source``."""
    platform = platform or default_platform()
    tags = platform_tags(platform)
    if not _PYTHON.match(python):
        raise UsageError(f"--python {python}: give a version such as 3.11")
    if wheel is None and not (source / "pyproject.toml").is_file():
        raise UsageError(f"{source} is not a project folder (no pyproject.toml)")
    if constraints is not None and not constraints.is_file():
        raise UsageError(f"constraints file {constraints} does not exist")
    pip_pin = pip_version or _pinned(constraints, "pip") or _this_pip()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgefleet-bundle-") as tmp_name:
        tmp = Path(tmp_name)
        # the working tree's edgefleet, without extras: a device installs no server, tools or demo package
        if wheel is None:
            tree = _clean_copy(source, tmp / "source")
            _pip(["wheel", "-q", "--no-deps", "-w", str(tmp / "own"), str(tree)], f"building the wheel of {source}")
        else:
            if not wheel.is_file() or not wheel.name.startswith("edgefleet-") or wheel.suffix != ".whl":
                raise UsageError(f"--wheel {wheel}: not an edgefleet wheel file")
            (tmp / "own").mkdir()
            shutil.copy2(wheel, tmp / "own" / wheel.name)
        own = next((tmp / "own").glob("edgefleet-*.whl"))
        version = _wheel_name_version(own.name)[1]
        target = [
            "--only-binary=:all:",
            "--python-version",
            python,
            "--implementation",
            "cp",
            "--abi",
            f"cp{python.replace('.', '')}",
            *[a for t in tags for a in ("--platform", t)],
            *(["-c", str(constraints)] if constraints else []),
        ]
        wanted = [str(own), f"pip=={pip_pin}"]
        if wheelhouse is not None and not offline:
            wheelhouse.mkdir(parents=True, exist_ok=True)
            _pip(["download", "-q", *target, "-d", str(wheelhouse), *wanted], f"downloading wheels for {platform}")
            for stale in wheelhouse.glob("edgefleet-*.whl"):  # pip copies the wheel named; the cache is for the rest
                stale.unlink()
        local = ["--no-index", "--find-links", str(wheelhouse)] if wheelhouse is not None else []
        if offline and wheelhouse is None:
            raise UsageError("--offline needs --wheelhouse DIR (the wheels downloaded before)")
        wheels = tmp / "wheels"
        _pip(["download", "-q", *target, *local, "-d", str(wheels), *wanted], f"collecting wheels for {platform}")
        listed = []
        for w in sorted(wheels.glob("*.whl")):
            name, ver = _wheel_name_version(w.name)
            listed.append(
                {"file": w.name, "name": name, "version": ver, "sha256": _sha256(w), "size": w.stat().st_size}
            )
        if len(listed) != len(list(wheels.iterdir())):
            raise UsageError(
                f"not every dependency is a wheel for {platform}: {sorted(p.name for p in wheels.iterdir())}"
            )
        manifest = {
            "format": BUNDLE_FORMAT,
            "name": BUNDLE_NAME,
            "version": version,
            "platform": platform,
            "python": python,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "wheels": listed,
            "launcher_sha256": _sha256(_LAUNCHER),
        }
        requirements = "".join(f"{w['name']}=={w['version']} --hash=sha256:{w['sha256']}\n" for w in listed)
        path = out_dir / bundle_target(version, platform)
        _write_tar(
            path,
            {
                "bundle.json": json.dumps(manifest, indent=1, sort_keys=True).encode(),
                "requirements.txt": requirements.encode(),
                "agent-launch": _LAUNCHER.read_bytes(),
            },
            wheels,
        )
    return BuiltBundle(path, path.name, version, platform, python, _sha256(path), path.stat().st_size, len(listed))


def _write_tar(path: Path, files: dict[str, bytes], wheels: Path) -> None:
    tmp = path.with_name(f".{path.name}.part")

    def info(name: str, size: int, mode: int = 0o644) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mode, ti.mtime = size, mode, 0  # the same inputs give the same bytes
        return ti

    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            tar.addfile(info(name, len(data), 0o755 if name == "agent-launch" else 0o644), io.BytesIO(data))
        d = tarfile.TarInfo("wheels")
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 0
        tar.addfile(d)
        for w in sorted(wheels.glob("*.whl")):
            with open(w, "rb") as fh:
                tar.addfile(info(f"wheels/{w.name}", w.stat().st_size), fh)
    tmp.replace(path)


def read_manifest(path: Path) -> dict[str, Any]:
    """The ``bundle.json`` of the bundle at ``path`` (not checked further: the launcher checks on install)."""
    try:
        with tarfile.open(path, "r:") as tar:
            member = tar.extractfile("bundle.json")
            if member is None:
                raise KeyError("bundle.json")
            data = json.loads(member.read())
    except (tarfile.TarError, KeyError, OSError, ValueError) as err:
        raise UsageError(f"{path} is not an agent bundle: {err}") from None
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
        raise UsageError(f"{path}: agent bundle format {data.get('format')!r}, expected {BUNDLE_FORMAT}")
    return data


def _pinned(constraints: Path | None, name: str) -> str | None:
    if constraints is None:
        return None
    for line in constraints.read_text().splitlines():
        m = re.match(rf"^{re.escape(name)}==([^\s;#]+)", line.strip(), re.IGNORECASE)
        if m:
            return m.group(1)
    return None


def _this_pip() -> str:
    from importlib.metadata import version

    return version("pip")

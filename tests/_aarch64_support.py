"""An arm64 device on this x86-64 machine: Debian bookworm's own arm64 packages in a root made by ``mmdebstrap``,
run under ``qemu-user-static`` through the kernel's binfmt_misc, with edgefleet installed from aarch64 wheels
(tests/test_aarch64_qemu.py; docs/install.md, "A Raspberry Pi (64-bit OS)").

Built once and cached under ``$EDGEFLEET_AARCH64_CACHE`` (default ``~/.cache/edgefleet-aarch64``):

- ``root-<key>/``: the arm64 root (``python3.11-venv`` and what it needs), with a venv at ``/opt/edgefleet``;
- ``root-<key>/opt/wheels/<key>/``: the aarch64 wheels of edgefleet's dependencies at the versions of
  constraints.txt, the venv installed from them with ``--no-index``.

Each run builds edgefleet's wheel from the working tree and reinstalls it alone (``--no-deps``); ``pip check``
then proves every dependency is there. Processes in the root run under ``unshare --mount`` and ``chroot``: /proc,
/sys and /dev are mounted in a private mount namespace (gone with the process), and a host folder is bound at
``/mnt/host`` so the test reads what the device writes."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUITE = "bookworm"  # python3.11, as the project; Raspberry Pi OS (64-bit) is bookworm too
MIRROR = "http://deb.debian.org/debian"
PACKAGES = ("python3.11-venv", "libstdc++6", "ca-certificates")  # numpy's and onnxruntime's wheels link libstdc++
GLIBC_MINOR = 36  # bookworm's glibc 2.36: the newest manylinux tag its pip accepts
VENV = "/opt/edgefleet"
HOST_MOUNT = "/mnt/host"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
QEMU_CONF = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")  # qemu-user-static's registration line
CPUINFO = ".edgefleet-cpuinfo"  # in the root; bound over /proc/cpuinfo


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEFLEET_AARCH64_CACHE") or Path.home() / ".cache" / "edgefleet-aarch64")


def platforms(glibc_minor: int = GLIBC_MINOR) -> list[str]:
    """The wheel platform tags an aarch64 glibc 2.``glibc_minor`` system installs, for ``pip download
    --platform``: pip takes each tag literally, so every manylinux_2_N up to the system's is named (numpy and
    onnxruntime publish manylinux_2_27/2_28 aarch64 wheels only; ``manylinux2014`` alone finds none)."""
    return ["manylinux2014_aarch64", *(f"manylinux_2_{n}_aarch64" for n in range(17, glibc_minor + 1))]


def cpuinfo(cpus: int) -> str:
    """/proc/cpuinfo as a Raspberry Pi 4 (Cortex-A72, part 0xd08) shows it. qemu-user (7.2) passes the host's
    x86 /proc/cpuinfo through; onnxruntime's CPU detection (pytorch/cpuinfo) then reads x86 text beside the
    host's /sys CPU folders and crashes the interpreter with SIGSEGV as onnxruntime loads."""
    block = (
        "processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\n"
        "CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n"
    )
    return "".join(block.format(n=n) for n in range(cpus)) + "Model\t\t: emulated aarch64 (qemu-user)\n"


def why_not() -> str | None:
    """None when this machine can run an arm64 root, else what is missing and how to get it."""
    if os.geteuid() != 0:
        return "the arm64 root runs under chroot, which needs root"
    for tool in ("mmdebstrap", "unshare", "chroot"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed: run `make aarch64-deps`"
    if not QEMU_CONF.exists():
        return "qemu-user-static is not installed: run `make aarch64-deps`"
    handler = BINFMT / "qemu-aarch64"
    if not handler.exists():
        return f"no qemu-aarch64 handler in {BINFMT} (binfmt_misc): run `make aarch64-deps`"
    text = handler.read_text()
    if not text.startswith("enabled") or "flags: " not in text or "F" not in text.split("flags: ", 1)[1].split()[0]:
        # without F (fix binary) the kernel looks for the interpreter inside the chroot, where it is not
        return f"the qemu-aarch64 binfmt handler is disabled or lacks the F flag: {text.splitlines()[:3]}"
    return None


def _key(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:12]


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])} ... exited {r.returncode}:\n{(r.stdout + r.stderr)[-4000:]}")
    return r


def chroot_argv(root: Path, argv: list[str], host_dir: Path | None = None) -> list[str]:
    """``argv`` run inside ``root`` with /proc, /sys and /dev mounted, and ``host_dir`` at /mnt/host, all in a
    private mount namespace. One process all along (unshare, sh, chroot each exec the next): signals reach the
    program itself."""
    r = str(root)
    mounts = [
        f"mount -t proc proc {r}/proc",
        f"mount --bind {r}/{CPUINFO} {r}/proc/cpuinfo",
        f"mount --rbind /sys {r}/sys",
        f"mount --rbind /dev {r}/dev",
    ]
    if host_dir is not None:
        mounts.append(f'mount --bind "$EF_HOST_DIR" {r}{HOST_MOUNT}')
    script = " && ".join([*mounts, f'exec chroot {r} "$@"'])
    argv0 = ["env", f"EF_HOST_DIR={host_dir}"] if host_dir is not None else []
    return [*argv0, "unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *argv]


def in_root(root: Path, argv: list[str], timeout: float = 1800) -> str:
    return _run(chroot_argv(root, argv), timeout).stdout


def build_root(cache: Path) -> Path:
    """The arm64 root with a venv at /opt/edgefleet (made once: minutes, mostly Debian's mirror and qemu)."""
    key = _key(SUITE, MIRROR, *PACKAGES, VENV)
    root = cache / f"root-{key}"
    if (root / ".edgefleet-ready").exists():
        return root
    tmp = cache / f"root-{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    # "essential" plus python3.11-venv: no apt, no init; the agent needs the interpreter and its standard library
    _run(
        [
            "mmdebstrap",
            "--arch=arm64",
            "--variant=essential",
            f"--include={','.join(PACKAGES)}",
            SUITE,
            str(tmp),
            MIRROR,
        ],
        timeout=3600,
    )
    (tmp / HOST_MOUNT.lstrip("/")).mkdir(parents=True, exist_ok=True)
    (tmp / CPUINFO).write_text(cpuinfo(os.cpu_count() or 1))  # every process in the root has it bound
    in_root(tmp, ["/usr/bin/python3.11", "-m", "venv", VENV])
    (tmp / ".edgefleet-ready").write_text(SUITE + "\n")
    tmp.rename(root)
    return root


def build_wheel(out: Path) -> Path:
    """edgefleet's wheel from the working tree, built from a copy of what a wheel holds (an in-tree build/
    folder can keep modules the tree has since dropped)."""
    with tempfile.TemporaryDirectory(prefix="ef-wheel-src-") as src:
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            if (REPO / name).exists():
                shutil.copy2(REPO / name, Path(src) / name)
        shutil.copytree(REPO / "src", Path(src) / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        out.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), src], timeout=600)
    return next(out.glob("edgefleet-*.whl"))


def requirements(wheel: Path) -> list[str]:
    """The wheel's unconditional requirements: what a device installs (no extras)."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    return [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Requires-Dist:") and "extra ==" not in ln]


def install_agent(root: Path, wheel: Path) -> None:
    """The venv in ``root`` gets the wheels of edgefleet's dependencies (downloaded once per set of requirements
    and constraints) and then this ``wheel``."""
    reqs = requirements(wheel)
    constraints = (REPO / "constraints.txt").read_bytes()
    key = _key(*reqs, constraints, *platforms())
    wheels = root / "opt" / "wheels" / key
    if not (wheels / ".installed").exists():
        shutil.rmtree(wheels, ignore_errors=True)
        wheels.mkdir(parents=True)
        plat = [a for p in platforms() for a in ("--platform", p)]
        # Host pip, aarch64 wheels: no build on the device, and what the device gets is what PyPI ships for it.
        _run(
            [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", *plat, "--python-version", "3.11",
             "--implementation", "cp", "--abi", "cp311", "-c", str(REPO / "constraints.txt"), "-d", str(wheels), *reqs],
            timeout=1800,
        )  # fmt: skip
        inside = f"/opt/wheels/{key}"
        in_root(root, [f"{VENV}/bin/pip", "install", "-q", "--no-index", "--find-links", inside, *reqs])
        (wheels / ".installed").write_text("\n".join(reqs) + "\n")
    shutil.copy2(wheel, root / "tmp" / wheel.name)
    try:
        in_root(root, [f"{VENV}/bin/pip", "install", "-q", "--no-index", "--no-deps", "--force-reinstall",
                       f"/tmp/{wheel.name}"])  # fmt: skip
    finally:
        (root / "tmp" / wheel.name).unlink()
    in_root(root, [f"{VENV}/bin/pip", "check"], timeout=600)


def prepare() -> Path:
    """The arm64 root with this working tree's agent installed; cached parts reused."""
    cache = cache_dir()
    root = build_root(cache)
    (root / CPUINFO).write_text(cpuinfo(os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="ef-wheel-") as d:
        install_agent(root, build_wheel(Path(d)))
    return root

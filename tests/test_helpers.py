"""The shared low-level helpers: one atomic file write, one set of dtype tables."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from edgefleet import _fs, dtypes


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    target.write_bytes(b"old")
    assert _fs.atomic_write(target, b"new") == target
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_atomic_write_copies_a_file_given_as_a_path(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 << 20))  # more than one copy chunk
    out = _fs.atomic_write(tmp_path / "sub" / "dst.bin", src, mkdir=True)
    assert out.read_bytes() == src.read_bytes()


def test_mode_is_set_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        secret = _fs.atomic_write(tmp_path / "k", b"s", mode=0o600)
        public = _fs.atomic_write(tmp_path / "p", b"p", mode=0o644)
        plain = _fs.atomic_write(tmp_path / "x", b"x")
    finally:
        os.umask(old)
    assert _mode(secret) == 0o600
    assert _mode(public) == 0o644  # the umask would have made it 0600
    assert _mode(plain) == 0o600  # no mode: the umask decides, as open() does


def test_steps_are_named_in_order(tmp_path: Path) -> None:
    seen: list[str] = []
    _fs.atomic_write(tmp_path / "s", b"x", on_step=seen.append)
    assert seen == ["before_fsync", "after_fsync", "after_rename"]


def test_a_failed_write_leaves_the_target_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "t"
    target.write_bytes(b"old")

    def boom(step: str) -> None:
        if step == "after_fsync":
            raise RuntimeError("cut")

    with pytest.raises(RuntimeError):
        _fs.atomic_write(target, b"new", on_step=boom)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_a_missing_folder_is_an_os_error_unless_asked_to_create_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        _fs.atomic_write(tmp_path / "nope" / "f", b"x")
    assert _fs.atomic_write(tmp_path / "yes" / "f", b"x", mkdir=True).read_bytes() == b"x"


def test_callers_keep_their_modes_and_leave_no_temporaries(tmp_path: Path) -> None:
    from edgefleet.agent import durable
    from edgefleet.data import save_calls
    from edgefleet.package.keys import write_private_file

    durable.atomic_write(tmp_path / "identity.json", b"{}", "identity", mode=0o600)
    write_private_file(tmp_path / "device.key", b"k")
    save_calls(tmp_path / "calls.npz", {"x": np.zeros((2, 3), np.float32)})
    assert _mode(tmp_path / "identity.json") == _mode(tmp_path / "device.key") == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calls.npz", "device.key", "identity.json"]


def test_dtype_tables_agree() -> None:
    from edgefleet.agent import codec, frames
    from edgefleet.runtime import schema

    assert set(dtypes.ORT_TO_NUMPY.values()) == set(dtypes.ONNX_TO_NUMPY.values())
    assert set(dtypes.ORT_TO_NUMPY.values()) <= set(dtypes.OIP_TO_DTYPE.values())
    assert frozenset(dtypes.OIP_TO_DTYPE.values()) == frames.DTYPES
    assert codec.OIP_TO_DTYPE is dtypes.OIP_TO_DTYPE and schema.ORT_TO_NUMPY is dtypes.ORT_TO_NUMPY
    for name in dtypes.OIP_TO_DTYPE.values():
        np.dtype(name)  # every name is one numpy knows

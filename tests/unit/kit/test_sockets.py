"""Whether our sockets can be made in a directory, said in one line when not."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aiodp.kit import sockets


def test_sockets_root_or_a_writable_directory_can(short_dir: Path) -> None:
    assert sockets.cannot_create_in(short_dir) is None
    assert sockets.cannot_create_in(short_dir / "not" / "yet") is None  # made later


def test_sockets_no_write_access_is_one_line(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if Path(p) == short_dir else real(p, mode)
    )
    why = sockets.cannot_create_in(short_dir / "device-plugins")  # not there: its parent counts
    assert why is not None
    assert "\n" not in why
    assert why.startswith(f"cannot create our sockets in {short_dir}/device-plugins: uid ")
    assert f"no write access to {short_dir} (owned by uid 0, mode " in why
    assert why.endswith("run aiodp as root, as the kubelet runs")


def test_sockets_a_directory_we_cannot_even_see_into(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/var/lib/kubelet is 0700: a non-root process cannot stat device-plugins/ in it."""
    hidden = short_dir / "kubelet" / "device-plugins"
    hidden.mkdir(parents=True)
    real = os.stat

    def stat(p: object, *a: object, **kw: object) -> os.stat_result:
        if Path(str(p)) == hidden:
            raise PermissionError(13, "Permission denied")
        return real(p, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "stat", stat)
    why = sockets.cannot_create_in(hidden)
    assert why is not None
    assert f"no write access to {short_dir / 'kubelet'}" in why

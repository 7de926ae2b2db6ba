"""Small pieces: the kubelet's resource-name rule, JSON logs, directory watches."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
from pathlib import Path

import pytest

from aiodp.kit import logs, watch
from aiodp.standins.kubelet import valid_resource_name


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("nvidia.com/gpu", True),
        ("nvidia.com/mig-1g.10gb", True),
        ("example.com/foo", True),
        ("foo", False),
        ("kubernetes.io/foo", False),
        ("Example.com/foo", False),
        ("requests.nvidia.com/gpu", False),
        ("nvidia.com/-gpu", False),
        ("nvidia.com/" + "g" * 64, False),
    ],
)
def test_misc_kubelet_resource_name_rule(name: str, ok: bool) -> None:
    assert valid_resource_name(name) is ok


def test_misc_json_logs_carry_fields() -> None:
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    try:
        logging.getLogger("aiodp.test").warning(
            "device %s down", "GPU-1", extra={"device": "GPU-1", "reason": "XID 79", "xid": 79}
        )
    finally:
        logging.getLogger().handlers.clear()
    record = json.loads(out.getvalue())
    assert record["level"] == "warning"
    assert record["logger"] == "aiodp.test"
    assert record["message"] == "device GPU-1 down"
    assert (record["device"], record["reason"], record["xid"]) == ("GPU-1", "XID 79", 79)
    assert record["time"].endswith("Z")


async def test_misc_file_changes_sees_rename_write_and_configmap_swap(short_dir: Path) -> None:
    target = short_dir / "config.yaml"
    target.write_text("a")
    changes = watch.file_changes(target)
    pending = asyncio.ensure_future(anext(changes))
    await asyncio.sleep(0)  # let the watch start before the first change
    (short_dir / "unrelated").write_text("x")
    target.write_text("b")  # write in place
    await asyncio.wait_for(pending, 5)
    tmp = short_dir / "new"
    tmp.write_text("c")
    os.replace(tmp, target)  # an editor's rename
    await asyncio.wait_for(anext(changes), 5)
    # a ConfigMap volume: ..data is a symlink swapped by rename
    (short_dir / "..2026").mkdir()
    os.symlink("..2026", short_dir / "..data_tmp")
    os.replace(short_dir / "..data_tmp", short_dir / "..data")
    await asyncio.wait_for(anext(changes), 5)
    await changes.aclose()


async def test_misc_dirwatch_changes_ignore_unrelated_files(short_dir: Path) -> None:
    async with watch.DirWatch(short_dir) as dw:
        changes = dw.changes(["config.yaml", watch.CONFIGMAP_DATA])
        nxt = asyncio.ensure_future(anext(changes))
        await asyncio.sleep(0)  # the generator takes its starting count and waits
        (short_dir / "unrelated").write_text("x")
        await dw.wait(lambda: dw.seen(["unrelated"]) >= 2)  # CREATE, CLOSE_WRITE read
        await asyncio.sleep(0)  # a scheduling turn: the woken generator re-checks its count
        assert not nxt.done()  # the unrelated file woke it, but it does not yield
        (short_dir / "config.yaml").write_text("a")
        await asyncio.wait_for(nxt, 5)
        await changes.aclose()


async def test_misc_dirwatch_counts_events_by_name(short_dir: Path) -> None:
    async with watch.DirWatch(short_dir) as dw:
        assert dw.seen(["a"]) == 0
        (short_dir / "a").write_text("1")
        (short_dir / "a").unlink()
        await dw.wait(lambda: dw.seen(["a"]) >= 3)  # CREATE, CLOSE_WRITE, DELETE
        assert dw.seen(["b"]) == 0

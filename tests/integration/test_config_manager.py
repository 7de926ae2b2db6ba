"""`config-manager` (NVIDIA's sidecar and init container, for the GPU Operator's DaemonSet
shape) as a process, against the in-process API stand-in: the label's config symlinked into
place, SIGHUP to the process whose argv[0] is `nvidia-device-plugin`, bad settings exit 2.
`make cluster-e2e` runs it in the Operator's DaemonSet shape on a real node."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from aiodp.ops import configmanager
from tests.kubeapi import FakeApi

pytestmark = pytest.mark.integration

NODE = "gpu-node-1"
LABEL = "nvidia.com/device-plugin.config"


def settings(api: FakeApi, d: Path, **more: str) -> dict[str, str]:
    src = d / "available"
    src.mkdir(exist_ok=True)
    for name in ("a", "b"):
        (src / name).write_text(f"version: v1\n# {name}\n")
    return {
        "KUBECONFIG": str(api.kubeconfig(d)), "NODE_NAME": NODE, "NODE_LABEL": LABEL,
        "CONFIG_FILE_SRCDIR": str(src), "CONFIG_FILE_DST": str(d / "config.yaml"), **more,
    }  # fmt: skip


async def manager(env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aiodp", "config-manager", env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip


@asynccontextmanager
async def fake_plugin() -> AsyncIterator[asyncio.subprocess.Process]:
    """A process whose argv[0] is `nvidia-device-plugin` (as the image's wrapper makes it);
    SIGHUP's default action ends it, which is how the test sees the signal."""
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", "exec -a nvidia-device-plugin sleep 600"
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def said(proc: asyncio.subprocess.Process, text: str) -> None:
    assert proc.stdout is not None
    while True:
        line = (await proc.stdout.readline()).decode()
        assert line, f"the process ended before saying {text!r}"
        if text in line:
            return


@pytest.mark.timeout(30)
async def test_oneshot_links_the_labelled_config_and_exits(short_dir: Path) -> None:
    async with FakeApi(NODE, {LABEL: "b"}) as api:
        proc = await manager(settings(api, short_dir, ONESHOT="true"))
        out, _ = await proc.communicate()
        assert proc.returncode == 0, out
        assert os.readlink(short_dir / "config.yaml") == str(short_dir / "available" / "b")
        assert (short_dir / "config.yaml").read_text() == "version: v1\n# b\n"


@pytest.mark.timeout(30)
async def test_oneshot_without_label_uses_the_default_or_fails(short_dir: Path) -> None:
    async with FakeApi(NODE) as api:
        proc = await manager(settings(api, short_dir, ONESHOT="true", DEFAULT_CONFIG="a"))
        assert await proc.wait() == 0
        assert os.readlink(short_dir / "config.yaml").endswith("/a")
        # NVIDIA's: no label, no default, no fallback: nothing to start on (exit 1, said why)
        proc = await manager(settings(api, short_dir, ONESHOT="true"))
        out, _ = await proc.communicate()
        assert proc.returncode == 1
        assert b"no config for this node" in out


@pytest.mark.timeout(60)
async def test_sidecar_follows_the_label_and_sighups_the_plugin(short_dir: Path) -> None:
    dst = short_dir / "config.yaml"
    async with FakeApi(NODE, {LABEL: "a"}) as api, fake_plugin() as plugin:
        proc = await manager(settings(api, short_dir, SEND_SIGNAL="true", SIGNAL="1",
                                      PROCESS_TO_SIGNAL="nvidia-device-plugin"))  # fmt: skip
        try:
            await said(proc, "sent SIGHUP to nvidia-device-plugin")
            assert os.readlink(dst).endswith("/a")  # linked before the signal
            assert await plugin.wait() == -signal.SIGHUP  # the first link is a change too
            async with fake_plugin() as second:
                await api.label("no-such-config")  # refused: the link stays, the sidecar too
                await said(proc, "config not changed: node label names config 'no-such-config'")
                assert os.readlink(dst).endswith("/a")
                await api.label("b")
                await said(proc, "sent SIGHUP to nvidia-device-plugin")
                assert os.readlink(dst).endswith("/b")
                assert await second.wait() == -signal.SIGHUP
            assert proc.returncode is None
        finally:
            proc.terminate()
            await proc.wait()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"SIGNAL": "hup"}, "SIGNAL: 'hup' is not a signal number"),
        ({"NODE_NAME": ""}, "NODE_NAME (--node-name) must not be empty"),
        ({"ONESHOT": "maybe"}, "ONESHOT: 'maybe' is not true or false"),
        ({"FALLBACK_STRATEGIES": "named,guess"}, "unknown strategy 'guess'"),
    ],
)
async def test_bad_settings_exit_2_naming_them(
    short_dir: Path, env: dict[str, str], named: str
) -> None:
    async with FakeApi(NODE) as api:
        proc = await manager({**settings(api, short_dir), **env})
        out, _ = await proc.communicate()
    assert proc.returncode == 2
    assert named in out.decode()


def test_find_process_compares_argv0(tmp_path: Path) -> None:
    procs = {10: b"nvidia-device-plugin\0--x\0", 11: b"/bin/sh\0-c\0x\0",
             12: b"nvidia-device-plugin-not\0", 9: b"nvidia-device-plugin\0"}  # fmt: skip
    for pid, cmdline in procs.items():
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes(cmdline)
    (tmp_path / "self").mkdir()
    assert configmanager.find_process("nvidia-device-plugin", tmp_path) == 9
    assert configmanager.find_process("other", tmp_path) is None

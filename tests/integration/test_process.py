"""`python -m aiodp` as a real process: exit codes, signals, the demo."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sys
from pathlib import Path

import pytest

from aiodp._version import VERSION
from aiodp.standins.kubelet import FakeKubelet
from tests.harness import h100_node, next_update

pytestmark = pytest.mark.integration


async def aiodp(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aiodp",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "AIODP_METRICS_ADDRESS": "", **(env or {})},
    )


async def serve_simulated(
    directory: Path, *extra: str, node: str | None = None
) -> asyncio.subprocess.Process:
    """`aiodp serve` on a simulated node (the demo's 8 GPUs unless `node` is given)."""
    devices = directory / "devices.yaml"
    devices.write_text(h100_node() if node is None else node)
    return await aiodp(
        "serve",
        "--backend=simulated",
        f"--simulated-devices={devices}",
        f"--kubelet-socket={directory / 'kubelet.sock'}",
        *extra,
    )


async def finish(proc: asyncio.subprocess.Process) -> tuple[int, str, str]:
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_process_signal_removes_socket_and_exits_zero(
    short_dir: Path, sig: signal.Signals
) -> None:
    async with FakeKubelet(short_dir) as kubelet:
        proc = await serve_simulated(short_dir)
        reg = await kubelet.registrations.get()
        await next_update(kubelet, lambda u: bool(u.devices))
        assert (short_dir / reg.endpoint).is_socket()
        proc.send_signal(sig)
        code, _, err = await finish(proc)
        assert code == 0, err
        assert not (short_dir / reg.endpoint).exists()
        ended = await next_update(kubelet, lambda u: u.ended)
        assert ended.resource == "nvidia.com/gpu"
        assert "shutting down" in err


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--device-id-strategy", "serial"], {}, "--device-id-strategy: invalid value 'serial'"),
        ([], {"DEVICE_ID_STRATEGY": "serial"}, "DEVICE_ID_STRATEGY: invalid value 'serial'"),
        (["--health-interval", "-1"], {}, "--health-interval: invalid value '-1'"),
        ([], {"AIODP_LOG_FORMAT": "xml"}, "AIODP_LOG_FORMAT: invalid value 'xml'"),
        (["--fail-on-init-error", "maybe"], {}, "--fail-on-init-error: invalid value 'maybe'"),
        (["--no-such-flag"], {}, "unrecognized arguments: --no-such-flag"),
        (["--backend", "simulated"], {}, "needs --simulated-devices"),
    ],
)
async def test_process_bad_flag_exits_2_naming_it(
    args: list[str], env: dict[str, str], needle: str
) -> None:
    code, _, err = await finish(await aiodp("serve", *args, env=env))
    assert code == 2
    assert needle in err


async def test_process_bad_simulated_file_exits_2_naming_the_key(short_dir: Path) -> None:
    node = "gpus:\n  - uuid: GPU-a\n  - uuid: GPU-a\n"
    code, _, err = await finish(await serve_simulated(short_dir, node=node))
    assert code == 2
    assert "gpus[1].uuid: duplicate uuid 'GPU-a'" in err


async def test_process_demo_runs_and_exits_zero() -> None:
    code, out, err = await finish(await aiodp("demo"))
    assert code == 0, err
    for step in ("1. registered nvidia.com/gpu", "4. fault injection", "5. kubelet restart"):
        assert step in out
    assert "6. stopped with exit code 0; sockets left: ['kubelet.sock']" in out


async def test_process_json_logs_one_object_per_line(short_dir: Path) -> None:
    import json

    async with FakeKubelet(short_dir) as kubelet:
        proc = await serve_simulated(short_dir, "--log-format=json")
        await kubelet.registrations.get()
        proc.send_signal(signal.SIGTERM)
        code, _, err = await finish(proc)
    assert code == 0
    records = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert {"time", "level", "logger", "message"} <= set(records[0])
    assert any(r.get("resource") == "nvidia.com/gpu" for r in records)


async def test_process_nvml_without_driver_fails_in_one_clear_line(short_dir: Path) -> None:
    code, _, err = await finish(
        await aiodp("serve", "--backend=nvml", f"--kubelet-socket={short_dir / 'kubelet.sock'}")
    )
    assert code == 1
    lines = [line for line in err.splitlines() if "ERROR" in line]
    assert len(lines) == 1
    assert "cannot start the device backend: NVML initialisation failed:" in lines[0]
    assert "Traceback" not in err


async def test_process_nvml_without_driver_waits_when_told(short_dir: Path) -> None:
    proc = await aiodp(
        "serve",
        "--backend=nvml",
        "--fail-on-init-error=false",
        f"--kubelet-socket={short_dir / 'kubelet.sock'}",
    )
    assert proc.stderr is not None
    line = await proc.stderr.readline()
    while b"backend initialisation" not in line:
        line = await proc.stderr.readline()
    assert b"attempt #1 failed; retrying" in line
    assert not (short_dir / "aiodp-nvidia-gpu.sock").exists()  # nothing registered meanwhile
    proc.send_signal(signal.SIGTERM)
    code, _, _ = await finish(proc)
    assert code == 0


async def test_process_bad_config_file_exits_2_naming_the_key(short_dir: Path) -> None:
    config = short_dir / "config.yaml"
    config.write_text(
        "version: v1\nsharing:\n  timeSlicing:\n    resources:\n"
        "      - {name: nvidia.com/gpu, replicas: 1}\n"
    )
    code, _, err = await finish(await aiodp("serve", f"--config-file={config}"))
    assert code == 2
    assert "sharing.timeSlicing.resources[0].replicas: must be >= 2, got 1" in err


async def test_process_mig_single_refusal_exits_2(short_dir: Path) -> None:
    node = (
        "gpus:\n  - {uuid: GPU-a}\n  - uuid: GPU-b\n    mig_devices:\n"
        "      - {uuid: MIG-b, profile: 1g.10gb, gi: 1, ci: 0}\n"
    )
    code, _, err = await finish(
        await serve_simulated(short_dir, "--mig-strategy=single", node=node)
    )
    assert code == 2
    assert "migStrategy single: the node mixes MIG-enabled and non-MIG GPUs" in err


def _wait_stopped(pid: int) -> bool:
    """Block (in a thread) until the process is in the stopped state 'T' (or 5 s pass)."""
    import time

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return True
        time.sleep(0.001)
    return False


async def test_process_second_signal_exits_at_once(short_dir: Path) -> None:
    async with FakeKubelet(short_dir) as kubelet:
        proc = await serve_simulated(short_dir)
        reg = await kubelet.registrations.get()
        # Stopped, the process gets both signals at once when it resumes: the first asks
        # for a graceful stop, the second arrives before that can finish.
        proc.send_signal(signal.SIGSTOP)
        assert await asyncio.to_thread(_wait_stopped, proc.pid)
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)
        code, _, err = await finish(proc)
    # which of the two the loop sees second varies; a graceful stop would exit 0
    assert code in (128 + signal.SIGINT, 128 + signal.SIGTERM)
    assert f"second {signal.Signals(code - 128).name}: exiting at once" in err
    assert not (short_dir / reg.endpoint).exists()  # our socket goes first: that is cheap


async def test_process_version_prints_version_and_commit() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aiodp", "--version", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    line = out.decode().strip()
    assert line.startswith(f"aiodp {VERSION} (commit ")
    assert line != f"aiodp {VERSION} (commit unknown)"  # a checkout knows its commit


async def test_process_metrics_port_in_use_is_one_line_and_exit_1(short_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with FakeKubelet(short_dir):
            proc = await serve_simulated(short_dir, f"--metrics-address=127.0.0.1:{port}")
            code, _, err = await finish(proc)
    assert code == 1
    assert f"--metrics-address 127.0.0.1:{port}: cannot listen:" in err
    assert "address already in use" in err.lower()
    errors = [line for line in err.splitlines() if " ERROR " in line or " CRITICAL " in line]
    assert len(errors) == 1  # one line
    assert "Traceback" not in err


async def test_process_waits_for_a_missing_device_plugins_directory(short_dir: Path) -> None:
    """A booting node: the kubelet creates its directory after we start. One line, no
    traceback, and registration once it is there."""
    plugins = short_dir / "kubelet" / "device-plugins"
    devices = short_dir / "devices.yaml"
    devices.write_text(h100_node())
    proc = await aiodp(
        "serve", "--backend=simulated", f"--simulated-devices={devices}",
        f"--kubelet-socket={plugins / 'kubelet.sock'}", "--metrics-address=",
    )  # fmt: skip
    assert proc.stderr is not None
    async with asyncio.timeout(10):
        while b"to be created" not in await proc.stderr.readline():
            pass
    async with FakeKubelet(plugins) as kubelet:  # creates the directories, then serves
        reg = await asyncio.wait_for(kubelet.registrations.get(), 10)
        assert reg.resource == "nvidia.com/gpu"
        proc.send_signal(signal.SIGTERM)
        code, _, err = await finish(proc)
    assert code == 0
    assert "Traceback" not in err


def _readable_by_all(directory: Path) -> Path:
    directory.chmod(0o755)
    devices = directory / "devices.yaml"
    devices.write_text(h100_node())
    devices.chmod(0o644)
    return devices


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root")
async def test_process_non_root_on_the_kubelets_directory_is_one_line(short_dir: Path) -> None:
    """A directory we may not write (as a non-root user meets the kubelet's): one clear line
    (which directory, its owner and mode, what to do) and exit 1, not a traceback. Root
    without CAP_DAC_OVERRIDE stands in for another user (pyenv's Python is not theirs)."""
    devices = _readable_by_all(short_dir)
    async with FakeKubelet(short_dir):
        os.chown(short_dir, 65534, 65534)  # the stand-in's socket is already there
        proc = await asyncio.create_subprocess_exec(
            "setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner",
            sys.executable, "-m", "aiodp", "serve", "--backend=simulated",
            f"--simulated-devices={devices}", f"--kubelet-socket={short_dir / 'kubelet.sock'}",
            "--metrics-address=",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        code, _, err = await finish(proc)
    assert code == 1
    assert (
        f"cannot create our socket {short_dir / 'aiodp-nvidia-gpu.sock'}: Permission denied" in err
    )
    assert f"(directory {short_dir} owned by uid 65534, mode 755)" in err
    assert "Traceback" not in err


async def test_process_status_command_asks_the_running_plugin(short_dir: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"AIODP_METRICS_ADDRESS": f"127.0.0.1:{port}"}
    down = await aiodp("status", env=env)
    code, _, err = await finish(down)
    assert code == 1
    assert f"no aiodp answers at http://127.0.0.1:{port}/status" in err
    assert len(err.strip().splitlines()) == 1
    async with FakeKubelet(short_dir) as kubelet:
        proc = await serve_simulated(short_dir, f"--metrics-address=127.0.0.1:{port}")
        await kubelet.registrations.get()
        await next_update(kubelet, lambda u: bool(u.devices))
        for output in ("json", "yaml", "table"):
            asked = await aiodp("status", f"--output={output}", env=env)
            code, out, err = await finish(asked)
            assert code == 0, err
            assert "GPU-00000007-aiod-4d3e-8f00-00005eed0007" in out
        proc.send_signal(signal.SIGTERM)
        assert (await finish(proc))[0] == 0

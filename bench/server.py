"""Servers measured by the bench, each in its own process: `python -m bench.server KIND DIR`.

`plugin`: the real plugin (app.main, simulated 8 GPUs) registered with the kubelet stand-in.
`floor`: a bare grpclib server answering a fixed AllocateResponse (the transport floor).
Prints `READY <socket path>` and serves until stdin closes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

import grpclib.server
import uvloop

from aiodp import app
from aiodp.config import resolve as cfg
from aiodp.gen.deviceplugin import v1beta1 as api
from aiodp.ops.status import Status
from aiodp.standins.kubelet import FakeKubelet
from aiodp.standins.testbed import h100_node, next_update, write_atomically

FIXED = api.AllocateResponse(
    container_responses=[
        api.ContainerAllocateResponse(
            envs={"NVIDIA_VISIBLE_DEVICES": "GPU-00000000-aiod-4d3e-8f00-00005eed0000"}
        )
    ]
)


class Floor(api.DevicePluginBase):
    async def allocate(self, message: api.AllocateRequest) -> api.AllocateResponse:
        return FIXED


async def stdin_closed() -> None:
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)


async def serve_floor(directory: Path) -> None:
    path = directory / "floor.sock"
    server = grpclib.server.Server([Floor()])
    await server.start(path=str(path))
    print(f"READY {path} -", flush=True)
    await stdin_closed()
    server.close()


REPLICAS_128 = (
    "version: v1\nsharing:\n  timeSlicing:\n    resources:\n"
    "      - {name: nvidia.com/gpu, replicas: 128}\n"
)


async def flips(kubelet: FakeKubelet, devices: Path) -> None:
    """Answer `flip N` lines on stdin: N health flips of GPU 3 through the simulated file,
    each awaited on the kubelet stand-in's stream; then `DONE`. Ends when stdin closes."""
    loop = asyncio.get_running_loop()
    uuid = "GPU-00000003-aiod-4d3e-8f00-00005eed0003"
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        for i in range(int(line.split()[1])):
            sick = i % 2 == 0
            write_atomically(devices, h100_node(unhealthy={3: "XID 79"} if sick else {}))
            want = "Unhealthy" if sick else "Healthy"
            await next_update(
                kubelet,
                lambda u, w=want: any(d.id == uuid and d.health == w for d in u.devices),  # type: ignore[misc]
            )
        print("DONE", flush=True)


async def serve_plugin(
    directory: Path, replicas: bool = False, profile: bool = False, soak: bool = False
) -> None:
    devices = directory / "devices.yaml"
    devices.write_text(h100_node())
    explicit: dict[str, object] = {
        "backend": "simulated",
        "simulated_devices": devices,
        "kubelet_socket": directory / "kubelet.sock",
        "metrics_address": "127.0.0.1:0",
    }
    file = None
    if replicas:
        (directory / "config.yaml").write_text(REPLICAS_128)
        explicit["config_file"] = directory / "config.yaml"
        file = cfg.load(directory / "config.yaml")
    config = cfg.build(explicit, file)
    stop, status = asyncio.Event(), Status()
    async with FakeKubelet(directory) as kubelet, asyncio.TaskGroup() as tg:
        task = tg.create_task(app.main(config, stop=stop, status=status))
        await status.ready.wait()
        await kubelet.updates.get()
        assert status.endpoint is not None
        print(f"READY {config.socket_path('nvidia.com/gpu')} {status.endpoint.address}", flush=True)
        if soak:
            await flips(kubelet, devices)
        elif profile:  # the calls made until stdin closes, function by function
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
            await stdin_closed()
            profiler.disable()
            profiler.dump_stats(str(directory / "calls.pstats"))
        else:
            await stdin_closed()
        stop.set()
        await task


def main() -> None:
    kind, directory = sys.argv[1], Path(sys.argv[2])
    logging.basicConfig(level=os.environ.get("AIODP_LOG_LEVEL", "warning").upper())
    if kind == "floor":
        uvloop.run(serve_floor(directory))
    else:
        uvloop.run(
            serve_plugin(
                directory,
                replicas=kind == "plugin-1024",
                profile=kind == "profile",
                soak=kind == "soak",
            )
        )


if __name__ == "__main__":
    main()

"""Servers measured by the bench, each in its own process: `python -m bench.server KIND DIR`.

`plugin`: the real plugin (app.main, simulated 8 GPUs) registered with the kubelet stand-in.
`floor`: a bare grpclib server answering a fixed AllocateResponse (the transport floor).
Prints `READY <socket path>` and serves until stdin closes.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpclib.server
import uvloop

from aiodp import app
from aiodp.api import v1beta1 as api
from aiodp.config import Config
from aiodp.demo import h100_node
from aiodp.fakekubelet import FakeKubelet

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


async def serve_plugin(directory: Path) -> None:
    devices = directory / "devices.yaml"
    devices.write_text(h100_node())
    config = Config(
        backend="simulated",
        simulated_devices=devices,
        kubelet_socket=directory / "kubelet.sock",
        metrics_address="127.0.0.1:0",
    )
    stop, ready, state = asyncio.Event(), asyncio.Event(), app.State()
    async with FakeKubelet(directory) as kubelet, asyncio.TaskGroup() as tg:
        task = tg.create_task(
            app.main(config, stop=stop, ready=ready, state=state, handle_signals=False)
        )
        await ready.wait()
        await kubelet.updates.get()
        assert state.endpoint is not None
        print(f"READY {config.socket_path('nvidia.com/gpu')} {state.endpoint.address}", flush=True)
        await stdin_closed()
        stop.set()
        await task


def main() -> None:
    kind, directory = sys.argv[1], Path(sys.argv[2])
    uvloop.run(serve_plugin(directory) if kind == "plugin" else serve_floor(directory))


if __name__ == "__main__":
    main()

"""The ResourceSlice publisher against the API stand-in: a pool that shrinks deletes its
extra slices, a server without resource.k8s.io says so, generations only grow."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from lightkube import AsyncClient, KubeConfig

from aiodp.dra import publisher as resourceslices
from aiodp.dra import slices
from tests.kubeapi import FakeApi

pytestmark = pytest.mark.integration

NODE = "node-1"
DRIVER = "gpu.aiodp.io"


def pool(n: int) -> slices.Pool:
    devices = tuple({"name": f"gpu-{i}", "attributes": {"index": {"string": str(i)}}}
                    for i in range(n))  # fmt: skip
    return slices.Pool(NODE, DRIVER, devices)


@pytest.fixture
async def api(short_dir: Path) -> AsyncIterator[tuple[FakeApi, AsyncClient]]:
    async with FakeApi(NODE) as fake:
        client = AsyncClient(KubeConfig.from_file(fake.kubeconfig(short_dir)))
        try:
            yield fake, client
        finally:
            await client.close()


async def test_a_pool_that_shrinks_deletes_its_extra_slices(
    api: tuple[FakeApi, AsyncClient],
) -> None:
    fake, client = api
    publisher = resourceslices.Publisher(client, NODE, DRIVER)
    assert await publisher.publish(pool(300))
    assert sorted(len(s["spec"]["devices"]) for s in fake.slices.values()) == [44, 128, 128]
    first = publisher.generation
    assert not await publisher.publish(pool(300))  # unchanged: nothing written
    assert await publisher.publish(pool(10))
    (only,) = fake.slices.values()
    assert len(only["spec"]["devices"]) == 10
    assert only["spec"]["pool"] == {"name": NODE, "generation": first + 1, "resourceSliceCount": 1}


async def test_generations_continue_from_what_the_server_holds(
    api: tuple[FakeApi, AsyncClient],
) -> None:
    """A restarted plugin finds its old slices at generation N and publishes N+1."""
    fake, client = api
    assert await resourceslices.Publisher(client, NODE, DRIVER).publish(pool(2))
    old = next(iter(fake.slices.values()))["spec"]["pool"]["generation"]
    again = resourceslices.Publisher(client, NODE, DRIVER)
    assert await again.publish(pool(2))
    assert next(iter(fake.slices.values()))["spec"]["pool"]["generation"] == old + 1


async def test_no_resource_api_is_a_clear_error(api: tuple[FakeApi, AsyncClient]) -> None:
    fake, client = api
    fake.resource_versions = ()
    with pytest.raises(ConnectionError, match=r"serves no resource\.k8s\.io version we write"):
        await resourceslices.served_version(client, NODE, DRIVER)

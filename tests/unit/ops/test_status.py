"""The status record's phase: what /status says the plugin is doing."""

from __future__ import annotations

from dataclasses import dataclass

from aiodp.ops.status import Status


@dataclass
class Service:
    """What the record reads of a device-plugin service (a stream open, nothing sent)."""

    resource: str
    open_streams: int = 1
    kubelet_stream_open: bool = True
    kubelet_sent: frozenset[str] = frozenset()


def registered(status: Status, *names: str) -> dict[str, Service]:
    status.want(names)
    services = {n: Service(n) for n in names}
    for n, service in services.items():
        status.generation_started(service)
        status.accepted(n, (1, 0))
    return services


def test_status_phase_is_serving_once_ready_with_streams_open() -> None:
    status = Status()
    status.set_phase("registering with the kubelet")
    registered(status, "nvidia.com/gpu")
    assert status.readiness() is None
    assert status.phase == "serving"
    assert status.snapshot()["phase"] == "serving"


def test_status_phase_waits_for_the_stream() -> None:
    status = Status()
    status.set_phase("registering with the kubelet")
    services = registered(status, "nvidia.com/gpu")
    services["nvidia.com/gpu"].kubelet_stream_open = False
    assert status.readiness() == "nvidia.com/gpu: registered, but no ListAndWatch stream is open"
    assert status.phase == "registering with the kubelet"


def test_status_a_removed_resource_is_not_re_registering() -> None:
    """A reload that only removes a resource leaves the plugin serving the rest."""
    status = Status()
    services = registered(status, "nvidia.com/gpu", "nvidia.com/mig-1g.10gb")
    status.want(["nvidia.com/gpu"])  # the new plan, before the removed one is retired
    gone = services["nvidia.com/mig-1g.10gb"]
    status.generation_ended(gone, "retired by a new config")
    status.generation_closed(gone)
    assert status.phase == "serving"
    assert status.snapshot()["phase"] == "serving"


def test_status_a_kubelet_restart_is_re_registering() -> None:
    status = Status()
    services = registered(status, "nvidia.com/gpu")
    status.generation_ended(services["nvidia.com/gpu"], "kubelet.sock re-created")
    assert status.phase == "re-registering nvidia.com/gpu: kubelet.sock re-created"

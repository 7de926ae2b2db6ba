from __future__ import annotations

import sys

import pytest

from aiodp.kit import metrics


@pytest.mark.parametrize(
    ("reason", "label"),
    [
        ("XID 79", "XID 79"),
        ("XID 79 (simulated): fell off the bus", "XID 79"),
        ("NVML failure: Driver Not Loaded", "NVML failure"),
        ("GPU is lost", "GPU is lost"),
        ("", "unknown"),
        ("x" * 100, "x" * 40),
    ],
)
def test_metrics_reason_labels_are_bounded(reason: str, label: str) -> None:
    assert metrics.reason_class(reason) == label


def test_metrics_device_gauges_come_from_the_source() -> None:
    metrics.set_device_source(
        lambda: [
            ("nvidia.com/gpu", "GPU-0", "Healthy", ""),
            ("nvidia.com/gpu", "GPU-1", "Unhealthy", "XID 79"),
            ("nvidia.com/gpu.shared", "GPU-2::0", "Healthy", ""),
        ]
    )
    try:
        body, ctype = metrics.render()
    finally:
        metrics.set_device_source(None)
    assert ctype.startswith("text/plain")
    values = metrics.samples(body.decode())
    assert values['aiodp_devices{health="Healthy",resource="nvidia.com/gpu"}'] == 1
    assert values['aiodp_devices{health="Unhealthy",resource="nvidia.com/gpu"}'] == 1
    assert values['aiodp_devices{health="Unhealthy",resource="nvidia.com/gpu.shared"}'] == 0
    assert (
        values['aiodp_device_healthy{device="GPU-1",reason="XID 79",resource="nvidia.com/gpu"}']
        == 0
    )
    assert values['aiodp_device_healthy{device="GPU-0",reason="",resource="nvidia.com/gpu"}'] == 1


def test_metrics_counters_and_histogram() -> None:
    def value(key: str) -> float:
        return metrics.samples(metrics.render()[0].decode()).get(key, 0.0)

    xid = 'aiodp_xid_events_total{action="ignored",xid="13"}'
    before = value(xid)
    metrics.observe_xid(13, acted=False)
    assert value(xid) == before + 1
    bucket = 'aiodp_request_duration_seconds_bucket{le="0.001",method="Allocate",resource="t/x"}'
    metrics.observe_request("Allocate", "t/x", "OK", 0.0004)
    metrics.observe_request("Allocate", "t/x", "OK", 0.02)
    assert value(bucket) == 1
    assert value('aiodp_requests_total{code="OK",method="Allocate",resource="t/x"}') == 2


def test_metrics_build_info_names_the_running_versions() -> None:
    from importlib import metadata

    import grpclib

    import aiodp

    values = metrics.samples(metrics.render()[0].decode())
    (key,) = (k for k in values if k.startswith("aiodp_build_info{"))
    assert values[key] == 1
    python = ".".join(map(str, sys.version_info[:3]))
    assert key == (
        f'aiodp_build_info{{grpclib="{grpclib.__version__}",'
        f'nvml="{metadata.version("nvidia-ml-py")}",python="{python}",'
        f'version="{aiodp.__version__}"}}'
    )
    assert metadata.version("aiodp") == aiodp.__version__

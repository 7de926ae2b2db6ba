"""A claim's GpuConfig (ours or NVIDIA's), checked field by field: each wrong value is this
claim's error naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from aiodp.dra import claims
from aiodp.dra.claims import ClaimError

DRIVER = "gpu.aiodp.io"


def config(sharing: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"requests": ["gpu"], "opaque": {"driver": DRIVER, "parameters": {
        "apiVersion": "resource.nvidia.com/v1beta1", "kind": "GpuConfig", "sharing": sharing,
    }}}]  # fmt: skip


WHERE = "config[0].opaque.parameters.sharing"


@pytest.mark.parametrize(
    ("mps", "message"),
    [
        ({"defaultActiveThreadPercentage": 150},
         f"{WHERE}.mpsConfig.defaultActiveThreadPercentage: must be an integer from 1 to 100, "
         "got 150"),
        ({"defaultActiveThreadPercentage": True},
         f"{WHERE}.mpsConfig.defaultActiveThreadPercentage: must be an integer from 1 to 100"),
        ({"defaultPinnedDeviceMemoryLimit": "100Gi"},
         f"{WHERE}.mpsConfig.defaultPinnedDeviceMemoryLimit: 102400 MiB is more than the "
         "GPU's memory (81559 MiB)"),
        ({"defaultPinnedDeviceMemoryLimit": "lots"},
         f"{WHERE}.mpsConfig.defaultPinnedDeviceMemoryLimit: must be a quantity such as 10Gi"),
        ({"defaultPerDevicePinnedMemoryLimit": {"0": "90G"}},
         f"{WHERE}.mpsConfig.defaultPerDevicePinnedMemoryLimit['0']: 85830 MiB is more than"),
    ],
)  # fmt: skip
def test_gpu_config_mps_limits_are_checked_and_named(mps: dict[str, Any], message: str) -> None:
    with pytest.raises(ClaimError) as err:
        claims.check_config(config({"strategy": "MPS", "mpsConfig": mps}), DRIVER, {"gpu"}, 81559)
    assert str(err.value).startswith(message)


def test_gpu_config_mps_within_limits_is_asked_per_request() -> None:
    ok = {"defaultActiveThreadPercentage": 50, "defaultPinnedDeviceMemoryLimit": "10Gi"}
    got = claims.check_config(config({"strategy": "MPS", "mpsConfig": ok}), DRIVER, {"gpu"}, 81559)
    assert got.mps == {"gpu": (50, 10240)}
    assert got.time_slices == {}


def test_gpu_config_time_slice_interval_is_one_of_nvidias() -> None:
    with pytest.raises(ClaimError, match=r"interval: must be one of Default, Short, Medium, Long"):
        claims.check_config(
            config({"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Forever"}}),
            DRIVER, {"gpu"},
        )  # fmt: skip
    default = claims.check_config(
        config({"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Default"}}),
        DRIVER, {"gpu"},
    )  # fmt: skip
    assert default.time_slices == {}

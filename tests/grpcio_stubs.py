"""grpcio stubs generated from our proto at import: a peer that nobody here wrote."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GEN = Path(__file__).resolve().parent / "_grpcio_gen"


def _generate_grpcio_stubs() -> None:
    """grpcio stubs from the same proto, for a peer that nobody here wrote."""
    from grpc_tools import protoc

    GEN.mkdir(exist_ok=True)
    for proto in ("deviceplugin/v1beta1/api.proto", "podresources/v1/api.proto"):
        rc = protoc.main(
            [
                "protoc",
                f"-I{ROOT / 'protos'}",
                f"--python_out={GEN}",
                f"--grpc_python_out={GEN}",
                str(ROOT / "protos" / proto),
            ]
        )
        assert rc == 0, f"grpc_tools.protoc failed on {proto}"
        pkg = GEN / proto.split("/")[0]
        for d in (pkg, pkg / proto.split("/")[1]):
            (d / "__init__.py").touch()
    # DRA: registration and the node API as the others; the health proto's directory has a
    # hyphen, so it is generated from its own include root (module v1alpha1.api_pb2)
    for proto in ("pluginregistration/v1/api.proto", "dra/v1/api.proto", "dra/v1beta1/api.proto"):
        rc = protoc.main(
            ["protoc", f"-I{ROOT / 'protos'}", f"--python_out={GEN}", f"--grpc_python_out={GEN}",
             str(ROOT / "protos" / proto)]
        )  # fmt: skip
        assert rc == 0, f"grpc_tools.protoc failed on {proto}"
        pkg = GEN / proto.split("/")[0]
        for d in (pkg, pkg / proto.split("/")[1]):
            (d / "__init__.py").touch()
    health = GEN / "dra_health"
    health.mkdir(exist_ok=True)
    rc = protoc.main(
        ["protoc", f"-I{ROOT / 'protos' / 'dra-health'}", f"--python_out={health}",
         f"--grpc_python_out={health}", str(ROOT / "protos" / "dra-health" / "v1alpha1/api.proto")]
    )  # fmt: skip
    assert rc == 0, "grpc_tools.protoc failed on dra-health/v1alpha1"
    (health / "v1alpha1" / "__init__.py").touch()
    if str(health) not in sys.path:
        sys.path.insert(0, str(health))
    if str(GEN) not in sys.path:
        sys.path.insert(0, str(GEN))


_generate_grpcio_stubs()

from deviceplugin.v1beta1 import api_pb2, api_pb2_grpc  # type: ignore[import-not-found]  # noqa: E402
from podresources.v1 import (  # type: ignore[import-not-found]  # noqa: E402
    api_pb2 as podres_pb2,
)
from podresources.v1 import api_pb2_grpc as podres_pb2_grpc  # noqa: E402

__all__ = ["api_pb2", "api_pb2_grpc", "dra_stubs", "podres_pb2", "podres_pb2_grpc"]


def dra_stubs(package: str, version: str) -> tuple[Any, Any]:
    """(api_pb2, api_pb2_grpc) of a DRA proto: pluginregistration/v1, dra/v1, dra/v1beta1 or
    dra-health/v1alpha1."""
    prefix = "" if package == "dra-health" else f"{package}."
    return (
        importlib.import_module(f"{prefix}{version}.api_pb2"),
        importlib.import_module(f"{prefix}{version}.api_pb2_grpc"),
    )

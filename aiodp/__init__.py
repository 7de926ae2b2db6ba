"""aiodp: an asyncio-native Kubernetes device plugin for NVIDIA GPUs."""

from importlib import metadata

try:
    __version__ = metadata.version("aiodp")
except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare source tree
    __version__ = "0.0.0+unknown"
